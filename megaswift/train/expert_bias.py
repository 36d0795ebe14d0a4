"""Auxiliary-loss-free load balancing (DeepSeek-V3; Megatron's moe_router_enable_expert_bias).

A router with an expert bias (models/routers.py GroupLimitedRouter, HF e_score_correction_bias)
chooses experts on score + bias. After each optimizer step the engine moves every MoE layer's
bias towards balance:

    bias_e += rate x sign(mean_e' load_e' - load_e)

where load_e is the number of (token, choice) assignments the layer routed to expert e in that
step: all micro batches, all ranks that route tokens (dp x cp x tp; the per-micro-batch counts
from the router statistics are already global over them), padding excluded. An expert with
exactly the mean load keeps its bias. The counts are whole numbers, so the update is the same
bit for bit on every replica and at every layout; under pipeline parallelism only the last stage
has them, and the engine's one reduction of the step's router statistics over the pp group
hands them to the stages that hold the other layers.

A skipped (non-finite) step moves no bias: its weights stay as they were, and so does the
routing. LoRA runs refuse a rate above 0 (check_config): the bias is part of the frozen base,
which a LoRA checkpoint does not store, so the moved bias would be lost at resume and export.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from megaswift.errors import ConfigError
from megaswift.models.moe import MoELayer


def check_config(cfg, model_cfg) -> None:
    """One-line errors for a bias_update_rate the run cannot honour."""
    rate = cfg.moe.bias_update_rate
    if rate <= 0:
        return
    if not model_cfg.moe_router_expert_bias:
        raise ConfigError(f"moe.bias_update_rate={rate:g} moves the routers' expert bias, which {model_cfg.family} "
                          f"models do not have (deepseek_v3 and glm4_moe do); set moe.bias_update_rate 0 or balance "
                          f"with moe.aux_loss_coef")
    if cfg.model.lora.rank:
        raise ConfigError(f"moe.bias_update_rate={rate:g} with LoRA (model.lora.rank={cfg.model.lora.rank}): the "
                          f"expert bias belongs to the frozen base, which LoRA checkpoints do not save; set "
                          f"moe.bias_update_rate 0, or train without LoRA")


def bias_delta(counts: Tensor, rate: float) -> Tensor:
    """rate x sign(mean load - load) per expert, for counts [..., E] (whole numbers). Compared
    as E x load against the total, so a load equal to the mean is an exact tie (no move)."""
    E = counts.shape[-1]
    return rate * torch.sign(counts.sum(-1, keepdim=True) - E * counts)


class ExpertBias:
    """The expert biases of the MoE layers this rank holds, by their row in the router
    statistics (MoELayer.stats_row)."""

    def __init__(self, model, rate: float):
        self.rate = rate
        self.num_layers, self.num_experts = len(model.cfg.moe_layers), model.cfg.num_moe_experts
        self.local: list[tuple[int, nn.Parameter]] = []
        for chunk in model.chunks:
            for m in chunk.modules():
                if isinstance(m, MoELayer):
                    self.local += [(m.stats_row, p) for p in m.router.parameters() if getattr(p, "expert_bias", False)]

    def gathered(self, device) -> Tensor:
        """[MoE layers, E] fp64: this rank's biases in their rows, zeros elsewhere, so a sum over
        the pp group holds every layer's (each layer lives on one pp rank)."""
        out = torch.zeros(self.num_layers, self.num_experts, dtype=torch.float64, device=device)
        for row, p in self.local:
            out[row] = p.detach().double()
        return out

    @torch.no_grad()
    def update(self, counts: Tensor) -> Tensor:
        """Move this rank's biases by the step's global counts [MoE layers, E]; returns the move of
        every layer's bias [MoE layers, E] (for the metrics, whichever rank holds the layer)."""
        delta = bias_delta(counts, self.rate)
        for row, p in self.local:
            p.add_(delta[row].to(p.dtype))
        return delta

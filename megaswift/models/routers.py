"""MoE routers: which experts each token goes to, with what weight. A registry by name.

A router is a module built as `(cfg, dtype, device)` whose `forward(x [T, h])` returns
`(logits [T, E], probs [T, E] fp32, weights [T, k] fp32, expert ids [T, k])`: `logits` feed the
z-loss and `probs` the load-balancing loss (models/moe.py). Its parameters live under
`mlp.router.` (the router's weight is `mlp.router.weight`).

`ModelConfig.moe_router` names the router of every MoE layer; a new one is a module and a line
in `ROUTERS`. Routers here: `softmax_topk` (Mixtral, Qwen-MoE) and `sigmoid_group` (DeepSeek-V3,
Kimi-K2, GLM-4.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from megaswift.errors import ConfigError

from .config import ModelConfig


def route(logits: Tensor, topk: int, norm_topk_prob: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(probs [T, E] fp32, top-k weights [T, k] fp32, expert ids [T, k]) from router logits."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, topk, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, ids


def balanced_ids(tokens: int, topk: int, num_experts: int, device=None) -> Tensor:
    """Force-balanced routing (Megatron's moe_router_force_load_balancing, made deterministic):
    assignment j of token t goes to expert (t x k + j) mod E, so every expert gets the same
    share of the tokens whatever the router says, and a token's k experts are distinct. For
    benchmarks and dry runs (`moe.router_force_balance`), never for training a model: the
    routing ignores the tokens."""
    return torch.arange(tokens * topk, device=device).view(tokens, topk) % num_experts


class TopKRouter(nn.Module):
    """transformers' Qwen3-MoE / Mixtral router: softmax in fp32 over a linear gate, top-k,
    optional renormalisation (cfg.moe_norm_topk_prob). gpt-oss's router (a gate with a bias,
    cfg.moe_router_bias; softmax over the top-k logits) is this one renormalised: the softmax of
    the chosen logits is their share of the chosen probabilities."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.topk, self.norm_topk_prob = cfg.moe_router_topk, cfg.moe_norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_moe_experts, cfg.hidden_size, dtype=dtype, device=device))
        self.bias = None
        if cfg.moe_router_bias:
            self.bias = nn.Parameter(torch.zeros(cfg.num_moe_experts, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits = F.linear(x, self.weight, self.bias)
        return (logits, *route(logits, self.topk, self.norm_topk_prob))


class GroupLimitedRouter(nn.Module):
    """transformers' DeepseekV3TopkRouter (GLM-4.5's is the same), held and computed in fp32
    whatever the model's dtype, as HF keeps this module in fp32:

    - scores = sigmoid(x W^T);
    - the experts are chosen on scores + `expert_bias` (HF e_score_correction_bias), which only
      chooses: the weights are the chosen experts' plain scores;
    - group-limited: experts are split into n_group groups, each scored by the sum of its two
      best (biased) scores; a token picks its top-k among the experts of its topk_group best
      groups;
    - weights renormalised to sum to one (norm_topk_prob, with HF's 1e-20), then multiplied by
      routed_scaling_factor.

    `probs` (for the load-balancing losses) are the scores normalised to sum to one per token,
    as Megatron and DeepSeek's sequence-wise loss use them. `expert_bias` is a parameter without
    gradient: checkpoints, conversion and resharding treat it like the weights, no optimizer
    touches it, and the engine moves it after each step (aux-loss-free balancing,
    `moe.bias_update_rate`, train/expert_bias.py)."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        E, groups = cfg.num_moe_experts, cfg.moe_router_num_groups
        if E % groups or not 1 <= cfg.moe_router_group_topk <= groups:
            raise ConfigError(f"the group-limited router needs n_group ({groups}) to divide the {E} experts and "
                              f"1 <= topk_group ({cfg.moe_router_group_topk}) <= n_group")
        if cfg.moe_router_topk > cfg.moe_router_group_topk * (E // groups):
            raise ConfigError(f"top-{cfg.moe_router_topk} routing cannot pick from {cfg.moe_router_group_topk} "
                              f"groups of {E // groups} experts")
        self.topk, self.groups, self.group_topk = cfg.moe_router_topk, groups, cfg.moe_router_group_topk
        self.norm_topk_prob, self.scaling = cfg.moe_norm_topk_prob, cfg.moe_router_scaling_factor
        # fp32 whatever the model's dtype, as transformers keeps gate.weight: in a bf16 model a
        # bf16 router weight moves near-tied scores enough to pick other experts than HF does
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size, dtype=torch.float32, device=device))
        self.expert_bias = None
        if cfg.moe_router_expert_bias:  # fp32 whatever the model's dtype: steps of 1e-3 vanish in bf16
            self.expert_bias = nn.Parameter(torch.zeros(E, dtype=torch.float32, device=device), requires_grad=False)
            self.expert_bias.expert_bias = True  # train/expert_bias.py finds it by this mark

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.autocast(x.device.type, enabled=False):  # HF: fp32 logits from fp32 weights
            logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits)
        with torch.no_grad():
            ids = self.choose(scores.detach())
        weights = scores.gather(1, ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.scaling
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        return logits, probs, weights, ids

    def choose(self, scores: Tensor) -> Tensor:
        """Expert ids [T, k] from scores [T, E]: group-limited top-k on the biased scores."""
        T, E = scores.shape
        biased = scores if self.expert_bias is None else scores + self.expert_bias
        if self.groups > 1:
            grouped = biased.view(T, self.groups, E // self.groups)
            group_scores = grouped.topk(min(2, E // self.groups), dim=-1)[0].sum(dim=-1)  # [T, groups]
            best = torch.topk(group_scores, k=self.group_topk, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            biased = biased.masked_fill(~keep.repeat_interleave(E // self.groups, dim=1), float("-inf"))
        return torch.topk(biased, k=self.topk, dim=-1, sorted=False)[1]


ROUTERS: dict[str, type[nn.Module]] = {
    "softmax_topk": TopKRouter,
    "sigmoid_group": GroupLimitedRouter,
}


def register_router(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Make `cls` the router called `name` (ModelConfig.moe_router)."""
    ROUTERS[name] = cls
    return cls


def build_router(cfg: ModelConfig, dtype=None, device=None) -> nn.Module:
    try:
        cls = ROUTERS[cfg.moe_router]
    except KeyError:
        raise ConfigError(f"unknown moe_router {cfg.moe_router!r}; known: {', '.join(sorted(ROUTERS))}") from None
    return cls(cfg, dtype, device)

"""MoE routers: which experts each token goes to, with what weight. A registry by name.

A router is a module built as `(cfg, dtype, device)` whose `forward(x [T, h])` returns
`(logits [T, E], probs [T, E] fp32, weights [T, k] fp32, expert ids [T, k])`: `logits` feed the
z-loss and `probs` the load-balancing loss (models/moe.py). Its parameters live under
`mlp.router.` (the router's weight is `mlp.router.weight`).

`ModelConfig.moe_router` names the router of every MoE layer; a new one (DeepSeek-V3's sigmoid
router with group-limited top-k and an expert bias, ...) is a module and a line in `ROUTERS`.
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
    optional renormalisation (cfg.moe_norm_topk_prob)."""

    def __init__(self, cfg: ModelConfig, dtype=None, device=None):
        super().__init__()
        self.topk, self.norm_topk_prob = cfg.moe_router_topk, cfg.moe_norm_topk_prob
        self.weight = nn.Parameter(torch.empty(cfg.num_moe_experts, cfg.hidden_size, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        logits = F.linear(x, self.weight)
        return (logits, *route(logits, self.topk, self.norm_topk_prob))


ROUTERS: dict[str, type[nn.Module]] = {
    "softmax_topk": TopKRouter,
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

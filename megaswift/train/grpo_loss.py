"""GRPO and its variants as pure functions of per-token log-probabilities and rewards.

Advantages (Shao et al. 2024): each prompt's G completions form a group; a completion's
advantage is its reward minus the group mean, divided by the group's standard deviation
(`scale_rewards: group`), the whole batch's (`batch`, Liu et al. 2025 suggest not dividing by the
group's), or not at all (`none`, Dr. GRPO).

Per completion token t of sequence i, with ratio r = exp(logp - logp_old) (token level) or, for
GSPO (Zheng et al. 2025, `importance_sampling_level: sequence`), the exponent of the mean token
log-ratio of the sequence, the clipped surrogate (PPO's, with DAPO's asymmetric epsilon_high):

    l_it = -min(r A_i, clip(r, 1 - epsilon, 1 + epsilon_high) A_i) + beta KL_it,
    KL_it = exp(ref - logp) - (ref - logp) - 1      (the k3 estimator, Schulman 2020)

`aggregate` turns l into (sum, units): the step's loss is the sum over the global batch divided
by the units, so it does not depend on how the batch is split over ranks or micro batches:

    grpo     per sequence: mean over its tokens; units: sequences
    bnpo     sum over tokens; units: tokens
    dapo     sum over tokens; units: tokens (token-level, Yu et al. 2025)
    dr_grpo  sum over tokens; units: sequences x max_new_tokens (Liu et al. 2025)

bnpo and dapo coincide here: TRL normalises bnpo by each micro batch's tokens, which makes the
loss depend on the micro-batch split; a global normaliser is what both intend.
"""
from __future__ import annotations

import torch
from torch import Tensor

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def group_advantages(rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> Tensor:
    """rewards [groups x G] in group order -> advantages of the same shape."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale == "group":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        adv = adv / (rewards.std() + eps)
    elif scale != "none":
        raise ValueError(f"grpo.scale_rewards must be group, batch or none; got {scale!r}")
    return adv.reshape(rewards.shape)


def per_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2,
                   epsilon_high: float | None = None, beta: float = 0.0, ref_logp: Tensor | None = None,
                   level: str = "token") -> tuple[Tensor, dict]:
    """l [B, T] (zero where mask is 0) and statistics as sums over the masked tokens: 'clipped_low',
    'clipped_high' (tokens whose ratio the clip held), 'kl'."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    log_ratio = logp - old_logp
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp_min(1)).unsqueeze(-1).expand_as(logp)
    elif level != "token":
        raise ValueError(f"grpo.importance_sampling_level must be token or sequence; got {level!r}")
    ratio = torch.exp(log_ratio)
    adv = advantages.unsqueeze(-1)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    stats = {"clipped_low": (((ratio < 1 - epsilon) & (adv < 0)).to(logp.dtype) * mask).sum().detach(),
             "clipped_high": (((ratio > 1 + epsilon_high) & (adv > 0)).to(logp.dtype) * mask).sum().detach()}
    if beta:
        if ref_logp is None:
            raise ValueError("grpo.beta > 0 needs the reference log-probabilities")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        loss = loss + beta * kl
        stats["kl"] = (kl * mask).sum().detach()
    return loss * mask, stats


def aggregate(loss: Tensor, mask: Tensor, loss_type: str, max_new_tokens: int) -> tuple[Tensor, float]:
    """(sum, units) of a [B, T] per-token loss: the batch's loss is sum / units (see the module
    docstring); summed over micro batches and ranks before dividing, it is the global batch's."""
    n = units(mask, loss_type, max_new_tokens)
    if loss_type == "grpo":
        return (loss.sum(-1) / mask.to(loss.dtype).sum(-1).clamp_min(1)).sum(), n
    return loss.sum(), n


def units(mask: Tensor, loss_type: str, max_new_tokens: int) -> float:
    """What `aggregate` divides by for these completions (mask [B, T])."""
    if loss_type == "grpo":
        return float(mask.shape[0])
    if loss_type in ("bnpo", "dapo"):
        return float(mask.sum())
    if loss_type == "dr_grpo":
        return float(mask.shape[0] * max_new_tokens)
    raise ValueError(f"grpo.loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")

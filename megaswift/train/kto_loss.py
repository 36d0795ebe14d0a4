"""KTO (Ethayarajh et al. 2024, https://huggingface.co/papers/2402.01306) as pure functions of
sequence log-probabilities.

Inputs per example: the policy's and the reference model's summed log-probabilities of its
completion (completion tokens only), its label (desirable or not), and z0, the batch's KL
estimate: the mean over the KL rows (mismatched prompt/completion pairs) of policy minus
reference log-probabilities, clamped at 0 and without gradient (`kl_estimate`). With the
log-ratio r = logp - ref_logp:

- desirable:    desirable_weight   x (1 - sigmoid(beta (r - z0)))
- undesirable:  undesirable_weight x (1 - sigmoid(beta (z0 - r)))

Rewards (TRL's definitions): beta x r, reported as means over the desirable and the
undesirable examples (rewards/chosen, rewards/rejected).
"""
from __future__ import annotations

import torch
from torch import Tensor


def kl_estimate(kl_sum: Tensor, kl_rows: Tensor) -> Tensor:
    """z0 from the sum over KL rows of (policy - reference) log-probabilities and their count
    (sums over the whole global batch: every micro batch, every dp rank)."""
    return (kl_sum.detach() / kl_rows.clamp_min(1)).clamp(min=0)


def kto_loss(logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl: Tensor, *, beta: float = 0.1,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """(per-example weighted loss, per-example reward beta x r), each [rows]; `desirable` a bool
    [rows], `kl` the detached scalar z0."""
    r = logps - ref_logps
    kl = kl.detach().to(r.dtype)
    good = 1 - torch.sigmoid(beta * (r - kl))
    bad = 1 - torch.sigmoid(beta * (kl - r))
    loss = torch.where(desirable, desirable_weight * good, undesirable_weight * bad)
    return loss, beta * r.detach()

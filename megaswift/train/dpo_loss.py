"""DPO and its variants as pure functions of sequence log-probabilities.

Inputs per pair: the policy's and the reference model's summed log-probabilities of the chosen
and rejected responses (response tokens only). With the log-ratios
    c = logp_chosen - ref_chosen,   r = logp_rejected - ref_rejected,   d = c - r:

- sigmoid (Rafailov et al. 2023):        -log sigmoid(beta d)
- hinge (SLiC, Zhao et al. 2023):         relu(1 - beta d)
- ipo (Azar et al. 2023):                 (d' - 1 / (2 beta))^2, d' the log-ratios divided by
                                          each response's token count (as TRL does)
- robust (Chowdhury et al. 2024):         ((1 - eps) (-log sigmoid(beta d)) - eps (-log sigmoid(-beta d)))
                                          / (1 - 2 eps), eps = label_smoothing

Rewards (TRL's definitions): beta x c for chosen and beta x r for rejected.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def dpo_loss(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *, loss_type: str = "sigmoid",
             beta: float = 0.1, label_smoothing: float = 0.0, chosen_tokens: Tensor | None = None,
             rejected_tokens: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(per-pair loss, chosen rewards, rejected rewards), each [pairs]. `chosen_tokens` /
    `rejected_tokens` (response token counts) are needed by ipo only."""
    c, r = chosen - ref_chosen, rejected - ref_rejected
    d = c - r
    if loss_type == "sigmoid":
        loss = -F.logsigmoid(beta * d)
    elif loss_type == "hinge":
        loss = torch.relu(1 - beta * d)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs the response token counts")
        d_avg = c / chosen_tokens.clamp_min(1) - r / rejected_tokens.clamp_min(1)
        loss = (d_avg - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        eps = label_smoothing
        loss = ((1 - eps) * -F.logsigmoid(beta * d) - eps * -F.logsigmoid(-beta * d)) / (1 - 2 * eps)
    else:
        raise ValueError(f"dpo.loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    return loss, beta * c.detach(), beta * r.detach()

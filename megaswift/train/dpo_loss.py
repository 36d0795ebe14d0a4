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


# -- reference-free losses: no reference model, only the policy's log-probabilities ---------------
REFERENCE_FREE = ("simpo", "cpo", "orpo")


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -log 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def reference_free_loss(chosen: Tensor, rejected: Tensor, chosen_tokens: Tensor, rejected_tokens: Tensor, *,
                        loss_type: str, beta: float = 0.1, simpo_gamma: float = 0.5) -> tuple[Tensor, Tensor, Tensor, dict]:
    """The preference term of SimPO, CPO or ORPO from the policy's summed response log-probabilities
    and response token counts: (per-pair loss, chosen rewards, rejected rewards, per-pair extras).
    With the mean token log-probabilities a_c = chosen / chosen_tokens, a_r likewise:

    - simpo (Meng et al. 2024):  -log sigmoid(beta (a_c - a_r) - gamma), gamma = `simpo_gamma`
                                 (TRL writes it beta (a_c - a_r - gamma / beta)); rewards beta a
    - cpo (Xu et al. 2024):      -log sigmoid(beta (chosen - rejected)); rewards beta x the sums
    - orpo (Hong et al. 2024):   -beta log sigmoid(log odds(a_c) - log odds(a_r)), log odds(a) =
                                 a - log(1 - exp(a)) (the odds of the mean-token probability
                                 exp(a)); rewards beta a. Extras: the per-pair log sigmoid of the
                                 log-odds ratio (`log_odds_ratio`) and the log-odds ratio itself
                                 (`log_odds_chosen`), as TRL logs them.

    The NLL terms (cpo_alpha x the chosen response's NLL; ORPO's NLL with weight 1) are added by
    the caller, train/dpo.py."""
    extras = {}
    if loss_type in ("simpo", "orpo"):
        a_c, a_r = chosen / chosen_tokens.clamp_min(1), rejected / rejected_tokens.clamp_min(1)
    else:
        a_c, a_r = chosen, rejected
    if loss_type == "simpo":
        loss = -F.logsigmoid(beta * (a_c - a_r) - simpo_gamma)
    elif loss_type == "cpo":
        loss = -F.logsigmoid(beta * (a_c - a_r))
    elif loss_type == "orpo":
        log_odds = (a_c - a_r) - (log1mexp(a_c) - log1mexp(a_r))
        ratio = F.logsigmoid(log_odds)
        loss = -beta * ratio
        extras = {"log_odds_ratio": ratio.detach(), "log_odds_chosen": log_odds.detach()}
    else:
        raise ValueError(f"reference-free dpo.loss_type must be one of {', '.join(REFERENCE_FREE)}; got {loss_type!r}")
    return loss, beta * a_c.detach(), beta * a_r.detach(), extras

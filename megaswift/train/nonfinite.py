"""inf/NaN in a step: decided by every rank together, before the update touches the weights.

A step whose loss or gradient norm is not finite would write inf/NaN into every weight and into
AdamW's moments, from which no later step recovers; a checkpoint saved after it would carry
them, and `checkpoint.keep` would then delete the good ones. So before each optimizer step the
ranks agree (one small all-reduce) on whether any rank saw a non-finite loss or the (global)
gradient norm is non-finite. Then, by `train.on_nonfinite`:

- stop (the default, as Megatron's check): the run ends with one line naming the step, the
  ranks, and the last good checkpoint; nothing of that step is applied or saved;
- skip: the update is dropped (weights and AdamW state stay as they were, the batch is spent),
  counted in the metrics; more than `train.max_skipped_steps` in a row end the run as stop does.
"""
from __future__ import annotations

import math

import torch

from megaswift.errors import MegaswiftError
from megaswift.parallel import collectives


class NonFiniteError(MegaswiftError):
    """A step (or a checkpoint about to be written) holds inf/NaN; `metrics`, when set, is the
    step's row, for the log before the run ends."""

    def __init__(self, message: str, metrics: dict | None = None):
        super().__init__(message)
        self.metrics = metrics


class NonFiniteGuard:
    def __init__(self, policy: str, max_skipped: int, rank: int, world_size: int, device):
        self.policy, self.max_skipped = policy, max_skipped
        self.rank, self.world_size, self.device = rank, world_size, device
        self.skipped = 0  # in the whole run (resumed runs start counting again)
        self.in_a_row = 0

    def bad_ranks(self, local_loss: float) -> list[int]:
        """The ranks whose own loss is not finite, agreed by all ranks."""
        flags = torch.zeros(self.world_size, device=self.device)
        flags[self.rank] = 0.0 if math.isfinite(local_loss) else 1.0
        collectives.all_reduce(flags)
        return [r for r, f in enumerate(flags.tolist()) if f]

    def check(self, step: int, local_loss: float, grad_norm: float, last_good: str | None) -> bool:
        """True when the step must not be applied (skip). Raises NonFiniteError to stop; the
        caller attaches the step's metrics. `grad_norm` is the same on every rank."""
        ranks = self.bad_ranks(local_loss)
        if not ranks and math.isfinite(grad_norm):
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        what = f"step {step}: the gradient norm is {grad_norm}"
        if ranks:
            what += f" and the loss is not finite on rank(s) {ranks}"
        good = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before it"
        if self.policy == "skip" and self.in_a_row <= self.max_skipped:
            return True
        if self.policy == "skip":
            raise NonFiniteError(f"{what}: {self.in_a_row} non-finite steps in a row, more than train.max_skipped_steps="
                                 f"{self.max_skipped}; nothing of it was applied or saved, {good}; lower optim.lr "
                                 f"or look at the data of these steps")
        raise NonFiniteError(f"{what}; the run stopped before applying it (train.on_nonfinite=stop), {good}; lower "
                             f"optim.lr, or set train.on_nonfinite=skip to drop such steps")


def all_finite(tensors: list[torch.Tensor], device) -> bool:
    """Whether every tensor on every rank is free of inf/NaN: one flag per rank, reduced."""
    return not collectives.any_rank(any(not bool(torch.isfinite(t).all()) for t in tensors), device)

"""AdamW over the data-parallel pieces, the learning-rate schedule, and optimizer state I/O.

The optimizer state is saved per parameter in its canonical (layout-independent) form, like the
weights, so a run saved at one TP/DP/ZeRO layout resumes at another.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from megaswift.parallel.data_parallel import DataParallel, DataParallelSet

STATE_KEYS = ("exp_avg", "exp_avg_sq")


def build_optimizer(dp: DataParallel | DataParallelSet, optim_cfg, on_cuda: bool) -> torch.optim.AdamW:
    """Weight decay on matrices only: norms and biases (1-D) are left alone, as in Megatron."""
    decay, no_decay = [], []
    for piece in dp.pieces:
        piece.data.grad = piece.grad  # views of the gradient buffer, reduced by dp
        (decay if piece.param.ndim >= 2 else no_decay).append(piece.data)
    groups = [g for g in ({"params": decay, "weight_decay": optim_cfg.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    kwargs = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.adam_beta1, optim_cfg.adam_beta2),
                             eps=optim_cfg.adam_eps, **kwargs)


def lr_at(step: int, optim_cfg, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from lr/warmup to lr, then
    cosine or linear decay towards min_lr, or constant."""
    lr, min_lr, warmup = optim_cfg.lr, optim_cfg.min_lr, optim_cfg.warmup_steps
    if step < warmup:
        return lr * (step + 1) / warmup
    if optim_cfg.schedule == "constant":
        return lr
    # min_lr is reached after the last step, so the last step still learns something
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if optim_cfg.schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    return lr + (min_lr - lr) * progress


def schedule_warnings(optim_cfg, total_steps: int) -> list[str]:
    """Schedules that are legal but rarely meant (short debug runs do them on purpose, so they
    warn rather than fail): one line each, the plan prints them once on rank 0."""
    out = []
    if optim_cfg.lr == 0:
        out.append("optim.lr=0: AdamW's updates are scaled by the learning rate, so the weights never change")
    elif optim_cfg.warmup_steps >= total_steps:
        last = lr_at(total_steps - 1, optim_cfg, total_steps)
        decay = "" if optim_cfg.schedule == "constant" else f" and no {optim_cfg.schedule} decay to min_lr"
        out.append(f"optim.warmup_steps={optim_cfg.warmup_steps} >= train.steps={total_steps}: the run never "
                   f"leaves warmup: its last step trains at lr {last:.3g} of optim.lr={optim_cfg.lr:g}{decay}; "
                   f"lower warmup_steps below train.steps")
    return out


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def full_state(dp: DataParallel | DataParallelSet, optimizer: torch.optim.Optimizer) -> dict[str, dict]:
    """{'exp_avg': {param: tensor shaped like the param}, ...} for the checkpoint.

    Without ZeRO every rank holds the whole state and DCP writes each tensor once. Under ZeRO-1
    the buckets are all-gathered one at a time and each dp rank keeps only every dp-th parameter,
    so a save costs one bucket of extra memory, not the whole unsharded state."""
    out: dict[str, dict[nn.Parameter, torch.Tensor]] = {key: {} for key in STATE_KEYS}
    for part in [p for p, _ in dp.parts] if isinstance(dp, DataParallelSet) else [dp]:
        _part_state(part, optimizer, out)
    return out


def _part_state(dp: DataParallel, optimizer, out: dict) -> None:
    if not dp.zero or dp.dp == 1:
        for piece in dp.pieces:  # a piece is a whole parameter here
            state = optimizer.state.get(piece.data)
            for key in STATE_KEYS if state else ():
                out[key][piece.param] = state[key].view_as(piece.param)
        return
    index = 0
    for i, b in enumerate(dp.buckets):
        lo, hi = b.shard
        for key in STATE_KEYS:
            flat = b.data.new_zeros(hi - lo)
            for piece in b.pieces:
                state = optimizer.state.get(piece.data)
                if state:
                    off = piece.offset + piece.start - lo
                    flat[off: off + piece.n] = state[key].reshape(-1)
            full = dp.gather_bucket(i, flat)
            for j, (p, view) in enumerate(dp.bucket_views(i, full).items()):
                if (index + j) % dp.dp == dp.dp_rank:
                    out[key][p] = view.clone()
        index += len(b.params)


def load_full_state(dp: DataParallel | DataParallelSet, optimizer: torch.optim.Optimizer, state: dict, step: int) -> None:
    """Inverse of full_state: keep this rank's pieces of each parameter's state."""
    fused = bool(optimizer.defaults.get("fused"))
    for piece in dp.pieces:
        # fused AdamW keeps its step counter on the parameter's device, the others on the CPU
        where = piece.data.device if fused else "cpu"
        entry = {"step": torch.tensor(float(step), dtype=torch.float32, device=where)}
        for key in STATE_KEYS:
            entry[key] = state[key][piece.param].reshape(-1)[piece.start: piece.start + piece.n].clone()
        optimizer.state[piece.data] = entry

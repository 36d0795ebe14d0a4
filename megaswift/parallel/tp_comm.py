"""Tensor- and sequence-parallel communication, named for what each does to a region.

Megatron-LM's "f" and "g" (Shoeybi et al. 2019, https://arxiv.org/abs/1909.08053, section 3):
a column-parallel linear starts with f (identity forward, all-reduce backward) and a row-parallel
linear ends with g (all-reduce forward, identity backward). Sequence parallelism
(Korthikanti et al. 2022, https://arxiv.org/abs/2205.05198) replaces f by an all-gather along the
sequence and g by a reduce-scatter along it; each is the other's backward.

Every function takes the group explicitly. A group that is None or has one rank makes the function
the identity both ways, so the same model runs in a single process without torch.distributed.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _check_divisible(n: int, size: int, dim: int, what: str) -> None:
    if n % size:
        raise ValueError(
            f"cannot {what} dim {dim} of size {n} over {size} tensor-parallel ranks:"
            f" {n} is not divisible by {size}"
        )


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    # Out of place: the same tensor may also feed another autograd branch (an Add node hands one
    # grad object to both of its inputs), so reducing it in place would corrupt that branch.
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _all_gather_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (same shape on every rank)."""
    size = group_size(group)
    if size == 1:
        return x
    # the *_single collectives concatenate along dim 0: [n, ...] -> [size * n, ...]
    front = x.movedim(dim, 0).contiguous()
    out = front.new_empty((size * front.shape[0], *front.shape[1:]))
    dist.all_gather_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum `x` over the ranks and keep this rank's chunk of `dim`."""
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x.shape[dim], size, dim, "reduce-scatter")
    front = x.movedim(dim, 0).contiguous()  # [size * n, ...] -> [n, ...]
    out = front.new_empty((front.shape[0] // size, *front.shape[1:]))
    dist.reduce_scatter_single(out, front, group=group)
    return out.movedim(0, dim).contiguous()


def _split_along(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's chunk of `dim` (rank r holds chunk r), with no communication."""
    size = group_size(group)
    if size == 1:
        return x
    _check_divisible(x.shape[dim], size, dim, "split")
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


class _CopyToTPRegion(torch.autograd.Function):
    """f: every rank uses the same input, so its gradient is the sum of the ranks' partial ones."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTPRegion(torch.autograd.Function):
    """g: sum the partial outputs of a row-parallel linear; the sum's gradient is replicated."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AlongDim(torch.autograd.Function):
    """A collective along `dim` forward and its adjoint backward. The four sequence/vocab regions
    below differ only in that pair, so one autograd function serves them all."""

    @staticmethod
    def forward(ctx, x, group, dim, fwd, bwd):
        ctx.group, ctx.dim, ctx.bwd = group, dim, bwd
        return fwd(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.bwd(grad, ctx.dim, ctx.group), None, None, None, None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTPRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTPRegion.apply(x, group)


def gather_from_sp_region(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Sequence shards -> full sequence before a column-parallel linear. The gradient that comes
    back is partial on each rank (each owns a slice of the linear's outputs), so it is summed as
    well as split: a reduce-scatter."""
    return x if group_size(group) == 1 else _AlongDim.apply(x, group, dim, _all_gather_along, _reduce_scatter_along)


def reduce_scatter_to_sp_region(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Partial sums over the full sequence -> summed sequence shard (after a row-parallel linear);
    backward all-gathers."""
    return x if group_size(group) == 1 else _AlongDim.apply(x, group, dim, _reduce_scatter_along, _all_gather_along)


def scatter_to_sp_region(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """Replicated full sequence -> this rank's shard; the gradient is every rank's shard joined."""
    return x if group_size(group) == 1 else _AlongDim.apply(x, group, dim, _split_along, _all_gather_along)


def gather_from_tp_region(x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    """Join the ranks' slices of `dim`. The loss downstream is replicated, so each rank's gradient
    is already complete and it keeps only its own slice."""
    return x if group_size(group) == 1 else _AlongDim.apply(x, group, dim, _all_gather_along, _split_along)

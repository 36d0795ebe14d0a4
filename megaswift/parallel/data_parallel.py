"""Data parallelism: gradients reduced over dp x cp in buckets while backward runs, and ZeRO-1.

Every trainable parameter lives in a flat fp32 buffer, and so does its gradient: `p.data` and
`p.grad` are views into per-bucket buffers. Autograd accumulates micro-batch gradients in place
into those views, and a post-accumulate hook counts the parameters of a bucket that are done; on
the last micro batch a full bucket starts its reduction at once, asynchronously, while backward
goes on with the layers below (buckets hold parameters in reverse order, the order backward
produces them). The reduction is a SUM: the engine already divides the loss by the number of
loss tokens in the whole global batch.

The optimizer works on "pieces": flat views of the parameter buffer. Without ZeRO a rank owns
every element of every bucket (the reduction is an all-reduce). With ZeRO-1 (Rajbhandari et al.
2020, https://arxiv.org/abs/1910.02054) each bucket is cut into dp equal shards; the reduction is
a reduce-scatter, a rank keeps AdamW state and takes the step for its own shard only, and an
all-gather of the parameter shards follows the step. Both paths share all of this code; only the
shard bounds and the two collectives differ, so ZeRO-1 equals plain DP by construction.

Mixture-of-experts models have two kinds of weights with two data-parallel groups: dense weights
are replicated over dp x cp, expert weights over expert-dp (the ranks that hold the same experts:
tp x cp x dp / (ep x etp)). `DataParallelSet` keeps one DataParallel per kind and presents them
as one to the engine and the optimizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .tp_comm import group_rank, group_size


@dataclass
class Piece:
    """The part of parameter `param` (flat elements [start, start + n)) that this rank updates."""
    param: nn.Parameter
    start: int
    n: int
    offset: int  # where the parameter starts in its bucket
    data: torch.Tensor  # view of the bucket's parameter buffer
    grad: torch.Tensor  # view of the bucket's gradient buffer


@dataclass
class Bucket:
    params: list[nn.Parameter]
    offsets: list[int]
    data: torch.Tensor
    grad: torch.Tensor
    shard: tuple[int, int]  # [lo, hi) of the flat buffer this rank owns
    ready: int = 0
    work: object = None
    shard_grad: torch.Tensor | None = None
    pieces: list[Piece] = field(default_factory=list)


class DataParallel:
    """Owns the parameter and gradient buffers of `params` and their reduction over `group`."""

    def __init__(self, params: list[nn.Parameter], group=None, *, zero: int = 0, bucket_numel: int = 40_000_000,
                 device: torch.device | None = None):
        self.group, self.zero = group, zero
        self.dp, self.dp_rank = group_size(group), group_rank(group)
        self.sync = True  # set False for all micro batches but the last (gradient accumulation)
        params = [p for p in params if p.requires_grad]
        # may hold no trainable parameter (LoRA adapting only routed experts): norms still need a device
        self.device = device or (params[0].device if params else torch.device("cpu"))
        self.buckets: list[Bucket] = []
        self._bucket_of: dict[nn.Parameter, Bucket] = {}
        current: list[nn.Parameter] = []
        for p in reversed(params):  # backward produces the last layers' gradients first
            current.append(p)
            if sum(q.numel() for q in current) >= bucket_numel:
                self._add_bucket(current)
                current = []
        if current:
            self._add_bucket(current)
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += p.numel()
        padded = -(-total // self.dp) * self.dp  # equal reduce-scatter shards
        device = params[0].device
        data = torch.zeros(padded, dtype=torch.float32, device=device)
        grad = torch.zeros(padded, dtype=torch.float32, device=device)
        for p, off in zip(params, offsets):
            if p.dtype != torch.float32:
                raise TypeError(f"data parallel keeps fp32 master weights; got a {p.dtype} parameter")
            data[off: off + p.numel()].copy_(p.detach().reshape(-1))
            p.data = data[off: off + p.numel()].view_as(p)
            p.grad = grad[off: off + p.numel()].view_as(p)
        per = padded // self.dp
        shard = (self.dp_rank * per, (self.dp_rank + 1) * per) if self.zero else (0, padded)
        bucket = Bucket(params, offsets, data, grad, shard)
        for p, off in zip(params, offsets):
            a, b = max(off, shard[0]), min(off + p.numel(), shard[1])
            if a < b:
                bucket.pieces.append(Piece(p, a - off, b - a, off, data[a:b], grad[a:b]))
            self._bucket_of[p] = bucket
        self.buckets.append(bucket)

    # -- gradients -------------------------------------------------------------------------------
    def zero_grad(self) -> None:
        for b in self.buckets:
            b.grad.zero_()
            b.ready = 0

    def _grad_ready(self, p: nn.Parameter) -> None:
        if not self.sync:
            return
        bucket = self._bucket_of[p]
        bucket.ready += 1
        if bucket.ready == len(bucket.params):
            self._start(bucket)

    def _start(self, bucket: Bucket) -> None:
        if self.dp == 1 or bucket.work is not None:
            return
        if self.zero:
            lo, hi = bucket.shard
            bucket.shard_grad = bucket.grad.new_empty(hi - lo)
            bucket.work = dist.reduce_scatter_single(bucket.shard_grad, bucket.grad, group=self.group, async_op=True)
        else:
            bucket.work = dist.all_reduce(bucket.grad, group=self.group, async_op=True)

    def finish_grad_sync(self) -> None:
        """Wait for every bucket's reduction (starting any whose parameters got no gradient).
        Afterwards the gradients of this rank's pieces are summed over the group."""
        for bucket in self.buckets:  # in order: every rank issues the collectives in the same order
            self._start(bucket)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
            if bucket.shard_grad is not None:
                lo, hi = bucket.shard
                bucket.grad[lo:hi].copy_(bucket.shard_grad)
                bucket.shard_grad = None

    @property
    def pieces(self) -> list[Piece]:
        return [piece for b in self.buckets for piece in b.pieces]

    def grad_norm(self, weights: dict[nn.Parameter, float | torch.Tensor], model_parallel_groups=()) -> torch.Tensor:
        """Global L2 norm of the gradients, each element of the model counted once.

        `weights[p]` is 1/(number of model-parallel ranks that hold the same element): a scalar,
        or a tensor shaped like p when only some rows are replicated. Pieces are disjoint across
        dp under ZeRO and identical without it, so the dp sum is taken only under ZeRO."""
        return _sum_over(self.grad_sq(weights), model_parallel_groups).sqrt()

    def grad_sq(self, weights: dict[nn.Parameter, float | torch.Tensor]) -> torch.Tensor:
        """Weighted sum of squared gradients of this dp group's copy of the parameters."""
        sq = torch.zeros((), dtype=torch.float32, device=self.device)
        for piece in self.pieces:
            w = weights.get(piece.param, 1.0)
            g2 = piece.grad.float().pow(2)
            if isinstance(w, torch.Tensor):
                g2 = g2 * w.reshape(-1)[piece.start: piece.start + piece.n]
            else:
                g2 = g2 * w
            sq += g2.sum()
        if self.zero and self.dp > 1:
            dist.all_reduce(sq, group=self.group)
        return sq

    def scale_grads(self, factor: float) -> None:
        for b in self.buckets:
            lo, hi = b.shard
            b.grad[lo:hi].mul_(factor)

    # -- parameters ------------------------------------------------------------------------------
    def gather_params(self) -> None:
        """After the optimizer step under ZeRO-1: every rank gets every updated shard."""
        if not self.zero or self.dp == 1:
            return
        works = []
        for b in self.buckets:
            lo, hi = b.shard
            works.append(dist.all_gather_single(b.data, b.data[lo:hi].clone(), group=self.group, async_op=True))
        for w in works:
            w.wait()

    def gather_bucket(self, bucket_index: int, shard: torch.Tensor) -> torch.Tensor:
        """All-gather one bucket's shard tensors (e.g. optimizer state) into the whole bucket."""
        if not self.zero or self.dp == 1:
            return shard
        full = shard.new_empty(self.buckets[bucket_index].data.numel())
        dist.all_gather_single(full, shard.contiguous(), group=self.group)
        return full

    def bucket_views(self, bucket_index: int, flat: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """Cut a whole-bucket flat tensor into tensors shaped like its parameters."""
        b = self.buckets[bucket_index]
        return {p: flat[off: off + p.numel()].view_as(p) for p, off in zip(b.params, b.offsets)}


def _sum_over(x: torch.Tensor, groups) -> torch.Tensor:
    for group in groups:
        if group_size(group) > 1:
            dist.all_reduce(x, group=group)
    return x


class DataParallelSet:
    """Dense weights reduced over dp x cp, expert weights (marked `p.expert`) over expert-dp:
    one DataParallel each, driven as one. Every rank of a pipeline stage holds the same layers,
    so all of them have (or lack) the expert part and issue the same collectives."""

    def __init__(self, params: list[nn.Parameter], st, *, zero: int = 0, bucket_numel: int = 40_000_000):
        dense = [p for p in params if not getattr(p, "expert", False)]
        expert = [p for p in params if getattr(p, "expert", False)]
        self.parts: list[tuple[DataParallel, tuple]] = [
            (DataParallel(dense, st.dp_cp_group, zero=zero, bucket_numel=bucket_numel, device=st.device),
             (st.tp_group,))]
        if expert:
            # each expert element sits once on the ep x etp ranks of an expert-dp replica
            self.parts.append((DataParallel(expert, st.edp_group, zero=zero, bucket_numel=bucket_numel,
                                            device=st.device),
                               (st.etp_group, st.ep_group)))
        self.pp_group = st.pp_group

    @property
    def sync(self) -> bool:
        return self.parts[0][0].sync

    @sync.setter
    def sync(self, value: bool) -> None:
        for part, _ in self.parts:
            part.sync = value

    @property
    def pieces(self) -> list[Piece]:
        return [piece for part, _ in self.parts for piece in part.pieces]

    def zero_grad(self) -> None:
        for part, _ in self.parts:
            part.zero_grad()

    def finish_grad_sync(self) -> None:
        for part, _ in self.parts:
            part.finish_grad_sync()

    def grad_norm(self, weights: dict[nn.Parameter, float | torch.Tensor]) -> torch.Tensor:
        """Global L2 norm: each part's squares summed over the ranks that hold distinct pieces of
        it, then the parts added and summed over the pipeline stages."""
        total = sum(_sum_over(part.grad_sq(weights), groups) for part, groups in self.parts)
        return _sum_over(total, (self.pp_group,)).sqrt()

    def scale_grads(self, factor: float) -> None:
        for part, _ in self.parts:
            part.scale_grads(factor)

    def gather_params(self) -> None:
        for part, _ in self.parts:
            part.gather_params()

"""Expert parallelism: tokens travel to the ranks that hold their experts and come back.

A rank holds `E / ep` experts (its ep rank's block), each possibly split over `etp` ranks
(expert tensor parallelism: linear_fc1 by output rows, linear_fc2 by input columns). For one MoE
layer (`dispatch_combine`):

1. every (token, expert) assignment of this rank's tokens is sorted by expert, so the tokens for
   each ep rank are contiguous;
2. an all-to-all over ep sends them to the rank holding the expert (uneven splits: every rank
   sends what its router chose; nothing is padded or dropped unless a capacity is set);
3. under etp the received tokens are all-gathered over the etp group, because each etp rank holds
   only a slice of every expert and must see every token routed to it;
4. the tokens are regrouped expert by expert and the local experts run as one grouped GEMM
   (`torch._grouped_mm`) or a loop over experts, the reference;
5. the way back mirrors the way in: the etp partial sums of linear_fc2 are reduce-scattered to the
   rank whose tokens they are, an all-to-all returns them over ep, and each token's output is the
   router-weighted sum of its experts' outputs, in the token's original place.

Every collective is an autograd function whose backward is its adjoint, so gradients flow the
same way back. This is Megatron-LM's all-to-all token dispatcher, written for gloo and NCCL alike.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from .tp_comm import group_size


# -- collectives with autograd ------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Rows [sum(in_splits), ...] -> [sum(out_splits), ...]; backward swaps the splits."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _gather_rows(x: Tensor, sizes: list[int], group) -> Tensor:
    """Each rank's x has sizes[rank] rows; all of them, concatenated in rank order. Padded to the
    largest so one all_gather_single serves uneven sizes."""
    most = max(sizes)
    padded = F.pad(x, (0, 0, 0, most - x.shape[0]))
    out = x.new_empty(len(sizes) * most, x.shape[1])
    dist.all_gather_single(out, padded.contiguous(), group=group)
    return torch.cat([out[r * most: r * most + n] for r, n in enumerate(sizes)])


def _reduce_scatter_rows(x: Tensor, sizes: list[int], group, rank: int) -> Tensor:
    """x holds every rank's rows (sizes[r] each, in rank order) as partial sums; this rank's rows
    summed over the group."""
    most = max(sizes)
    blocks, at = [], 0
    for n in sizes:
        blocks.append(F.pad(x[at: at + n], (0, 0, 0, most - n)))
        at += n
    out = x.new_empty(most, x.shape[1])
    dist.reduce_scatter_single(out, torch.cat(blocks).contiguous(), group=group)
    return out[: sizes[rank]]


class _GatherRows(torch.autograd.Function):
    """Forward gathers the etp ranks' tokens; backward sums each token's gradient over the etp
    ranks (each computed it for its slice of the experts) and returns it to its owner."""

    @staticmethod
    def forward(ctx, x, sizes, group, rank):
        ctx.args = (sizes, group, rank)
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad.contiguous(), *ctx.args), None, None, None


class _ReduceScatterRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group, rank):
        ctx.args = (sizes, group)
        return _reduce_scatter_rows(x.contiguous(), sizes, group, rank)

    @staticmethod
    def backward(ctx, grad):
        sizes, group = ctx.args
        return _gather_rows(grad.contiguous(), sizes, group), None, None, None


def _exchange_counts(counts: Tensor, group) -> Tensor:
    """counts [ep, E_local]: row r = tokens this rank sends to ep rank r's experts. Returns
    [ep, E_local]: row r = tokens ep rank r sends to this rank's experts."""
    out = torch.empty_like(counts)
    dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


def _gather_counts(counts: Tensor, group) -> Tensor:
    out = counts.new_empty(group_size(group) * counts.shape[0], counts.shape[1])
    dist.all_gather_single(out, counts.contiguous(), group=group)
    return out


def _expert_major(block_counts: Tensor, total: int | None = None) -> Tensor:
    """Rows arrive in blocks (source, expert), source-major; the permutation that lists them
    expert-major (every source's rows for expert 0, then expert 1, ...), keeping order inside.
    `total`: the number of rows, where the caller knows it without reading the counts."""
    S, E = block_counts.shape
    flat = block_counts.reshape(-1)
    starts = torch.cumsum(flat, 0) - flat  # where block (s, e) starts, source-major
    lens = block_counts.t().reshape(-1)
    starts = starts.view(S, E).t().reshape(-1)
    if total is None:
        total = int(lens.sum())
    first_out = torch.cumsum(lens, 0) - lens  # where block (e, s) starts, expert-major
    return torch.repeat_interleave(starts - first_out, lens, output_size=total) + torch.arange(
        total, device=block_counts.device)


# -- expert compute --------------------------------------------------------------------------------
def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's, where it is on for x's device
    (torch._grouped_mm is not an autocast op, so the grouped path casts by hand), else x's."""
    kind = x.device.type
    if kind in ("cuda", "cpu") and torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return x.dtype


def _grouped_ok(x: Tensor, w1: Tensor, w2: Tensor, dtype: torch.dtype) -> bool:
    """torch._grouped_mm needs 16-byte aligned rows (and bf16 on CUDA, and on fake tensors, whose
    meta kernel checks as CUDA does)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if (x.is_cuda or is_fake(x)) and dtype != torch.bfloat16:
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return all((d * size) % 16 == 0 for d in (w1.shape[1], w1.shape[2], w2.shape[1], w2.shape[2]))


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def clamped_swiglu(limit: float, alpha: float):
    """gpt-oss's expert activation: the gate clamped above at `limit`, up to [-limit, limit],
    gate x sigmoid(alpha x gate) x (up + 1)."""
    def act(gate: Tensor, up: Tensor) -> Tensor:
        gate = gate.clamp(max=limit)
        return gate * torch.sigmoid(alpha * gate) * (up.clamp(-limit, limit) + 1)
    return act


def expert_swiglu(x: Tensor, counts: list[int], w1: Tensor, w2: Tensor, backend: str = "auto",
                  b1: Tensor | None = None, b2: Tensor | None = None, act=swiglu) -> Tensor:
    """x [tokens, H] grouped by local expert (counts[e] rows each) -> [tokens, H].

    w1 [E_local, 2f, H] holds each expert's [gate; up] rows, w2 [E_local, H, f]; b1 [E_local, 2f]
    and b2 [E_local, H] their biases (gpt-oss), if any; `act(gate, up)` the activation. `grouped`
    runs all experts as two grouped GEMMs; `loop` runs them one by one (the reference: plain
    matmuls)."""
    dtype = _compute_dtype(x)
    if backend == "auto":
        backend = "grouped" if _grouped_ok(x, w1, w2, dtype) else "loop"
    if backend == "grouped":
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        x, w1, w2 = x.to(dtype), w1.to(dtype), w2.to(dtype)  # casts are differentiable: fp32 master grads
        h = torch._grouped_mm(x, w1.transpose(1, 2), offs=offs)
        per_row = torch.tensor(counts, device=x.device)
        if b1 is not None:
            h = h + b1.to(dtype).repeat_interleave(per_row, dim=0, output_size=h.shape[0])
        gate, up = h.chunk(2, dim=-1)
        y = torch._grouped_mm(act(gate, up).contiguous(), w2.transpose(1, 2), offs=offs)
        if b2 is not None:
            y = y + b2.to(dtype).repeat_interleave(per_row, dim=0, output_size=y.shape[0])
        return y
    outs, at = [], 0
    for e, n in enumerate(counts):
        xe = x[at: at + n]
        gate, up = F.linear(xe, w1[e], None if b1 is None else b1[e]).chunk(2, dim=-1)
        outs.append(F.linear(act(gate, up), w2[e], None if b2 is None else b2[e]))
        at += n
    return torch.cat(outs) if outs else x.new_zeros(0, w2.shape[1])


# -- dispatch and combine ------------------------------------------------------------------------
def balanced_counts(assignments: int, num_experts: int) -> list[int]:
    """Assignments per expert under force-balanced routing (models/routers.balanced_ids):
    assignment i goes to expert i mod E."""
    base, extra = divmod(assignments, num_experts)
    return [base + (e < extra) for e in range(num_experts)]


def dispatch_combine(x: Tensor, expert_ids: Tensor, weights: Tensor, num_experts: int, w1: Tensor, w2: Tensor, *,
                     keep: Tensor | None = None, ep_group=None, etp_group=None, backend: str = "auto",
                     uniform_counts: list[int] | None = None, b1: Tensor | None = None, b2: Tensor | None = None,
                     act=swiglu) -> Tensor:
    """The MoE output for this rank's tokens x [T, H]: sum_j weights[t, j] * expert_{ids[t, j]}(x[t]).

    expert_ids/weights [T, k] come from the router; `keep` [T, k] (optional) marks assignments
    that survive a capacity limit (the dropped ones contribute nothing). w1/w2 are this rank's
    experts (its ep block, its etp slice).

    `uniform_counts` [E]: the assignments per expert when the caller knows them without reading
    the ids and they are the same on every rank (force-balanced routing). The dispatch then has
    no data-dependent shape: no count exchange, every split a Python int, so it also runs on
    fake tensors (the dry run, megaswift/planner/).

    b1/b2: the experts' biases (their etp slice of b1; b2 whole, added by etp rank 0 alone, so
    the reduce-scatter of the partial sums adds it once); `act`: the activation (expert_swiglu)."""
    T, k = expert_ids.shape
    ep, etp = group_size(ep_group), group_size(etp_group)
    e_local = num_experts // ep
    flat_e = expert_ids.reshape(-1)
    flat_t = torch.arange(T, device=x.device).repeat_interleave(k)
    flat_w = weights.reshape(-1)
    if keep is not None:
        kept = keep.reshape(-1).nonzero().squeeze(1)
        flat_e, flat_t, flat_w = flat_e[kept], flat_t[kept], flat_w[kept]
    order = torch.argsort(flat_e, stable=True)
    token_of, weight_of = flat_t[order], flat_w[order]
    # grouped by expert, hence by destination; in the compute dtype, so bf16 travels under autocast
    rows = x.index_select(0, token_of).to(_compute_dtype(x))
    if uniform_counts is not None:
        blocks, sizes = _uniform_blocks(uniform_counts, ep, etp, ep_group)
        send_sizes, recv_sizes, etp_sizes = sizes
        if ep > 1:
            rows = all_to_all(rows, recv_sizes, send_sizes, ep_group)
        if etp > 1:
            rows = _GatherRows.apply(rows, etp_sizes, etp_group, dist.get_rank(etp_group))
        total = sum(sum(row) for row in blocks)
        per_expert = [sum(col) for col in zip(*blocks)]
        blocks = torch.tensor(blocks, device=x.device)
    else:
        counts = torch.bincount(flat_e, minlength=num_experts).view(ep, e_local)  # [dest ep rank, local expert]
        if ep > 1:
            recv = _exchange_counts(counts, ep_group)
            send_sizes, recv_sizes = counts.sum(1).tolist(), recv.sum(1).tolist()
            rows = all_to_all(rows, recv_sizes, send_sizes, ep_group)
        else:
            recv = counts
        blocks = recv
        if etp > 1:
            blocks = _gather_counts(recv, etp_group)  # [etp x ep sources, E_local]
            etp_sizes = blocks.view(etp, -1).sum(1).tolist()
            rows = _GatherRows.apply(rows, etp_sizes, etp_group, dist.get_rank(etp_group))
        total, per_expert = None, blocks.sum(0).tolist()
    perm = _expert_major(blocks, total)
    if b2 is not None and etp > 1 and dist.get_rank(etp_group) != 0:
        b2 = None  # etp rank 0 adds it (its gradient is summed over etp: grads.etp_partial_grad)
    y = expert_swiglu(rows.index_select(0, perm), per_expert, w1, w2, backend, b1, b2, act)
    y = y.index_select(0, torch.argsort(perm))  # back to arrival order
    if etp > 1:
        y = _ReduceScatterRows.apply(y, etp_sizes, etp_group, dist.get_rank(etp_group))
    if ep > 1:
        y = all_to_all(y, send_sizes, recv_sizes, ep_group)
    out = x.new_zeros(x.shape, dtype=y.dtype)  # the experts' dtype (bf16 under CUDA autocast)
    return out.index_add(0, token_of, y * weight_of.unsqueeze(1).to(y.dtype))


def _uniform_blocks(counts: list[int], ep: int, etp: int, ep_group):
    """The dispatch's block counts [etp x ep sources, E_local] and its split sizes (send, receive,
    etp) when every rank sends `counts[e]` rows to expert e."""
    e_local = len(counts) // ep
    me = dist.get_rank(ep_group) if ep > 1 else 0
    mine = counts[me * e_local: (me + 1) * e_local]
    send = [sum(counts[r * e_local: (r + 1) * e_local]) for r in range(ep)]
    recv = [sum(mine)] * ep
    return [list(mine) for _ in range(etp * ep)], (send, recv, [sum(mine) * ep] * etp)


def capacity_keep(expert_ids: Tensor, weights: Tensor, num_experts: int, capacity_factor: float) -> Tensor:
    """Token dropping (Lepikhin et al. 2020; Megatron's `probs` drop policy): each expert takes
    at most ceil(capacity_factor x T x k / E) of this rank's assignments, those with the highest
    router weight; returns the [T, k] mask of assignments kept."""
    T, k = expert_ids.shape
    capacity = int(-(-capacity_factor * T * k // num_experts))
    flat_e, flat_w = expert_ids.reshape(-1), weights.reshape(-1).detach().float()
    # sort by expert, then by weight descending: an assignment's place in its expert's queue
    order = torch.argsort(flat_e * 2.0 - flat_w / (flat_w.max() + 1), stable=True)
    counts = torch.bincount(flat_e, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    place = torch.empty_like(order)
    place[order] = torch.arange(order.numel(), device=order.device) - starts[flat_e[order]]
    return (place < capacity).view(T, k)

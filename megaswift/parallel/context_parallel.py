"""Context parallelism: the sequence split across the cp group, attention by ring, Ulysses or both.

Sharding (`shard_batch`). Causal attention costs more for late queries, so each cp rank holds
two chunks of every document, r and 2N-1-r of 2N equal chunks (zigzag; Brandon et al. 2023,
Megatron's CP): every rank then does the same work. A packed row splits each document on its
own, so no rank holds only the long tail of the documents. A document whose length 2N does not
divide gets padding tokens after it (their own document, label ignored, never seen by a real
token), so the loss is exactly the unsharded one. Every rank keeps `cp_index` [b, N, s_local]:
where each token of every cp rank sits in the padded row. Masks between any two ranks' tokens
come from it (causal = index order, same document, sliding window), so attention needs no other
bookkeeping and any rank can build any block's mask without communication.

Attention (`context_parallel_attention`), on a cp group of U (Ulysses) x R (ring) ranks:
- Ulysses (Jacobs et al. 2023): an all-to-all trades the sequence shards of the U ranks for a
  1/U share of the heads, so each rank attends its heads over the U ranks' tokens. KV heads
  fewer than U are replicated first.
- Ring (Liu et al. 2023): K/V blocks travel around the R ranks; each rank attends its queries to
  the block it holds while the next block is already in flight, and merges the blocks' results
  from their log-sum-exp in fp32. The backward pass sends K/V around again, recomputes each
  block, and passes each block's dK/dV accumulator along with it until it is home.
- Hybrid: Ulysses inside, ring across; ring or Ulysses alone are the cases R = 1 or U = 1.
V's head dim may differ from Q/K's (multi-latent attention): K and V travel the ring as one
tensor, stacked when their head dims agree and concatenated along the head dim otherwise.
Attention sinks (gpt-oss, kernels/attention.py) are applied once, to the merged blocks: a sink
per block would count once per block. Under Ulysses a rank attends a 1/U share of the heads and
takes the same share of the sinks; each rank's sink gradient covers its own queries and heads,
summed over dp x cp with the other dense gradients.

Written here rather than taken from torch: torch's `context_parallel` has no CPU kernels (see
shared/torch-on-cpu.md) and no packed-document or Ulysses support.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import is_fake
from torch import Tensor

from megaswift.errors import LayoutError
from megaswift.kernels.attention import apply_sinks, attention, merge_attention_blocks, pad_head_dim

from .tp_comm import group_rank, group_size
from .watchdog import beat

PAD_DOCUMENT = -1  # document id of the padding inserted after documents


# -- sharding ---------------------------------------------------------------------------------------
def shard_batch(mb: dict, cp: int, cp_rank: int, *, multiple: int | None = None, pad_id: int = 0) -> dict:
    """This cp rank's part of a micro batch of [b, S] tensors (input_ids, labels, position_ids;
    document_ids when packed). Returns those keys sharded to [b, S'/cp], plus `cp_index`
    [b, cp, S'/cp] and `document_ids` of the whole padded row [b, S'] (None when the rows are
    single sequences that need no padding), and `cp_source` [b, S']: the original row position
    of each padded-row position (-1 for padding). Other keys are kept as they are.

    `multiple` (default 2 cp): each document is padded to a multiple of it (2 cp x tp under sp,
    so the local shard also divides over tp)."""
    multiple = multiple or 2 * cp
    ids = mb["input_ids"]
    b, S = ids.shape
    docs = mb.get("document_ids")
    if docs is None:
        if S % multiple:
            raise LayoutError(f"sequence length {S} is not divisible by {multiple} (2 x cp, x tp under sp)")
        segments = [[(0, S)] for _ in range(b)]
    else:
        segments = [_runs(row) for row in docs.tolist()]
    # the padded row: each segment padded to `multiple`; every row padded to the longest
    S_pad = max(sum(_round_up(n, multiple) for _, n in segs) for segs in segments)
    src = torch.full((b, S_pad), -1, dtype=torch.long)  # position in the original row, -1 for padding
    pdocs = torch.full((b, S_pad), PAD_DOCUMENT, dtype=torch.long)
    for r, segs in enumerate(segments):
        at = 0
        for d, (start, n) in enumerate(segs):
            src[r, at: at + n] = torch.arange(start, start + n)
            pdocs[r, at: at + n] = d
            at += _round_up(n, multiple)
    index = torch.stack([torch.stack([_positions(segs, S_pad, multiple, cp, c) for c in range(cp)])
                         for segs in segments])  # [b, cp, S_pad / cp]
    local = index[:, cp_rank]  # [b, s_local] positions in the padded row
    from_row = src.gather(1, local)  # -1 where the padded row holds padding
    valid = from_row >= 0
    from_row = from_row.clamp_min(0)
    out = dict(mb)
    fill = {"input_ids": pad_id, "labels": -100, "position_ids": 0}
    for key, value in mb.items():
        if key == "document_ids" or not isinstance(value, Tensor) or value.shape[:2] != (b, S):
            continue
        extra = value.shape[2:]  # per-token tensors of any trailing shape
        where = from_row.to(value.device).view(b, -1, *[1] * len(extra)).expand(-1, -1, *extra)
        keep = valid.to(value.device).view(b, -1, *[1] * len(extra))
        out[key] = torch.where(keep, value.gather(1, where), fill.get(key, 0))
    needs_docs = docs is not None or S_pad != S
    out["document_ids"] = pdocs if needs_docs else None
    out["cp_index"] = index
    out["cp_source"] = src
    return out


def _runs(row: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of equal document id: [(start, length), ...]."""
    out, start = [], 0
    for i in range(1, len(row) + 1):
        if i == len(row) or row[i] != row[start]:
            out.append((start, i - start))
            start = i
    return out


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _zigzag(at: int, length: int, cp: int, rank: int) -> Tensor:
    """Positions of chunks `rank` and 2cp-1-rank of the segment [at, at + length)."""
    c = length // (2 * cp)
    first = torch.arange(at + rank * c, at + (rank + 1) * c)
    second = torch.arange(at + (2 * cp - 1 - rank) * c, at + (2 * cp - rank) * c)
    return torch.cat([first, second])


def _positions(segments, S_pad: int, multiple: int, cp: int, rank: int) -> Tensor:
    """Cp rank `rank`'s positions in the padded row: its two zigzag chunks of every padded
    segment, and of the row padding at the end, in row order."""
    at, parts = 0, []
    for _, n in segments:
        m = _round_up(n, multiple)
        parts.append(_zigzag(at, m, cp, rank))
        at += m
    if at < S_pad:
        parts.append(_zigzag(at, S_pad - at, cp, rank))
    return torch.cat(parts)


def gather_sequence(local: Tensor, cp_index: Tensor, cp_source: Tensor, length: int, group) -> Tensor:
    """Per-token values [b, s_local] of every cp rank back into one [b, length] tensor in the
    original row order, padding dropped: what DPO and GRPO need from per-token
    log-probabilities. Differentiable for this rank's part."""
    b = local.shape[0]
    parts = [torch.empty_like(local) for _ in range(group_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    parts[group_rank(group)] = local
    padded = torch.zeros(b, cp_source.shape[1], dtype=local.dtype, device=local.device)
    padded = padded.scatter(1, cp_index.reshape(b, -1).to(local.device), torch.cat(parts, dim=1))
    src = cp_source.to(local.device)
    target = torch.where(src >= 0, src, length)  # padding lands in a spare column, then is cut
    out = torch.zeros(b, length + 1, dtype=local.dtype, device=local.device).scatter(1, target, padded)
    return out[:, :length]


# -- masks -----------------------------------------------------------------------------------------
def block_mask(q_index: Tensor, k_index: Tensor, document_ids: Tensor | None, window: int | None) -> Tensor:
    """[b, sq, sk] True where the query at padded-row position q_index may see the key at k_index."""
    qi, kj = q_index[:, :, None], k_index[:, None, :]
    visible = kj <= qi
    if window is not None:
        visible = visible & (qi - kj < window)
    if document_ids is not None:
        visible = visible & (document_ids.gather(1, q_index)[:, :, None] == document_ids.gather(1, k_index)[:, None, :])
    return visible


# -- attention -------------------------------------------------------------------------------------
def context_parallel_attention(q: Tensor, k: Tensor, v: Tensor, *, cp_index: Tensor, document_ids: Tensor | None,
                               window: int | None, backend: str, ulysses_group, ring_group,
                               scale: float | None = None, sinks: Tensor | None = None) -> Tensor:
    """q [b, s_local, hq, d], k [b, s_local, hkv, d], v [b, s_local, hkv, dv] of this cp rank's
    tokens -> out [b, s_local, hq, dv]. sinks: [hq] attention-sink logits, or None."""
    if not q.dtype == k.dtype == v.dtype:  # packing K with V would silently promote both
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if sinks is not None and tuple(sinks.shape) != (q.shape[2],):
        raise ValueError(f"sinks must hold one logit per query head, [{q.shape[2]}], got {tuple(sinks.shape)}")
    U, R = group_size(ulysses_group), group_size(ring_group)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if backend == "flash_attn":  # the blocks carry explicit masks, which flash-attn does not take
        backend = "sdpa"
    b = q.shape[0]
    if U > 1:
        k, v = _replicate_kv(q.shape[2], k, v, U)
        q, k, v = (_AllToAll.apply(x, ulysses_group, True) for x in (q, k, v))
        if sinks is not None:  # this rank now holds head share u of U (see _all_to_all)
            n = sinks.shape[0] // U
            sinks = sinks[group_rank(ulysses_group) * n: (group_rank(ulysses_group) + 1) * n]
    # the token positions of each ring rank's block: its ulysses group's shards, in rank order
    blocks = cp_index.view(b, R, U * cp_index.shape[2])
    me = group_rank(ring_group)
    live = _live_hops(cp_index, blocks, me, document_ids, window)
    out = _RingAttention.apply(q, k, v, blocks, me, document_ids, window, backend, scale, ring_group, live, sinks)
    if U > 1:
        out = _AllToAll.apply(out, ulysses_group, False)
    return out


def _replicate_kv(hq: int, k: Tensor, v: Tensor, U: int) -> tuple[Tensor, Tensor]:
    hkv = k.shape[2]
    if hq % U:
        raise LayoutError(f"Ulysses splits the attention heads: {hq} query heads per tp rank are not divisible by "
                          f"the Ulysses degree {U}")
    if hkv % U == 0:
        return k, v
    if U % hkv:
        raise LayoutError(f"Ulysses degree {U} and the {hkv} KV heads per tp rank must divide one another")
    rep = U // hkv
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


class _AllToAll(torch.autograd.Function):
    """Ulysses' exchange. to_heads: [b, s, h, d] (own tokens, all heads) -> [b, U s, h/U, d]
    (the U ranks' tokens in rank order, this rank's heads); the reverse otherwise. The backward
    of one direction is the other. q, k and v go through one at a time, so V's head dim may
    differ from Q/K's."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads = group, to_heads
        return _all_to_all(x, group, to_heads)

    @staticmethod
    def backward(ctx, g):
        return _all_to_all(g.contiguous(), ctx.group, not ctx.to_heads), None, None


def _all_to_all(x: Tensor, group, to_heads: bool) -> Tensor:
    U = group_size(group)
    if to_heads:
        b, s, h, d = x.shape
        send = x.view(b, s, U, h // U, d).permute(2, 0, 1, 3, 4).contiguous()  # [U(dest), b, s, h/U, d]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # [U(source), b, s, h/U, d]
        return recv.permute(1, 0, 2, 3, 4).reshape(b, U * s, h // U, d)
    b, us, hu, d = x.shape
    s = us // U
    send = x.view(b, U, s, hu, d).permute(1, 0, 2, 3, 4).contiguous()  # [U(dest = token owner), b, s, h/U, d]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # [U(source = head group), b, s, h/U, d]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, s, U * hu, d)


class _RingAttention(torch.autograd.Function):
    """Attention of this rank's queries over the K/V blocks of every ring rank (see the module
    docstring). `blocks` [b, R, n] are the padded-row positions of each ring rank's tokens.

    With sinks, the merged (out, lse) becomes (out', lse') = apply_sinks(out, lse, sinks), and
    the backward needs nothing new for q, k, v: a sink is a key whose value is 0, so flash
    attention's backward on each block with the union's out' and lse' is exact (P' = exp(s -
    lse'), and rowsum(do * out') already is the D of the softmax over keys and sink). The sink's
    own gradient is that key's ds summed over queries: dsink_h = -sum_i exp(sink_h - lse'_i) D_i."""

    @staticmethod
    def forward(ctx, q, k, v, blocks, me, document_ids, window, backend, scale, group, live, sinks=None):
        R = blocks.shape[1]
        ring = _Ring(group)
        masks = _MaskMaker(blocks, me, document_ids, window, live)
        out = lse = None
        d = k.shape[-1]
        kv = _pack_kv(k, v)
        for t in range(R):
            pending = ring.shift([kv], tag=1) if t < R - 1 else None  # the next block travels meanwhile
            mask = masks(t)
            if mask is not None:
                o, l = attention(q, *_unpack_kv(kv, d), causal=False, mask=mask, scale=scale, backend=backend)
                out, lse = (o.float(), l) if out is None else merge_attention_blocks(out, lse, o, l)
            if pending is not None:
                (kv,) = pending.wait()
        if out is None:  # no query sees any key (all padding)
            out = torch.zeros((*q.shape[:3], v.shape[3]), dtype=torch.float32, device=q.device)
            lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, device=q.device)
        if sinks is not None:
            out, lse = apply_sinks(out, lse, sinks.detach())
        ctx.save_for_backward(q, k, v, out, lse, blocks, document_ids, sinks)
        ctx.me, ctx.window, ctx.backend, ctx.scale, ctx.group, ctx.live = me, window, backend, scale, group, live
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, blocks, document_ids, sinks = ctx.saved_tensors
        R = blocks.shape[1]
        ring = _Ring(ctx.group)
        masks = _MaskMaker(blocks, ctx.me, document_ids, ctx.window, ctx.live)
        dout = dout.float()
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[11]:
            rows = (dout * out).sum(-1).transpose(1, 2)  # D [b, s, h] -> [b, h, s]
            dsinks = -(torch.exp(sinks.float()[None, :, None] - lse) * rows).sum((0, 2)).to(sinks.dtype)
        lse_safe = torch.where(torch.isfinite(lse), lse, 0.0)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        d = k.shape[-1]
        kv = _pack_kv(k, v)
        dkv_done = None  # the accumulated dK/dV of the block handled last step, to pass on
        for t in range(R):
            kv_next = ring.shift([kv], tag=1) if t < R - 1 else None
            # the block held now arrives with the gradients of the ranks that handled it before
            dkv_in = ring.shift([dkv_done], tag=2) if t > 0 else None
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            mask = masks(t)
            if mask is not None:
                dq_b, dk_b, dv_b = _block_backward(q, *_unpack_kv(kv, d), mask, out, lse_safe, dout, ctx.scale,
                                                   ctx.backend)
                dq += dq_b
                dkv = _pack_kv(dk_b, dv_b)
            if dkv_in is not None:
                (incoming,) = dkv_in.wait()
                dkv = dkv + incoming
            dkv_done = dkv
            if kv_next is not None:
                (kv,) = kv_next.wait()
        if R > 1:  # one more hop brings each block's gradient home
            (dkv_done,) = ring.shift([dkv_done], tag=2).wait()
        dk, dv = _unpack_kv(dkv_done, d)
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None, None, None,
                dsinks)


def _pack_kv(k: Tensor, v: Tensor) -> Tensor:
    """K and V (or their gradients) as one tensor, so each ring hop is one message: stacked,
    [2, b, s, h, d], when their head dims agree (what it always was: no copy beyond the stack,
    and K and V come back as contiguous views); else concatenated along the head dim,
    [b, s, h, d + dv], one copy as well."""
    return torch.stack([k, v]) if k.shape[-1] == v.shape[-1] else torch.cat([k, v], dim=-1)


def _unpack_kv(kv: Tensor, d: int) -> tuple[Tensor, Tensor]:
    """Views of K and V in `_pack_kv`'s tensor; d is K's head dim. A stack has one more dim."""
    return (kv[0], kv[1]) if kv.dim() == 5 else (kv[..., :d], kv[..., d:])


def _block_backward(q, k, v, mask, out, lse, dout, scale, backend):
    """This block's share of dq and its dk, dv, in fp32.

    With the softmax over all blocks P_ij = exp(s_ij - lse_i) (lse of the union), a block's
    gradients are flash attention's backward run on that block with the union's out and lse:
    dv_j = sum_i P_ij do_i, ds = P (do v^T - rowsum(do * out)), dq = scale ds k, dk = scale ds^T q.
    On CPU with the sdpa backend that is one fused kernel call. Otherwise the block is recomputed
    with autograd: out = sum_j w_j o_j with w_j = exp(lse_j - lse), so dL/do_j = w_j dout and
    dL/dlse_j = w_j (dout . (o_j - out)).

    The CPU backward op, like its forward, needs one head dim for q, k, v (torch 2.13: "Q/K/V
    should have the same head size"); dv != d runs zero-padded to the larger one, as in
    kernels/attention.py. Zero columns of v, out and dout add nothing to do.v^T or
    rowsum(do * out), zero columns of q and k nothing to the scores, and the gradients' padded
    columns (all zero) are cut."""
    if q.device.type == "cpu" and backend in ("sdpa", "auto"):
        bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -math.inf)[:, None]
        d, dv = q.shape[-1], v.shape[-1]
        width = max(d, dv)
        t = lambda x: pad_head_dim(x, width).transpose(1, 2)  # noqa: E731 - [b, s, h, *] -> [b, h, s, width]
        gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            t(dout.to(q.dtype)), t(q), t(k), t(v), t(out.to(q.dtype)), lse, 0.0, False, attn_mask=bias, scale=scale)
        return (gq.transpose(1, 2)[..., :d].float(), gk.transpose(1, 2)[..., :d].float(),
                gv.transpose(1, 2)[..., :dv].float())
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    with torch.enable_grad():
        o, l = attention(qq, kk, vv, causal=False, mask=mask, scale=scale, backend=backend)
        w = torch.exp(l.detach() - lse)  # [b, h, s]
        g_out = (w.transpose(1, 2)[..., None] * dout).to(o.dtype)
        g_lse = w * (dout * (o.detach().float() - out)).sum(-1).transpose(1, 2)
        torch.autograd.backward([o, l], [g_out, g_lse])
    return qq.grad.float(), kk.grad.float(), vv.grad.float()


class _MaskMaker:
    """Step t of the ring holds the block of ring rank (me - t) mod R; `live[t]` says whether any
    of this rank's queries sees a key of it (see `_live_hops`)."""

    def __init__(self, blocks, me, document_ids, window, live):
        self.blocks, self.me, self.docs, self.window, self.live = blocks, me, document_ids, window, live

    def __call__(self, t: int) -> Tensor | None:
        if not self.live[t]:  # a block in every query's future (or other documents): skip it
            return None
        src = (self.me - t) % self.blocks.shape[1]
        return block_mask(self.blocks[:, self.me], self.blocks[:, src], self.docs, self.window)


def _live_hops(cp_index: Tensor, blocks: Tensor, me: int, document_ids: Tensor | None,
               window: int | None) -> tuple[bool, ...]:
    """Per ring step, whether any query of this rank sees any key of the block it holds then.
    Deciding to skip needs the answer on the host, a sync; asked once for all steps, and kept on
    the cp_index tensor, which every layer of a micro batch shares, so a micro batch pays it
    once per window size rather than once per hop and layer."""
    if cp_index.is_meta or is_fake(cp_index):  # shapes only (meta device, the dry run): every hop
        return (True,) * blocks.shape[1]    # runs, as with full causal rows (zigzag) and no window
    key = (me, blocks.shape[1], window, 0 if cp_index.is_inference() else cp_index._version)
    cache = getattr(cp_index, "_megaswift_live_hops", None)
    if cache is None:
        cache = cp_index._megaswift_live_hops = {}
    if key not in cache:
        R = blocks.shape[1]
        anys = [block_mask(blocks[:, me], blocks[:, (me - t) % R], document_ids, window).any() for t in range(R)]
        cache[key] = tuple(bool(a) for a in torch.stack(anys).tolist())
    return cache[key]


class _Ring:
    """Send to the next ring rank, receive from the previous one, asynchronously."""

    def __init__(self, group):
        self.group = group
        ranks = dist.get_process_group_ranks(group) if group is not None else [0]
        me = group_rank(group)
        self.next, self.prev = ranks[(me + 1) % len(ranks)], ranks[(me - 1) % len(ranks)]

    def shift(self, tensors: list[Tensor], tag: int) -> "_Pending":
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group, tag) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group, tag) for r in recv]
        return _Pending(dist.batch_isend_irecv(ops), recv)


class _Pending:
    def __init__(self, works, recv):
        self.works, self.recv = works, recv

    def wait(self) -> list[Tensor]:
        for w in self.works:
            w.wait()
        beat()
        return self.recv

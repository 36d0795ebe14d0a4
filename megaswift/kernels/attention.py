"""Attention that returns (out, lse), so that blocks over disjoint keys can be merged.

Every backend computes the same thing: softmax(scale * q k^T + mask) v per query head, plus the
natural-log log-sum-exp (lse) of the scaled, masked scores. Ring attention (parallel/) computes
attention of local queries against one key block at a time and combines the partial results with
`merge_attention_blocks`, which needs each block's lse.

Backends:
  reference   plain torch in float32; the ground truth for tests, differentiable by autograd.
  sdpa        torch's fused kernels that also return the lse: on CPU
              `aten._scaled_dot_product_flash_attention_for_cpu`; on CUDA the flash or
              memory-efficient aten kernels (see attention_cuda.py).
  flash_attn  the flash-attn package (CUDA, `pip install 'megaswift[gpu]'`): packed documents
              run as variable-length sequences, so no [s, s] mask is ever built.
  auto        CUDA: flash_attn when installed (half precision, no explicit mask), else sdpa.
              CPU: sdpa. Measured on torch 2.13 CPU against the reference over the cases of
              tests/unit/test_attention.py (fp32; causal, documents, window, GQA, batch 2):
              max |diff| out 3.0e-7, lse 4.8e-7, grads of q/k/v 1.9e-6 with the lse term in
              the loss (the reference itself is within 9.1e-7 of float64); bf16: out 7.8e-3,
              grads 3.1e-2. Forward + backward, 8 heads x 64, 2 threads: 3-18x faster than
              the reference at s = 1024-2048 (0.13 s vs 2.4 s causal at 2048).

Gradients through lse: the fused kernels return lse as a non-differentiable output, which would
silently drop the lse term of ring attention's gradient. `_LseGrad` restores it (see there).

Head dims: v's head dim dv may differ from q/k's d (multi-latent attention, DeepSeek-V3: d 192,
dv 128); out then has dv. The fused kernels that need equal head dims (the CPU op, aten's flash
kernel, flash-attn 2) get zero columns: padding v (or q and k, when dv > d) to the larger dim
changes no score and no real output column, the scale is passed explicitly, the padded output
columns are cut, and the pad's backward drops the padded columns' gradients. Equal head dims
pad nothing (no copy).

Masks: `causal` (query i sees keys j <= i), `document_ids` (packed sequences: a query sees only
keys of its own document id), `window` (HF Mistral's sliding window: key j is visible to query i
only if i - j < window). They combine. A query that sees no key gets out = 0 and lse = -inf,
never NaN, which ring attention relies on for blocks that lie entirely in a query's future.

Attention sinks (gpt-oss): `sinks` [hq] is a learned logit per query head that joins every row's
softmax denominator as a key without a value, p_ij = exp(s_ij) / (sum_j exp(s_ij) + exp(sink_h)).
Then out is that attention and lse the log of the whole denominator, logaddexp(lse, sink). The
reference adds the sink term to its own softmax; the fused kernels know nothing of sinks, so their
(out, lse) is rescaled after the kernel by `apply_sinks`: out * sigmoid(lse - sink) per head and
query, which needs the lse gradient (`_LseGrad`) on every backward, not only under ring attention.
A sinked (out, lse) no longer merges with other blocks (the sink would count once per block):
context parallelism merges plain blocks and applies the sinks once, to the union.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import attention_cuda

BACKENDS = ("auto", "reference", "sdpa", "flash_attn")

_TINY = torch.finfo(torch.float32).tiny


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, document_ids: Tensor | None = None,
              window: int | None = None, scale: float | None = None, backend: str = "auto",
              mask: Tensor | None = None, sinks: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """q [b, s, hq, d], k [b, s, hkv, d], v [b, s, hkv, dv] (hq % hkv == 0: GQA, each kv head
    serves hq/hkv consecutive query heads, as in HF's repeat_kv; dv may differ from d). Returns
    out [b, s, hq, dv] (dtype of q) and lse [b, hq, s] float32: the natural-log log-sum-exp of
    the scaled, masked scores per query.

    document_ids: [b, s] int; the flash_attn backend also assumes each document is one
    contiguous run of tokens (what packing produces). scale defaults to d ** -0.5.
    mask: an explicit boolean [b or 1, s_q, s_k] (True = visible) that replaces causal,
    document_ids and window (pass causal=False with it); k/v may then have another sequence
    length than q. Ring attention uses it for the blocks of a split key set. Not supported by
    flash_attn.
    sinks: [hq] logits of attention sinks (see the module docstring); out and lse then include
    the sink, and lse can no longer be merged with other blocks'.
    """
    _check_inputs(q, k, v, causal, document_ids, window, mask)
    if sinks is not None and tuple(sinks.shape) != (q.shape[2],):
        raise ValueError(f"sinks must hold one logit per query head, [{q.shape[2]}], got {tuple(sinks.shape)}")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    backend = _resolve_backend(backend, q, v, mask)
    if backend == "reference":
        return _reference(q, k, v, _visible_keys(q, k, causal, document_ids, window, mask), scale, sinks)

    # a plain causal (or unmasked) square attention needs no mask tensor in any fused kernel,
    # and flash_attn never needs one: documents become variable-length sequences
    plain = document_ids is None and window is None and mask is None
    visible = None if plain or backend == "flash_attn" else _visible_keys(q, k, causal, document_ids, window, mask)
    if backend == "flash_attn":
        if mask is not None:
            raise ValueError("backend='flash_attn' takes no explicit mask; use backend='sdpa' or 'reference'")
        kernel = functools.partial(attention_cuda.flash_attn_varlen, causal=causal, document_ids=document_ids,
                                   window=window, scale=scale)
    elif q.is_cuda:
        kernel = functools.partial(attention_cuda.sdpa, visible=visible, causal=causal and plain, scale=scale)
    elif q.device.type == "cpu":
        bias = None
        if visible is not None:
            # the CPU op rejects a boolean mask ("Attention mask is the same data type as
            # query"): give it an additive one in q's dtype, [b, 1, s_q, s_k] shared by all heads
            bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill_(~visible, -math.inf)[:, None]
        kernel = functools.partial(_sdpa_cpu, bias=bias, is_causal=causal and plain, scale=scale)
    else:
        raise ValueError(f"backend='sdpa' supports cpu and cuda tensors, got {q.device.type}; use backend='reference'")

    out, lse = kernel(q, k, v)
    lse = _LseGrad.apply(lse.detach(), q, k, kernel, scale)
    if visible is not None:
        # kernels disagree on rows that see no key (CPU: lse 0, CUDA: a uniform softmax over
        # the finite bias); pin them to the reference's out 0 and lse -inf. torch.where sends
        # zero gradient to those rows, so the kernels' backward ignores them as well.
        seen = visible.any(-1)  # [b, s_q]
        out = torch.where(seen[:, :, None, None], out, 0.0)
        lse = torch.where(seen[:, None, :], lse, -math.inf)
    if sinks is not None:
        out, lse = apply_sinks(out, lse, sinks)
    return out, lse


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Attention over keys -> attention over the same keys plus a sink per head (no value).

    out [b, s, h, dv], lse [b, h, s] of the keys alone, sinks [h]. The sink only enlarges each
    row's denominator from exp(lse) to exp(lse) + exp(sink), so every probability, and out, is
    scaled by exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink): no exp() of a large
    number, 0 for a row that sees no key (lse = -inf), whose new lse is the sink's. Returns
    (out in out's dtype, lse' = logaddexp(lse, sink) float32); differentiable in out, lse and
    sinks (d out'/d sink = -out' exp(sink - lse'))."""
    sink = sinks.float()[None, :, None]  # [1, h, 1] against lse [b, h, s]
    lse = lse.float()
    keep = torch.sigmoid(lse - sink).transpose(1, 2)[..., None]  # [b, h, s] -> [b, s, h, 1]
    return (out.float() * keep).to(out.dtype), torch.logaddexp(lse, sink.expand_as(lse))


def merge_attention_blocks(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets into the attention over their union.

    out_* [b, s, h, d], lse_* [b, h, s]. The union's lse is logaddexp(lse_a, lse_b) and each
    block's output is weighted by exp(lse_block - lse). Computed in float32; out comes back in
    out_a's dtype (ring attention can keep a float32 accumulator by passing one). A row with
    lse = -inf in one block takes the other block unchanged; -inf in both gives out 0, lse -inf.
    Differentiable, without NaN, for all such rows.
    """
    lse_a, lse_b = lse_a.float(), lse_b.float()
    # shift by the larger lse so exp() cannot overflow; any shift is exact, so it is detached.
    # Where both are -inf the shift is 0 and both weights are exactly 0.
    shift = torch.maximum(lse_a, lse_b).detach()
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    w_a, w_b = torch.exp(lse_a - shift), torch.exp(lse_b - shift)
    total = w_a + w_b
    lse = torch.where(total > 0, total.clamp_min(_TINY).log() + shift, -math.inf)
    total = total.clamp_min(_TINY)
    # [b, h, s] -> [b, s, h, 1] to scale out rows
    weight_a = (w_a / total).transpose(1, 2)[..., None]
    weight_b = (w_b / total).transpose(1, 2)[..., None]
    out = weight_a * out_a.float() + weight_b * out_b.float()
    return out.to(out_a.dtype), lse


def _resolve_backend(backend: str, q: Tensor, v: Tensor, mask: Tensor | None) -> str:
    return choose_backend(backend, q.device.type, q.dtype, q.shape[-1], mask is not None, v_head_dim=v.shape[-1])


def choose_backend(backend: str, device_type: str, dtype: torch.dtype, head_dim: int, has_mask: bool,
                   v_head_dim: int | None = None) -> str:
    """The backend `auto` stands for (others are returned as given, once checked). On CUDA:
    flash_attn where the package imports, the inputs are half precision, no explicit mask is
    given and the head dims fit its kernels; sdpa otherwise. On CPU: sdpa. v_head_dim (default
    head_dim) counts too: flash-attn runs both at the larger of the two (see flash_attn_varlen)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if device_type == "cuda":
        widest = max(head_dim, head_dim if v_head_dim is None else v_head_dim)
        fits = dtype in attention_cuda.HALF and widest <= attention_cuda.FLASH_MAX_HEAD_DIM and not has_mask
        return "flash_attn" if fits and attention_cuda.flash_attn_available() else "sdpa"
    return "sdpa" if device_type == "cpu" else "reference"


def _check_inputs(q, k, v, causal, document_ids, window, mask) -> None:
    # v may have its own head dim (multi-latent attention); batch, positions and heads match k's
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"q, k, v must be [batch, seq, heads, head_dim] with k and v alike but for head_dim; got "
                         f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        # the fused kernels read all three buffers in q's dtype; aten's memory-efficient kernel
        # does not check, so a bf16 v next to fp32 q/k would be read as fp32 garbage on CUDA
        raise ValueError(f"q, k, v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype} "
                         f"(cast q and k to v's compute dtype after RoPE)")
    b, s_q, hq, d = q.shape
    _, s_k, hkv, _ = k.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim")
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of kv heads ({hkv})")
    if mask is not None:
        if causal or document_ids is not None or window is not None:
            raise ValueError("an explicit mask replaces causal, document_ids and window: pass causal=False and "
                             "leave the other two None")
        if mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] not in (1, b) or mask.shape[1:] != (s_q, s_k):
            raise ValueError(f"mask must be boolean [{b} or 1, {s_q}, {s_k}], got {mask.dtype} {tuple(mask.shape)}")
        return
    if s_q != s_k:
        raise ValueError(f"q has {s_q} positions and k has {s_k}: different lengths need an explicit mask")
    if document_ids is not None and tuple(document_ids.shape) != (b, s_q):
        raise ValueError(f"document_ids must be [batch, seq] = [{b}, {s_q}], got {tuple(document_ids.shape)}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 (key j is visible to query i when i - j < window), got {window}")


def _visible_keys(q, k, causal, document_ids, window, mask) -> Tensor | None:
    """Boolean [b, s_q, s_k], True where query i may see key j; None when every key is visible."""
    b, s_q, s_k = q.shape[0], q.shape[1], k.shape[1]
    if mask is not None:
        return mask.to(q.device).expand(b, s_q, s_k)
    if not causal and document_ids is None and window is None:
        return None
    i = torch.arange(s_q, device=q.device)[:, None]
    j = torch.arange(s_k, device=q.device)[None, :]
    visible = torch.ones(1, s_q, s_k, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible & (j <= i)
    if window is not None:
        visible = visible & (i - j < window)
    if document_ids is not None:
        ids = document_ids.to(q.device)
        visible = visible & (ids[:, :, None] == ids[:, None, :])
    return visible.expand(b, s_q, s_k)


def _reference(q, k, v, visible, scale, sinks=None):
    hq, hkv = q.shape[2], k.shape[2]
    if hq != hkv:
        k, v = k.repeat_interleave(hq // hkv, dim=2), v.repeat_interleave(hq // hkv, dim=2)
    qh, kh, vh = (x.float().transpose(1, 2) for x in (q, k, v))  # [b, h, s, d]
    scores = (qh @ kh.transpose(-1, -2)) * scale  # [b, hq, s_q, s_k]
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None], -math.inf)
    # softmax through a finite shift, so a row with every key masked gives exp() = 0 everywhere,
    # then out 0 and lse -inf, instead of the NaN of (-inf) - (-inf); its gradients stay 0.
    shift = scores.amax(-1, keepdim=True)
    sink = None if sinks is None else sinks.float()[None, :, None, None]  # [1, hq, 1, 1]
    if sink is not None:  # the sink is one more logit of each row (gpt-oss's eager attention)
        shift = torch.maximum(shift, sink)
    shift = shift.detach()
    shift = torch.where(torch.isfinite(shift), shift, 0.0)
    e = torch.exp(scores - shift)
    total = e.sum(-1, keepdim=True)
    if sink is not None:
        total = total + torch.exp(sink - shift)
    lse = torch.where(total > 0, total.clamp_min(_TINY).log() + shift, -math.inf)
    probs = e / total.clamp_min(_TINY)  # = exp(scores - lse) where any key is visible
    out = probs @ vh  # [b, hq, s_q, dv]
    return out.transpose(1, 2).to(q.dtype), lse.squeeze(-1)


def _sdpa_cpu(q, k, v, *, bias, is_causal, scale):
    """[b, s, h, d] in and out. The op takes [b, h, s, d] views (any strides), handles GQA itself
    (measured: bitwise equal to repeat_interleave of k/v, gradients included) and is
    differentiable in out through its registered backward; its lse has no gradient.

    The op needs one head dim for q, k and v: torch 2.13 raises "Q/K/V should have the same head
    size" for v's 12 or 128 beside q/k's 20 or 192 (fp32 and bf16, forward and its backward op
    alike), so dv != d runs zero-padded to the larger dim (see the module docstring). Padded, at
    d/dv 20/12 and 12/20 (fp32; causal, documents, window, GQA), out, lse and the q/k/v gradients
    with the lse term measured within 2.3e-6 of the reference, as equal head dims are (1.7e-6)."""
    d, dv = q.shape[-1], v.shape[-1]
    width = max(d, dv)
    q, k, v = pad_head_dim(q, width), pad_head_dim(k, width), pad_head_dim(v, width)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, is_causal, attn_mask=bias, scale=scale)
    return out.transpose(1, 2)[..., :dv], lse


def pad_head_dim(x: Tensor, width: int) -> Tensor:
    """x with zero columns appended to its last dim up to `width`; x itself when it is that wide
    already (no copy)."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


class _LseGrad(torch.autograd.Function):
    """Identity on lse whose backward adds d(lse)/d(q, k), which the fused kernels leave out.

    With P = softmax(scale * q k^T + mask) and g = dL/dlse [b, hq, s_q]:
        dq_i = scale * g_i * sum_j P_ij k_j = scale * g_i * attention(q, k, values=k)_i
        dk_j = scale * sum_i P_ij g_i q_i    = the value-gradient of attention(q, k, v) for
                                               incoming gradient g * q
    so the same kernel computes both (GQA included: the value-gradient sums over each kv head's
    query heads). Costs one extra forward and one forward+backward, and only when lse is used in
    the loss (ring attention's merge), not for ordinary training. Neither call involves v: both
    pass values of k's head dim d (k itself, and zeros like k), so dv != d changes nothing here.
    """

    @staticmethod
    def forward(ctx, lse, q, k, kernel, scale):
        # the kernel's tensor arguments (its mask or visibility, document ids) are saved as
        # tensors, not held inside the partial: activation checkpointing then drops them, and
        # they leave with the graph (the planner's measured memory, planner/layer_terms.py)
        tensors = {}
        if isinstance(kernel, functools.partial):
            tensors = {n: v for n, v in kernel.keywords.items() if isinstance(v, torch.Tensor)}
            kernel = functools.partial(kernel.func, *kernel.args,
                                       **{n: v for n, v in kernel.keywords.items() if n not in tensors})
        ctx.save_for_backward(q, k, *tensors.values())
        ctx.kernel, ctx.names, ctx.scale = kernel, tuple(tensors), scale
        return lse.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        q, k, *tensors = ctx.saved_tensors
        kernel = functools.partial(ctx.kernel, **dict(zip(ctx.names, tensors))) if ctx.names else ctx.kernel
        g = g.transpose(1, 2)[..., None]  # [b, hq, s] -> [b, s, hq, 1] to scale q rows
        dq = dk = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                pk, _ = kernel(q, k, k)
            dq = (ctx.scale * g * pk.float()).to(q.dtype)
        if ctx.needs_input_grad[2]:
            with torch.enable_grad():
                v0 = torch.zeros_like(k, requires_grad=True)
                out0, _ = kernel(q.detach(), k.detach(), v0)
                (dk,) = torch.autograd.grad(out0, v0, (g * q.float()).to(q.dtype))
            dk = dk * ctx.scale
        return None, dq, dk, None, None

"""CUDA attention kernels behind kernels/attention.py: [b, s, h, d] in, (out, lse [b, h, s]) out.

Written from the op schemas of torch 2.13 and flash-attn 2.6+; verified only on a GPU, by the
`gpu` tests in tests/unit/test_attention.py (they compare every path with the reference).

v's head dim dv may differ from q/k's d (multi-latent attention). aten's flash kernel and
flash-attn 2 need one head dim for q, k and v (torch's sdp_utils `check_head_dim_size_flash`;
flash-attn checks v against q's shape), so there the narrower side gets zero columns up to the
wider one and the output is cut back to dv. aten's memory-efficient kernel takes dv natively
(sdp_utils `check_head_dim_size_mem_efficient` asks only q/k equal and each of d, dv aligned; its
forward and backward size out and dV from value.size(-1)), so it pads each to its own alignment.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

aten = torch.ops.aten

# the memory-efficient kernel reads the bias in rows whose stride must be aligned; torch's own
# scaled_dot_product_attention pads the last dim to a multiple of 16 and slices, as done here
_BIAS_ALIGN = 16
HALF = (torch.float16, torch.bfloat16)
FLASH_MAX_HEAD_DIM = 256  # both flash kernels (aten's and the package's) stop here


@functools.cache
def flash_attn_status() -> tuple[bool, str]:
    """(usable, why not). The package is imported, not merely found: a flash-attn wheel built
    for another torch or CUDA is found by importlib but fails to load its extension
    ('undefined symbol ...'), and `auto` must then fall back to sdpa instead of failing at the
    first forward."""
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, OSError and friends all mean "not usable"
        first = (str(e).strip().splitlines() or [""])[0]
        return False, f"{type(e).__name__}: {first}"
    return True, ""


def flash_attn_available() -> bool:
    return flash_attn_status()[0]


def head_dim_multiple(dtype: torch.dtype) -> int:
    """The head-dim alignment of aten's fused CUDA kernels: 16 bytes of half precision (their
    tensor-core tiles; the memory-efficient kernel has no unaligned bf16/fp16 variant and fails
    with 'cutlassF: no kernel found to launch'), 4 elements in fp32 (torch's own sdpa check)."""
    return 8 if dtype in HALF else 4


def sdpa_kernel(dtype: torch.dtype, head_dim: int, masked: bool, v_head_dim: int | None = None) -> tuple[str, int, int]:
    """Which aten kernel `sdpa` runs, and the head dims it pads q/k and v to: ("flash" |
    "efficient", padded q/k head dim, padded v head dim). flash takes no mask and half precision
    only; the rest is memory-efficient. A head dim off the alignment is zero-padded (as torch's
    public sdpa does): zero columns add nothing to q.k, the scale is passed explicitly, and the
    padded output columns are cut. v_head_dim defaults to head_dim; flash needs the two equal, so
    both go to the larger (see the module docstring), the memory-efficient kernel keeps them apart."""
    m = head_dim_multiple(dtype)
    dv = head_dim if v_head_dim is None else v_head_dim
    padded, padded_v = -(-head_dim // m) * m, -(-dv // m) * m
    widest = max(padded, padded_v)
    if not masked and dtype in HALF and widest <= FLASH_MAX_HEAD_DIM:
        return "flash", widest, widest
    return "efficient", padded, padded_v


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, visible: Tensor | None, causal: bool, scale: float):
    """torch's fused CUDA kernels. visible: boolean [b, s_q, s_k] or None (then `causal` alone).

    Without a mask, half precision goes to the flash kernel; masks (documents, window, ring
    blocks) and fp32 go to the memory-efficient kernel with an additive [b, 1, s_q, s_k] bias,
    which costs s_q * s_k memory per row: for long packed sequences prefer backend='flash_attn'.
    v's head dim may differ from q/k's: out is [b, s, hq, v.shape[-1]].
    """
    d, dv = q.shape[-1], v.shape[-1]
    kernel, padded, padded_v = sdpa_kernel(q.dtype, d, visible is not None, v_head_dim=dv)
    q, k, v = _pad_head_dim(q, padded), _pad_head_dim(k, padded), _pad_head_dim(v, padded_v)
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h, s, d]
    b, hq, s_q, _ = qh.shape
    if kh.shape[1] != hq:  # neither aten kernel takes GQA: repeat kv heads as HF's repeat_kv
        kh, vh = kh.repeat_interleave(hq // kh.shape[1], dim=1), vh.repeat_interleave(hq // vh.shape[1], dim=1)
    if kernel == "flash":
        # no mask argument, half precision only; returns lse [b, h, s_q] float32
        out, lse = aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False, scale=scale)[:2]
        return out.transpose(1, 2)[..., :dv], lse
    bias = None
    if visible is not None:
        s_k = kh.shape[2]
        padded = -(-s_k // _BIAS_ALIGN) * _BIAS_ALIGN
        # a finite floor instead of -inf: a row that sees no key then gives a uniform softmax
        # (which attention() overwrites with out 0, lse -inf) instead of NaN inside the kernel.
        # -1e30 rather than finfo.min leaves room for the kernel's log2(e) rescaling in float32
        # (onnxruntime uses the same value for this kernel); fp16 cannot hold it, so its own min.
        floor = max(torch.finfo(q.dtype).min, -1e30)
        bias = torch.full((b, 1, s_q, padded), floor, dtype=q.dtype, device=q.device)
        bias[..., :s_k].masked_fill_(visible[:, None], 0.0)
        bias = bias[..., :s_k].expand(b, hq, s_q, s_k)
    out, lse = aten._scaled_dot_product_efficient_attention(qh, kh, vh, bias, True, 0.0, causal, scale=scale)[:2]
    # the kernel pads lse to a multiple of 32 positions (see torch's meta registration)
    return out.transpose(1, 2)[..., :dv], lse[..., :s_q]


def _pad_head_dim(x: Tensor, width: int) -> Tensor:
    """Zero columns appended to the head dim up to `width`; x itself (no copy) when it is that wide."""
    return x if x.shape[-1] == width else F.pad(x, (0, width - x.shape[-1]))


def flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, document_ids: Tensor | None,
                      window: int | None, scale: float):
    """The flash-attn package: every document (or every row without document_ids) is one
    variable-length sequence, so packed batches cost no [s, s] mask. Assumes each document is one
    contiguous run of tokens. flash-attn handles GQA itself (same head grouping as repeat_kv).
    flash-attn 2 takes one head dim for q, k and v, so dv != d runs at the larger of the two (zero
    columns, see the module docstring); the package rounds that up to its own alignment itself."""
    usable, why = flash_attn_status()
    if not usable:
        raise ImportError(f"attention backend 'flash_attn' needs a working flash-attn package (CUDA only), and "
                          f"importing it failed ({why}): pip install 'megaswift[gpu]' against this torch, or use "
                          f"backend='sdpa'")
    from flash_attn import flash_attn_varlen_func

    if not q.is_cuda:
        raise ValueError(f"attention backend 'flash_attn' runs on CUDA only, got {q.device}; use backend='sdpa'")
    b, s, hq, _ = q.shape
    dv = v.shape[-1]
    width = max(q.shape[-1], dv)
    q, k, v = (_pad_head_dim(x, width).reshape(b * s, -1, width) for x in (q, k, v))
    cu_seqlens, max_len = varlen_layout(document_ids, b, s, q.device)
    # flash's window (left, right) shows keys i - left <= j <= i + right; ours is i - j < window
    window_size = (-1, -1) if window is None else (window - 1, 0 if causal else -1)
    out, lse, _ = flash_attn_varlen_func(
        q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=causal,
        window_size=window_size, return_attn_probs=True)
    # flash-attn >= 2.6 returns the varlen lse unpadded, [hq, b * s]
    return out.view(b, s, hq, width)[..., :dv], lse.view(hq, b, s).transpose(0, 1)


def varlen_layout(document_ids: Tensor | None, b: int, s: int, device) -> tuple[Tensor, int]:
    """(cu_seqlens int32 [n_docs + 1], longest document) of the rows, each document one
    sequence. With documents this costs host syncs (nonzero, and the max the kernel sizes its
    grid with), so the result rides on the document_ids tensor itself: every layer of a micro
    batch gets the same tensor and pays nothing after the first; a new micro batch is a new
    tensor, and an in-place change bumps its version."""
    if document_ids is None:
        return torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=device), s
    version = 0 if document_ids.is_inference() else document_ids._version  # inference tensors keep none
    cached = getattr(document_ids, "_megaswift_varlen", None)
    if cached is not None and cached[0] == version:
        return cached[1], cached[2]
    starts = torch.ones(b, s, dtype=torch.bool, device=device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    end = torch.tensor([b * s], device=device)
    cu_seqlens = torch.cat([starts.flatten().nonzero().flatten(), end]).to(torch.int32)
    max_len = int(cu_seqlens.diff().max())
    document_ids._megaswift_varlen = (version, cu_seqlens, max_len)
    return cu_seqlens, max_len

"""CUDA attention kernels behind kernels/attention.py: [b, s, h, d] in, (out, lse [b, h, s]) out.

Written from the op schemas of torch 2.13 and flash-attn 2.6+; verified only on a GPU, by the
`gpu` tests in tests/unit/test_attention.py (they compare every path with the reference).
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

aten = torch.ops.aten

# the memory-efficient kernel reads the bias in rows whose stride must be aligned; torch's own
# scaled_dot_product_attention pads the last dim to a multiple of 16 and slices, as done here
_BIAS_ALIGN = 16


@functools.cache
def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, visible: Tensor | None, causal: bool, scale: float):
    """torch's fused CUDA kernels. visible: boolean [b, s_q, s_k] or None (then `causal` alone).

    Without a mask, half precision goes to the flash kernel; masks (documents, window, ring
    blocks) and fp32 go to the memory-efficient kernel with an additive [b, 1, s_q, s_k] bias,
    which costs s_q * s_k memory per row: for long packed sequences prefer backend='flash_attn'.
    """
    qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [b, h, s, d]
    b, hq, s_q, d = qh.shape
    if kh.shape[1] != hq:  # neither aten kernel takes GQA: repeat kv heads as HF's repeat_kv
        kh, vh = kh.repeat_interleave(hq // kh.shape[1], dim=1), vh.repeat_interleave(hq // vh.shape[1], dim=1)
    if visible is None and q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256:
        # flash: no mask argument, half precision only; returns lse [b, h, s_q] float32
        out, lse = aten._scaled_dot_product_flash_attention(qh, kh, vh, 0.0, causal, False, scale=scale)[:2]
        return out.transpose(1, 2), lse
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
    return out.transpose(1, 2), lse[..., :s_q]


def flash_attn_varlen(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, document_ids: Tensor | None,
                      window: int | None, scale: float):
    """The flash-attn package: every document (or every row without document_ids) is one
    variable-length sequence, so packed batches cost no [s, s] mask. Assumes each document is one
    contiguous run of tokens. flash-attn handles GQA itself (same head grouping as repeat_kv)."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise ImportError("attention backend 'flash_attn' needs the flash-attn package (CUDA only): "
                          "pip install 'megaswift[gpu]', or use backend='sdpa'") from e
    if not q.is_cuda:
        raise ValueError(f"attention backend 'flash_attn' runs on CUDA only, got {q.device}; use backend='sdpa'")
    b, s, hq, d = q.shape
    if document_ids is None:
        cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=q.device)
        max_len = s
    else:
        starts = torch.ones(b, s, dtype=torch.bool, device=q.device)
        starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
        end = torch.tensor([b * s], device=q.device)
        cu_seqlens = torch.cat([starts.flatten().nonzero().flatten(), end]).to(torch.int32)
        max_len = int(cu_seqlens.diff().max())  # a host sync: the kernel sizes its grid with it
    # flash's window (left, right) shows keys i - left <= j <= i + right; ours is i - j < window
    window_size = (-1, -1) if window is None else (window - 1, 0 if causal else -1)
    out, lse, _ = flash_attn_varlen_func(
        q.reshape(b * s, hq, d), k.reshape(b * s, -1, d), v.reshape(b * s, -1, d), cu_seqlens, cu_seqlens,
        max_len, max_len, dropout_p=0.0, softmax_scale=scale, causal=causal, window_size=window_size,
        return_attn_probs=True)
    # flash-attn >= 2.6 returns the varlen lse unpadded, [hq, b * s]
    return out.view(b, s, hq, d), lse.view(hq, b, s).transpose(0, 1)

"""Gated DeltaNet (Qwen3-Next, Qwen3.5): the `gated_deltanet` token mixer, a linear attention
with a recurrent state, computed as transformers' Qwen3NextGatedDeltaNet:

    [q, k, v, z] = in_proj_qkvz x       grouped per key head: [q_h, k_h, v and z of its value heads]
    [b, a]       = in_proj_ba x         per key head: its value heads' beta and decay inputs
    q, k, v      = silu(causal depthwise conv1d([q; k; v]))   kernel linear_conv_kernel_dim
    beta         = sigmoid(b);  g = -exp(A_log) softplus(a + dt_bias)
    o            = gated delta rule(q, k, v, g, beta)          kernels/gated_delta.py
    out          = out_proj(RMSNorm(o) * silu(z))              the norm per value head

Tensor parallelism splits the key heads (each with its value heads) like attention heads: the
projections are column-parallel by key-head group, the conv's channels and A_log / dt_bias follow
their heads, out_proj is row-parallel, and the per-head norm weight is replicated (its gradient
a partial sum over tp). Under sequence parallelism the in-projections gather the sequence and
out_proj scatters it back, as for attention.

Packed documents: the conv does not reach across a document start and the delta rule's state
restarts there (`document_ids`), so a packed row equals its documents run one by one.
Context parallelism is refused for now: the layer needs its tokens in order (see
kernels/gated_delta.py for the affine-in-state pieces a cp version would combine).

Incremental decoding (rollouts, models/kv_cache.py): per row the cache holds the conv state (the
last K-1 conv inputs, [b, K-1, channels]) and the recurrent state ([b, value heads, dk, dv],
float32), both zero before the prompt. A forward zeroes the hidden states of its invalid tokens
(left padding, finished rows' filler) as transformers' apply_mask_to_padding_states does: zero
inputs from a zero state leave both states at zero, so left padding changes nothing. The conv
continues from the stored inputs; the delta rule runs chunked from the stored state (prefill) or
one recurrent step (decode), and both states are replaced by the ones after the new tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megaswift.errors import ConfigError, LayoutError
from megaswift.kernels.gated_delta import gated_delta_rule, gated_delta_step
from megaswift.parallel.grads import mark_tp_partial_grad
from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear

from .config import ModelConfig


class GatedRMSNorm(nn.Module):
    """RMSNorm over each value head, then times silu(gate) (HF Qwen3NextRMSNormGated): normalised
    in fp32, scaled in the input dtype, gated in fp32."""

    def __init__(self, size: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x32.to(dtype) * F.silu(gate.float())).to(dtype)


def causal_conv(x: torch.Tensor, weight: torch.Tensor, document_ids: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv along the sequence: x [b, s, c], weight [c, K] -> [b, s, c], where
    out_t = sum_j w[:, K-1-j] x_{t-j} over j < K and t-j in the same document as t (torch's
    Conv1d with padding K-1, cut to s, when there is one document). K shifted products, no
    [s, s] anything."""
    K, w = weight.shape[-1], weight
    out = x * w[:, K - 1]
    for j in range(1, K):
        shifted = F.pad(x, (0, 0, j, 0))[:, : x.shape[1]]  # x_{t-j}, zeros before the row
        if document_ids is not None:
            same = document_ids == F.pad(document_ids, (j, 0), value=-1)[:, : x.shape[1]]
            shifted = shifted * same[..., None].to(x.dtype)
        out = out + shifted * w[:, K - 1 - j]
    return out


class GatedDeltaNet(nn.Module):
    """The token mixer contract of models/blocks.py (see SelfAttention)."""

    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None):
        super().__init__()
        tp = st.tp_size
        hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        if hk % tp or hv % hk:
            raise ConfigError(f"Gated DeltaNet splits its {hk} key heads over tp={tp} (each with its "
                              f"{hv // max(hk, 1)} value heads): tp must divide them and they must divide the "
                              f"{hv} value heads")
        if st.cp_size > 1:
            raise LayoutError("context parallelism is not supported for Gated DeltaNet layers (Qwen3-Next, Qwen3.5): "
                              "they need each sequence's tokens in order on one rank; use tp or pp instead of cp")
        self.n_k, self.n_v = hk // tp, hv // tp
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.layer_idx = layer_idx
        self.backend = "auto"  # kernels/gated_delta.py backend (GPTModel.set_attention_backend sets attention's)
        self.recompute_core = False
        H, r = cfg.hidden_size, hv // hk
        self.in_proj_qkvz = ColumnParallelLinear(H, self.n_k * (2 * self.dk + 2 * r * self.dv), tp_group=st.tp_group,
                                                 sequence_parallel=st.sp, dtype=dtype, device=device)
        self.in_proj_ba = ColumnParallelLinear(H, self.n_k * 2 * r, tp_group=st.tp_group, sequence_parallel=st.sp,
                                               dtype=dtype, device=device)
        channels = 2 * self.n_k * self.dk + self.n_v * self.dv
        # [channels, K]: HF's Conv1d weight [channels, 1, K] without its singleton (conversion adds it back)
        self.conv1d = nn.Module()
        self.conv1d.weight = nn.Parameter(torch.empty(channels, cfg.linear_conv_kernel_dim, dtype=dtype, device=device))
        self.dt_bias = nn.Parameter(torch.ones(self.n_v, dtype=dtype, device=device))
        self.A_log = nn.Parameter(torch.zeros(self.n_v, dtype=dtype, device=device))
        self.out_norm = GatedRMSNorm(self.dv, cfg.norm_epsilon, dtype, device)
        if tp > 1:  # each rank normalises only its own value heads
            mark_tp_partial_grad(self.out_norm.weight)
        self.out_proj = RowParallelLinear(self.n_v * self.dv, H, tp_group=st.tp_group, sequence_parallel=st.sp,
                                          dtype=dtype, device=device)

    def forward(self, x, cos, sin, document_ids=None, cp_index=None, kv_cache=None):
        if kv_cache is not None:  # rollouts: padding and filler zeroed first, as HF does (module docstring)
            x = x * kv_cache.new_valid()[..., None].to(x.dtype)
        qkvz = self.in_proj_qkvz(x)  # [b, s, n_k * (2 dk + 2 r dv)], the whole sequence
        b, s, _ = qkvz.shape
        r = self.n_v // self.n_k
        q, k, v, z = qkvz.view(b, s, self.n_k, -1).split([self.dk, self.dk, r * self.dv, r * self.dv], dim=-1)
        beta_in, a = self.in_proj_ba(x).view(b, s, self.n_k, 2 * r).split([r, r], dim=-1)
        mixed = torch.cat([q.reshape(b, s, -1), k.reshape(b, s, -1), v.reshape(b, s, -1)], dim=-1)
        if kv_cache is None:
            mixed = causal_conv(mixed, self.conv1d.weight, document_ids)
        else:
            conv_state, state = kv_cache.linear_state(self.layer_idx)
            mixed, conv_state = self._conv_from(conv_state, mixed)
        mixed = F.silu(mixed)
        q, k, v = mixed.split([self.n_k * self.dk, self.n_k * self.dk, self.n_v * self.dv], dim=-1)
        q, k = q.view(b, s, self.n_k, self.dk), k.view(b, s, self.n_k, self.dk)
        v = v.view(b, s, self.n_v, self.dv)
        beta = torch.sigmoid(beta_in.reshape(b, s, self.n_v))
        g = -self.A_log.float().exp() * F.softplus(a.reshape(b, s, self.n_v).float() + self.dt_bias.float())
        if kv_cache is None:
            out, _ = gated_delta_rule(q, k, v, g, beta, document_ids=document_ids, use_qk_l2norm=True,
                                      backend=_kernel_backend(self.backend))
        elif s == 1:  # one decode step
            out, state = gated_delta_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], state, use_qk_l2norm=True)
            out = out[:, None]
        else:  # prefill (or several tokens), continuing the stored state
            out, state = gated_delta_rule(q, k, v, g, beta, initial_state=state, output_final_state=True,
                                          use_qk_l2norm=True, backend=_kernel_backend(self.backend))
        if kv_cache is not None:
            kv_cache.set_linear_state(self.layer_idx, conv_state, state)
        out = self.out_norm(out, z.reshape(b, s, self.n_v, self.dv))
        return self.out_proj(out.reshape(b, s, self.n_v * self.dv))

    def _conv_from(self, conv_state, mixed):
        """The causal conv of this forward's inputs mixed [b, s, c], continuing conv_state (the
        K-1 inputs before them, [b, K-1, c]; zero when None). Returns (conv output [b, s, c], the
        new conv state: the last K-1 inputs)."""
        K = self.conv1d.weight.shape[-1]
        if conv_state is None:
            conv_state = mixed.new_zeros(mixed.shape[0], K - 1, mixed.shape[2])
        seq = torch.cat([conv_state, mixed], dim=1)
        out = causal_conv(seq, self.conv1d.weight, None)[:, K - 1:]
        return out, seq[:, seq.shape[1] - (K - 1):]


def _kernel_backend(attention_backend: str) -> str:
    """The delta-rule kernel for an attention backend setting: the reference and sdpa settings
    (CPU, parity runs) take the torch form; auto and flash_attn take fla where it runs."""
    return "torch" if attention_backend in ("reference", "sdpa") else "auto"

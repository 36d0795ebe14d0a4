"""The pieces of one decoder layer: RMSNorm, self-attention (fused QKV, GQA, RoPE) and SwiGLU MLP.

Activations are batch-first [b, s, h]. Under sequence parallelism (parallel.sp) the layer input
and output are [b, s/tp, h]; linear_qkv and linear_fc1 all-gather the sequence, linear_proj and
linear_fc2 reduce-scatter it back (Megatron-LM's SP).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaswift.kernels.attention import attention
from megaswift.parallel.context_parallel import context_parallel_attention
from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear, mark_tp_partial_grad

from .config import ModelConfig
from .moe import MoELayer
from .rope import apply_rotary
from .sharding import local_heads, shard_layout


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales in the input dtype, as HF's LlamaRMSNorm does (for parity)."""

    def __init__(self, size: int, eps: float, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None):
        super().__init__()
        tp = st.tp_size
        self.hd = cfg.kv_channels
        self.n_q, self.n_kv = local_heads(cfg, tp)
        self.window = cfg.window_for_layer(layer_idx)
        self.layer_idx = layer_idx
        self.backend = "auto"
        self.recompute_core = False  # model.set_recompute("selective")
        self.cp_groups = (st.cp_ulysses_group, st.cp_ring_group)
        qkv_rows = shard_layout("linear_qkv.weight", cfg, tp, st.tp_rank).local_shape[0]
        self.linear_qkv = ColumnParallelLinear(cfg.hidden_size, qkv_rows, tp_group=st.tp_group, bias=cfg.add_qkv_bias,
                                               sequence_parallel=st.sp, dtype=dtype, device=device)
        if cfg.qk_layernorm:
            self.q_layernorm = RMSNorm(self.hd, cfg.norm_epsilon, dtype, device)
            self.k_layernorm = RMSNorm(self.hd, cfg.norm_epsilon, dtype, device)
            if tp > 1:  # each rank normalises only its own heads: the weight grads are partial sums
                mark_tp_partial_grad(self.q_layernorm.weight)
                mark_tp_partial_grad(self.k_layernorm.weight)
        else:
            self.q_layernorm = self.k_layernorm = None
        self.linear_proj = RowParallelLinear(self.n_q * self.hd, cfg.hidden_size, tp_group=st.tp_group,
                                             bias=cfg.add_proj_bias, sequence_parallel=st.sp, dtype=dtype, device=device)

    def forward(self, x, cos, sin, document_ids=None, cp_index=None, kv_cache=None):
        qkv = self.linear_qkv(x)  # [b, s, n_kv * (q_per_kv + 2) * hd], full sequence
        b, s, _ = qkv.shape
        q_per_kv = self.n_q // self.n_kv
        qkv = qkv.view(b, s, self.n_kv, q_per_kv + 2, self.hd)
        q = qkv[:, :, :, :q_per_kv].reshape(b, s, self.n_q, self.hd)
        k, v = qkv[:, :, :, q_per_kv], qkv[:, :, :, q_per_kv + 1]  # [b, s, n_kv, hd]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        # Under autocast v leaves the linear in the compute dtype (bf16) while RoPE's fp32 cos/sin
        # (and the q/k norms' fp32 weights) promote q and k to fp32. The fused kernels take one
        # dtype, and aten's memory-efficient kernel does not even check: bring q and k to v's
        # dtype, as autocast's own scaled_dot_product_attention does for transformers.
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)
        if kv_cache is not None:  # incremental decoding (rollouts): attend to every cached key
            k, v = kv_cache.update(self.layer_idx, k, v)
            out, _ = attention(q, k, v, causal=False, mask=kv_cache.mask(self.window),
                               backend="reference" if self.backend == "flash_attn" else self.backend)
            return self.linear_proj(out.reshape(b, s, self.n_q * self.hd))
        if self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, document_ids, cp_index, use_reentrant=False)
        else:
            out = self._core(q, k, v, document_ids, cp_index)
        return self.linear_proj(out.reshape(b, s, self.n_q * self.hd))

    def _core(self, q, k, v, document_ids, cp_index=None):
        if cp_index is not None:
            ulysses, ring = self.cp_groups
            return context_parallel_attention(q, k, v, cp_index=cp_index, document_ids=document_ids,
                                              window=self.window, backend=self.backend, ulysses_group=ulysses,
                                              ring_group=ring)
        out, _ = attention(q, k, v, causal=True, document_ids=document_ids, window=self.window, backend=self.backend)
        return out


class MLP(nn.Module):
    """SwiGLU; linear_fc1 holds this rank's [gate; up] rows, so the split is local."""

    def __init__(self, cfg: ModelConfig, st: ParallelState, dtype=None, device=None, width: int | None = None):
        super().__init__()
        f_local = (width or cfg.ffn_hidden_size) // st.tp_size
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * f_local, tp_group=st.tp_group,
                                               sequence_parallel=st.sp, dtype=dtype, device=device)
        self.linear_fc2 = RowParallelLinear(f_local, cfg.hidden_size, tp_group=st.tp_group,
                                            sequence_parallel=st.sp, dtype=dtype, device=device)

    def forward(self, x):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype, device)
        self.self_attention = SelfAttention(cfg, st, layer_idx, dtype, device)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype, device)
        moe_layers = cfg.moe_layers
        self.moe_row = moe_layers.index(layer_idx) if layer_idx in moe_layers else None
        self.mlp = MLP(cfg, st, dtype, device) if self.moe_row is None else MoELayer(cfg, st, layer_idx, dtype, device)
        if st.sp:  # each rank normalises only its sequence shard: these grads are partial sums
            mark_tp_partial_grad(self.input_layernorm.weight)
            mark_tp_partial_grad(self.pre_mlp_layernorm.weight)

    def forward(self, x, cos, sin, document_ids=None, cp_index=None, moe_stats=None, token_mask=None, kv_cache=None):
        """-> (x, moe_stats): an MoE layer adds its router statistics to its row of moe_stats
        (models/moe.py); other layers pass it on."""
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, document_ids, cp_index, kv_cache)
        if self.moe_row is None:
            return x + self.mlp(self.pre_mlp_layernorm(x)), moe_stats
        out, row = self.mlp(self.pre_mlp_layernorm(x), token_mask)
        if moe_stats is not None:
            hot = torch.zeros(moe_stats.shape[0], 1, device=row.device)
            hot[self.moe_row] = 1
            moe_stats = moe_stats + hot * row
        return x + out, moe_stats

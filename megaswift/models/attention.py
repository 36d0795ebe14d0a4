"""Grouped-query self-attention (fused QKV, GQA, RoPE, optional q/k norms): the `gqa` token mixer.

Activations are batch-first [b, s, h]. Under sequence parallelism (parallel.sp) the input and
output are [b, s/tp, h]; linear_qkv all-gathers the sequence and linear_proj reduce-scatters it
back (Megatron-LM's SP).

Attention sinks (cfg.attention_sinks, gpt-oss): `sinks` holds one logit per local query head
(split by head under tp, as linear_proj's columns); every path (the kernels, context
parallelism, the KV cache) adds it to each row's softmax denominator (kernels/attention.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaswift.kernels.attention import attention
from megaswift.parallel.context_parallel import context_parallel_attention
from megaswift.parallel.grads import mark_tp_partial_grad, mark_tp_replicated_rows
from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary
from .sharding import local_heads, shard_layout


class SelfAttention(nn.Module):
    """The token mixer contract (models/blocks.py): built as `(cfg, st, layer_idx, dtype, device)`,
    `forward(x, cos, sin, document_ids, cp_index, kv_cache) -> [b, s(/tp), h]`, and the run-time
    switches `backend` (kernels.attention backend) and `recompute_core` (selective recompute)."""

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
        self.output_gate = cfg.attn_output_gate
        qkv_rows = shard_layout("linear_qkv.weight", cfg, tp, st.tp_rank).local_shape[0]
        self.linear_qkv = ColumnParallelLinear(cfg.hidden_size, qkv_rows, tp_group=st.tp_group, bias=cfg.add_qkv_bias,
                                               sequence_parallel=st.sp, dtype=dtype, device=device)
        ng = cfg.num_query_groups
        if tp > ng:
            # Every rank holds one KV head g; its KV rows come last in linear_qkv ([q_sub, k, v]) and
            # each replica back-propagates only its own query heads: the rows' gradients are summed
            # over the replicas of g (parallel/grads.py; a LoRA B of this layer inherits the mark).
            g = st.tp_rank // (tp // ng)
            for p in (self.linear_qkv.weight, self.linear_qkv.bias):
                if p is not None:
                    mark_tp_replicated_rows(p, 2 * cfg.kv_channels, g, ng)
        if cfg.qk_layernorm:
            self.q_layernorm = RMSNorm(self.hd, cfg.norm_epsilon, dtype, device, cfg.norm_zero_centered)
            self.k_layernorm = RMSNorm(self.hd, cfg.norm_epsilon, dtype, device, cfg.norm_zero_centered)
            if tp > 1:  # each rank normalises only its own heads: the weight grads are partial sums
                mark_tp_partial_grad(self.q_layernorm.weight)
                mark_tp_partial_grad(self.k_layernorm.weight)
        else:
            self.q_layernorm = self.k_layernorm = None
        # one logit per query head; reset_parameters / conversion fill it (HF: normal(0, std))
        self.sinks = nn.Parameter(torch.empty(self.n_q, dtype=dtype, device=device)) if cfg.attention_sinks else None
        self.linear_proj = RowParallelLinear(self.n_q * self.hd, cfg.hidden_size, tp_group=st.tp_group,
                                             bias=cfg.add_proj_bias, sequence_parallel=st.sp, dtype=dtype, device=device)

    def forward(self, x, cos, sin, document_ids=None, cp_index=None, kv_cache=None):
        qkv = self.linear_qkv(x)  # [b, s, n_kv * (q_per_kv (x2 with gates) + 2) * hd], full sequence
        b, s, _ = qkv.shape
        q_per_kv = self.n_q // self.n_kv
        per_q = 2 if self.output_gate else 1  # a gated head's rows are [query, gate]
        qkv = qkv.view(b, s, self.n_kv, per_q * q_per_kv + 2, self.hd)
        q = qkv[:, :, :, : per_q * q_per_kv: per_q].reshape(b, s, self.n_q, self.hd)
        gate = qkv[:, :, :, 1: per_q * q_per_kv: per_q].reshape(b, s, self.n_q * self.hd) if self.output_gate else None
        k, v = qkv[:, :, :, per_q * q_per_kv], qkv[:, :, :, per_q * q_per_kv + 1]  # [b, s, n_kv, hd]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        # Under autocast v leaves the linear in the compute dtype (bf16) while RoPE's fp32 cos/sin
        # (and the q/k norms' fp32 weights) promote q and k to fp32. The fused kernels take one
        # dtype, and aten's memory-efficient kernel does not even check: bring q and k to v's
        # dtype, as autocast's own scaled_dot_product_attention does for transformers.
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)
        if kv_cache is not None:  # incremental decoding (rollouts): attend to every cached key
            k, v = kv_cache.update(self.layer_idx, k, v)
            out, _ = attention(q, k, v, causal=False, mask=kv_cache.mask(self.window), sinks=self.sinks,
                               backend="reference" if self.backend == "flash_attn" else self.backend)
        elif self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, document_ids, cp_index, use_reentrant=False)
        else:
            out = self._core(q, k, v, document_ids, cp_index)
        out = out.reshape(b, s, self.n_q * self.hd)
        if gate is not None:  # Qwen3-Next's gated attention: each head's output times sigmoid(its gate)
            out = out * torch.sigmoid(gate)
        return self.linear_proj(out)

    def _core(self, q, k, v, document_ids, cp_index=None):
        if cp_index is not None:
            ulysses, ring = self.cp_groups
            return context_parallel_attention(q, k, v, cp_index=cp_index, document_ids=document_ids,
                                              window=self.window, backend=self.backend, ulysses_group=ulysses,
                                              ring_group=ring, sinks=self.sinks)
        out, _ = attention(q, k, v, causal=True, document_ids=document_ids, window=self.window, backend=self.backend,
                           sinks=self.sinks)
        return out

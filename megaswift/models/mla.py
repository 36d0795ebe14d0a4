"""Multi-latent attention (DeepSeek-V2/V3, Kimi-K2): the `mla` token mixer.

As transformers' DeepseekV3Attention computes it:

    q       = W_q_up(norm(W_q_down x))       (or W_q x when q_lora_rank is None)
    [c, kr] = W_kv_down x                    c: the kv latent (kv_lora_rank), kr: one rope key
    [kn, v] = W_kv_up(norm(c))               per head: nope key dims, value dims
    k       = [kn, rope(kr)] per head        the rope key is shared by every head
    q       = [qn, rope(qr)]                 q/k heads are qk_nope + qk_rope wide, v heads v_head_dim

The score scale is qk_head_dim^-0.5, times YaRN's mscale^2 (ModelConfig.softmax_scale).

Tensor parallelism, as Megatron-Core splits MLA: the down-projections and their norms are
replicated on every tp rank; the up-projections are column-parallel by head and the output
projection row-parallel. The up-projections' own input handling does the rest:

- without sequence parallelism, each rank computes the (cheap) down-projections on the whole
  sequence; the up-projection's copy_to_tp_region all-reduces the latent's gradient, so the
  down-projection and its norm get whole gradients, the same on every rank;
- with sequence parallelism, each rank down-projects its own sequence shard and the
  up-projection all-gathers the small latent (not the hidden states); the down-projection and
  norm gradients are then partial sums over the shards (marked, parallel/grads.py).

The shared rope key bypasses the up-projection, so it gets the same treatment by hand: gathered
(SP) or copied into the tp region (all-reduce of its gradient), since each rank's heads use it.
Parameter names follow Megatron-Core's MLA (linear_q_down_proj, q_layernorm, linear_q_up_proj,
linear_kv_down_proj, kv_layernorm, linear_kv_up_proj, linear_proj; linear_q_proj without
q_lora_rank); convert/families.py maps them to HF's q_a_proj, q_a_layernorm, q_b_proj,
kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj, o_proj (q_proj).

The rollout KV cache stores the expanded per-head keys and values, as for GQA; caching the latent
instead (what makes MLA's cache small) is left for later.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaswift.errors import ConfigError
from megaswift.kernels.attention import attention
from megaswift.parallel.context_parallel import context_parallel_attention
from megaswift.parallel.grads import mark_tp_partial_grad
from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_comm import copy_to_tp_region, gather_from_sp_region
from megaswift.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear

from .config import ModelConfig
from .norm import RMSNorm
from .rope import apply_rotary


# transformers builds q_a_layernorm and kv_a_layernorm with RMSNorm's default epsilon, not the
# config's rms_norm_eps (the same 1e-6 in DeepSeek-V3 and Kimi-K2; they differ in configs that set
# another rms_norm_eps)
LATENT_NORM_EPS = 1e-6


class MultiLatentAttention(nn.Module):
    """The token mixer contract of models/blocks.py (see SelfAttention)."""

    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None):
        super().__init__()
        tp = st.tp_size
        if cfg.num_attention_heads % tp:
            raise ConfigError(f"multi-latent attention splits its {cfg.num_attention_heads} heads over tp; "
                              f"tp={tp} does not divide them")
        if cfg.add_qkv_bias or cfg.add_proj_bias or cfg.qk_layernorm:
            raise ConfigError("multi-latent attention with attention_bias or q/k norms is not supported")
        self.n = cfg.num_attention_heads // tp
        self.nope, self.rope, self.vd = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank, self.interleave = cfg.kv_lora_rank, cfg.rope_interleave
        self.scale = cfg.softmax_scale
        self.window = cfg.window_for_layer(layer_idx)
        self.layer_idx = layer_idx
        self.backend = "auto"
        self.recompute_core = False
        self.cp_groups = (st.cp_ulysses_group, st.cp_ring_group)
        self.tp_group = st.tp_group
        H, qk = cfg.hidden_size, cfg.qk_head_dim

        def column(n_in, n_out, sp):  # column-parallel by head (n_out is this rank's share)
            return ColumnParallelLinear(n_in, n_out, tp_group=st.tp_group, sequence_parallel=sp, dtype=dtype,
                                        device=device)

        def replicated(n_in, n_out):  # every rank holds it whole and runs it on its own tokens
            return ColumnParallelLinear(n_in, n_out, tp_group=None, dtype=dtype, device=device)

        partial = []  # replicated weights whose gradient is a partial sum over tp under SP
        if cfg.q_lora_rank is None:
            self.linear_q_proj = column(H, self.n * qk, st.sp)
            self.linear_q_down_proj = self.q_layernorm = self.linear_q_up_proj = None
        else:
            self.linear_q_proj = None
            self.linear_q_down_proj = replicated(H, cfg.q_lora_rank)
            self.q_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS, dtype, device)
            self.linear_q_up_proj = column(cfg.q_lora_rank, self.n * qk, st.sp)
            partial += [self.linear_q_down_proj.weight, self.q_layernorm.weight]
        self.linear_kv_down_proj = replicated(H, self.kv_rank + self.rope)
        self.kv_layernorm = RMSNorm(self.kv_rank, LATENT_NORM_EPS, dtype, device)
        self.linear_kv_up_proj = column(self.kv_rank, self.n * (self.nope + self.vd), st.sp)
        partial += [self.linear_kv_down_proj.weight, self.kv_layernorm.weight]
        self.linear_proj = RowParallelLinear(self.n * self.vd, H, tp_group=st.tp_group, sequence_parallel=st.sp,
                                             dtype=dtype, device=device)
        if st.sp and tp > 1:
            for p in partial:
                mark_tp_partial_grad(p)

    def forward(self, x, cos, sin, document_ids=None, cp_index=None, kv_cache=None):
        # the up-projection's switch, which generation_mode turns off with the others
        sp = self.linear_kv_up_proj.sequence_parallel
        if self.linear_q_proj is not None:
            q = self.linear_q_proj(x)
        else:
            q = self.linear_q_up_proj(self.q_layernorm(self.linear_q_down_proj(x)))
        b, s, _ = q.shape  # the whole sequence (the column-parallel layers gather it under SP)
        q = q.view(b, s, self.n, self.nope + self.rope)
        latent, k_rope = self.linear_kv_down_proj(x).split([self.kv_rank, self.rope], dim=-1)
        kv = self.linear_kv_up_proj(self.kv_layernorm(latent)).view(b, s, self.n, self.nope + self.vd)
        k_nope, v = kv.split([self.nope, self.vd], dim=-1)
        k_rope = gather_from_sp_region(k_rope, self.tp_group, dim=1) if sp else copy_to_tp_region(k_rope, self.tp_group)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rotary(q_rope, cos, sin, self.interleave)
        k_rope = apply_rotary(k_rope.unsqueeze(2), cos, sin, self.interleave)  # [b, s, 1, rope]: one for all heads
        # bring q and k to v's dtype after RoPE's fp32 cos/sin (see SelfAttention)
        q = torch.cat([q_nope, q_rope.to(q_nope.dtype)], dim=-1).to(v.dtype)
        k = torch.cat([k_nope, k_rope.to(k_nope.dtype).expand(b, s, self.n, self.rope)], dim=-1).to(v.dtype)
        if kv_cache is not None:  # incremental decoding (rollouts)
            k, v = kv_cache.update(self.layer_idx, k, v)
            out, _ = attention(q, k, v, causal=False, mask=kv_cache.mask(self.window), scale=self.scale,
                               backend="reference" if self.backend == "flash_attn" else self.backend)
        elif self.recompute_core and torch.is_grad_enabled():
            out = checkpoint(self._core, q, k, v, document_ids, cp_index, use_reentrant=False)
        else:
            out = self._core(q, k, v, document_ids, cp_index)
        return self.linear_proj(out.reshape(b, s, self.n * self.vd))

    def _core(self, q, k, v, document_ids, cp_index=None):
        if cp_index is not None:
            ulysses, ring = self.cp_groups
            return context_parallel_attention(q, k, v, cp_index=cp_index, document_ids=document_ids,
                                              window=self.window, backend=self.backend, ulysses_group=ulysses,
                                              ring_group=ring, scale=self.scale)
        out, _ = attention(q, k, v, causal=True, document_ids=document_ids, window=self.window, scale=self.scale,
                           backend=self.backend)
        return out

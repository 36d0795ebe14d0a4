"""One decoder layer: pre-norm token mixer, then pre-norm MLP, each with a residual.

The token mixer (`self_attention`) and the MLP (`mlp`) are whatever modules the model config
names (models/blocks.py); the layer knows only their contracts. Activations are batch-first
[b, s, h]; under sequence parallelism (parallel.sp) the layer input and output are [b, s/tp, h].
"""
from __future__ import annotations

from torch import nn

from megaswift.parallel.grads import mark_tp_partial_grad
from megaswift.parallel.state import ParallelState

from .blocks import build_mlp, build_token_mixer
from .config import ModelConfig
from .norm import RMSNorm


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_idx: int, dtype=None, device=None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype, device, cfg.norm_zero_centered)
        self.self_attention = build_token_mixer(cfg, st, layer_idx, dtype, device)
        self.pre_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_epsilon, dtype, device, cfg.norm_zero_centered)
        self.mlp = build_mlp(cfg, st, layer_idx, dtype, device)
        if st.sp:  # each rank normalises only its sequence shard: these grads are partial sums
            mark_tp_partial_grad(self.input_layernorm.weight)
            mark_tp_partial_grad(self.pre_mlp_layernorm.weight)

    def forward(self, x, cos, sin, document_ids=None, cp_index=None, moe_stats=None, token_mask=None, kv_cache=None):
        """-> (x, moe_stats): an MoE layer adds its router statistics to its row of moe_stats
        (models/moe.py); other layers pass it on."""
        x = x + self.self_attention(self.input_layernorm(x), cos, sin, document_ids, cp_index, kv_cache)
        out, moe_stats = self.mlp(self.pre_mlp_layernorm(x), token_mask, moe_stats)
        return x + out, moe_stats

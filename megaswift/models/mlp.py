"""The dense SwiGLU MLP: the `swiglu` MLP block, and the shared expert of an MoE layer.

linear_fc1 holds this rank's [gate; up] rows, so the split is local. Under sequence parallelism
the input and output are [b, s/tp, h]; linear_fc1 all-gathers the sequence and linear_fc2
reduce-scatters it back.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from megaswift.parallel.state import ParallelState
from megaswift.parallel.tp_layers import ColumnParallelLinear, RowParallelLinear

from .config import ModelConfig


class MLP(nn.Module):
    """SwiGLU; linear_fc1 holds this rank's [gate; up] rows, so the split is local.

    The MLP block contract (models/blocks.py): built as `(cfg, st, layer_idx, dtype, device)`,
    `forward(x, token_mask=None, moe_stats=None) -> (out, moe_stats)`; a dense MLP passes the
    router statistics on untouched. `width` overrides cfg.ffn_hidden_size (a shared expert)."""

    def __init__(self, cfg: ModelConfig, st: ParallelState, layer_idx: int | None = None, dtype=None, device=None, *,
                 width: int | None = None):
        super().__init__()
        f_local = (width or cfg.ffn_hidden_size) // st.tp_size
        self.linear_fc1 = ColumnParallelLinear(cfg.hidden_size, 2 * f_local, tp_group=st.tp_group,
                                               sequence_parallel=st.sp, dtype=dtype, device=device)
        self.linear_fc2 = RowParallelLinear(f_local, cfg.hidden_size, tp_group=st.tp_group,
                                            sequence_parallel=st.sp, dtype=dtype, device=device)

    def forward(self, x, token_mask=None, moe_stats=None):
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(F.silu(gate) * up), moe_stats

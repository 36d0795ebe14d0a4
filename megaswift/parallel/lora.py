"""LoRA on tensor-parallel layers (Hu et al. 2021): y = W x + (alpha / r) B A dropout(x).

The adapter follows the layer's split, so no collective is added to a column-parallel layer and
one small one (rank-wide activations) to a row-parallel one:

- column-parallel (linear_qkv, linear_fc1): A [r, in] is replicated and B [out/tp, r] split by
  output rows like the weight; A's gradient is partial on each rank (each holds some of B's
  rows), so it is summed over tp with the other partial gradients.
- row-parallel (linear_proj, linear_fc2): A [r, in/tp] is split by input columns like the
  weight; the partial A x is summed over tp (reduce-scattered along the sequence under sequence
  parallelism) before the replicated B [out, r].
- grouped experts ([experts, out, in]): the same rule inside expert tensor parallelism, applied
  by merging B A into the expert weights of each forward (exact; no dropout there).

B starts at zero, so an adapted model starts equal to its base. The base weights are frozen.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .grads import mark_tp_partial_grad, mark_tp_replicated_rows
from .tp_comm import reduce_from_tp_region, reduce_scatter_to_sp_region
from .tp_layers import SequenceParallelLayer


class LoRA(SequenceParallelLayer):
    def __init__(self, a_shape, b_shape, *, rank: int, alpha: float, dropout: float, tp_group=None,
                 sequence_parallel: bool = False, dtype=None, device=None):
        super().__init__(sequence_parallel)
        self.scale, self.enabled = alpha / rank, True
        self.A = nn.Parameter(torch.empty(a_shape, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.zeros(b_shape, dtype=dtype, device=device))
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.tp_group = tp_group

    def column(self, x: torch.Tensor) -> torch.Tensor:
        """x: the layer's full input (already gathered/copied) -> this rank's output rows."""
        return F.linear(F.linear(self.dropout(x), self.A), self.B) * self.scale

    def row(self, x: torch.Tensor) -> torch.Tensor:
        """x: this rank's input columns -> the summed (or sequence-scattered) output."""
        u = F.linear(self.dropout(x), self.A)  # partial over tp: [b, s, r]
        u = reduce_scatter_to_sp_region(u, self.tp_group, dim=1) if self.sequence_parallel else \
            reduce_from_tp_region(u, self.tp_group)
        return F.linear(u, self.B) * self.scale

    def merged(self, weight: torch.Tensor) -> torch.Tensor:
        """Grouped experts: W + (alpha / r) B A for every local expert."""
        return weight + torch.bmm(self.B, self.A) * self.scale


def kaiming_a(shape, generator: torch.Generator) -> torch.Tensor:
    """PEFT's init of A (kaiming-uniform with a = sqrt(5)) on the canonical tensor, from a seeded
    generator so every layout starts from the same adapter."""
    fan_in = shape[-1]
    bound = math.sqrt(6 / ((1 + 5) * fan_in))  # gain sqrt(2 / (1 + a^2)) with a^2 = 5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def attach(layer: nn.Module, kind: str, a_shape, b_shape, **kwargs) -> LoRA:
    """Give a column- or row-parallel layer (or a grouped expert weight) an adapter; its
    gradient bookkeeping follows the split described above."""
    lora = LoRA(a_shape, b_shape, dtype=layer.weight.dtype, device=layer.weight.device, **kwargs)
    if kind == "column" and kwargs.get("tp_group") is not None:
        mark_tp_partial_grad(lora.A)
    replicated = getattr(layer.weight, "tp_replicated_rows", None)
    if kind == "column" and replicated is not None:  # B's rows are the weight's: so are its replicas
        mark_tp_replicated_rows(lora.B, *replicated)
    if kind == "row" and kwargs.get("sequence_parallel"):
        mark_tp_partial_grad(lora.B)
    if getattr(layer.weight, "tp_partial_grad", False):
        # a layer replicated over tp that sees only the rank's share of the tokens (MLA's
        # down-projections under SP): its adapter's gradients are partial sums, as its weight's
        mark_tp_partial_grad(lora.A)
        mark_tp_partial_grad(lora.B)
    layer.lora = lora
    return lora

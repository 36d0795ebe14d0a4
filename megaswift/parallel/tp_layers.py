"""Tensor-parallel layers: column- and row-parallel linears and the vocab-parallel embedding.

Activations are batch-first `[b, s, h]`. Under sequence parallelism the activations between
layers are sequence shards `[b, s/tp, h]`; the layers gather and reduce-scatter along dim 1 where
Megatron puts its f and g (see tp_comm.py). Each layer holds only this rank's slice of the weight,
created empty: the model initialises it (`reset_parameters`) or the converter copies a slice in.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .grads import mark_tp_partial_grad
from .tp_comm import (
    copy_to_tp_region,
    gather_from_sp_region,
    gather_from_tp_region,
    group_size,
    reduce_from_tp_region,
    reduce_scatter_to_sp_region,
)


class SequenceParallelLayer(nn.Module):
    """A layer that, under sequence parallelism, takes or returns sequence shards `[b, s/tp, h]`.
    `sequence_parallel` is set here and may be switched off at run time (a model's
    generation_mode: a decode step of one token per row does not split over tp)."""

    def __init__(self, sequence_parallel: bool = False):
        super().__init__()
        self.sequence_parallel = sequence_parallel


def _bias(n: int, bias: bool, dtype, device) -> nn.Parameter | None:
    return nn.Parameter(torch.empty(n, dtype=dtype, device=device)) if bias else None


class ColumnParallelLinear(SequenceParallelLayer):
    """Y = X A^T with A split by rows (output features): this rank computes its slice of Y.

    The caller passes the per-rank output size, because the model knows how it splits (for a fused
    QKV with replicated KV heads it is not out_features / tp).
    """

    def __init__(self, in_features: int, out_features_per_rank: int, *, tp_group, bias: bool = False,
                 sequence_parallel: bool = False, gather_output: bool = False, dtype=None, device=None):
        super().__init__(sequence_parallel)
        self.tp_group = tp_group
        self.gather_output = gather_output
        self.weight = nn.Parameter(torch.empty(out_features_per_rank, in_features, dtype=dtype, device=device))
        self.bias = _bias(out_features_per_rank, bias, dtype, device)
        self.lora = None  # parallel/lora.py

    def reset_parameters(self, init_std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, s/tp, in] under sequence parallelism, else [b, s, in] (replicated)
        if self.sequence_parallel:
            x = gather_from_sp_region(x, self.tp_group, dim=1)
        else:
            x = copy_to_tp_region(x, self.tp_group)
        y = F.linear(x, self.weight, self.bias)  # [b, s, out/tp]
        if self.lora is not None and self.lora.enabled:
            y = y + self.lora.column(x)
        if self.gather_output:
            y = gather_from_tp_region(y, self.tp_group, dim=-1)  # [b, s, out]
        return y


class RowParallelLinear(SequenceParallelLayer):
    """Y = X A^T with A split by columns (input features): the input arrives already split along
    its last dim (from a column-parallel linear), each rank computes a partial Y, and the partials
    are summed (or, under sequence parallelism, summed and split along the sequence).

    The bias is replicated and added after the sum, so it is counted once. Under sequence
    parallelism each rank adds it only to its sequence shard, so its gradient is partial: it is
    marked for `grads.allreduce_tp_partial_grads`, as Megatron does.
    """

    def __init__(self, in_features_per_rank: int, out_features: int, *, tp_group, bias: bool = False,
                 sequence_parallel: bool = False, dtype=None, device=None):
        super().__init__(sequence_parallel)
        self.tp_group = tp_group
        self.weight = nn.Parameter(torch.empty(out_features, in_features_per_rank, dtype=dtype, device=device))
        self.bias = _bias(out_features, bias, dtype, device)
        self.lora = None  # parallel/lora.py
        if self.bias is not None and sequence_parallel:
            mark_tp_partial_grad(self.bias)

    def reset_parameters(self, init_std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)  # x: [b, s, in/tp] -> partial y: [b, s, out]
        if self.sequence_parallel:
            y = reduce_scatter_to_sp_region(y, self.tp_group, dim=1)  # [b, s/tp, out]
        else:
            y = reduce_from_tp_region(y, self.tp_group)
        if self.lora is not None and self.lora.enabled:
            y = y + self.lora.row(x)
        if self.bias is not None:
            y = y + self.bias
        return y


class VocabParallelEmbedding(SequenceParallelLayer):
    """An embedding whose rows (the padded vocabulary) are split over tp: rank r holds rows
    [r * V_local, (r + 1) * V_local). Each rank looks up the tokens it owns, writes zeros for the
    others, and the sum over ranks is the full lookup (reduce-scattered along the sequence under
    sequence parallelism, so each rank gets `[b, s/tp, h]`)."""

    def __init__(self, num_embeddings_padded: int, embedding_dim: int, *, tp_group, tp_rank: int, tp_size: int,
                 sequence_parallel: bool = False, dtype=None, device=None):
        super().__init__(sequence_parallel)
        if num_embeddings_padded % tp_size:
            raise ValueError(
                f"padded vocabulary size {num_embeddings_padded} is not divisible by tp ({tp_size});"
                f" pad the vocabulary to a multiple of {tp_size}"
            )
        if group_size(tp_group) != tp_size:
            raise ValueError(f"tp_size {tp_size} does not match the tp group's size {group_size(tp_group)}")
        self.tp_group = tp_group
        self.tp_size = tp_size
        self.num_embeddings_per_rank = num_embeddings_padded // tp_size
        self.vocab_start = tp_rank * self.num_embeddings_per_rank
        self.vocab_end = self.vocab_start + self.num_embeddings_per_rank
        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_rank, embedding_dim, dtype=dtype, device=device))

    def reset_parameters(self, init_std: float) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=init_std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens: [b, s] global ids
        if self.tp_size == 1:
            out = F.embedding(tokens, self.weight)  # [b, s, h]
        else:
            foreign = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
            local = (tokens - self.vocab_start).masked_fill(foreign, 0)  # any valid row; zeroed below
            out = F.embedding(local, self.weight).masked_fill(foreign.unsqueeze(-1), 0.0)  # [b, s, h]
        if self.sequence_parallel:
            return reduce_scatter_to_sp_region(out, self.tp_group, dim=1)  # [b, s/tp, h]
        return reduce_from_tp_region(out, self.tp_group)

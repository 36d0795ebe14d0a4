"""Finish a backward pass's gradients over the model-parallel groups, before the optimizer step.

The model only marks its parameters, as it builds them, with how their gradients come out of
backward; `finalize_grads(model)` (called by the training engine after backward) completes them:

- `tp_partial_grad` (`mark_tp_partial_grad`): replicated over tp, but each rank computes only a
  part of the gradient (norm weights and row-parallel biases under sequence parallelism, q/k
  norms that see only a rank's heads, LoRA's replicated side): summed over tp.
- `etp_partial_grad`: the same inside expert tensor parallelism (an expert adapter's replicated
  side): summed over etp.
- `tp_replicated_rows` (`mark_tp_replicated_rows`): the last rows of a parameter are replicated
  over some tp ranks, each of which back-propagates only its own part (the KV rows of a fused
  QKV when there are more tp ranks than KV heads): summed over each set of replicas.
- `embedding_group_grad` (`mark_embedding_group_grad`): one of two copies of a tied embedding on
  the first and last pipeline stage: summed over the embedding group.

Every step is a sum, so it may run on the local gradients before the data-parallel reduction
(the engine does that under PP: with ZeRO-1 the first and last stage shard their buckets
differently). The model side needs `model.st`, `model.chunks` (the GPTModels this rank runs,
in model order) and `model.parameters()` (models/protocol.py).
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .collectives import all_reduce
from .tp_comm import group_size


# -- marks the model puts on its parameters -------------------------------------------------------
def mark_tp_partial_grad(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter replicated over tp whose gradient each rank computes only in part: under
    sequence parallelism norm weights and a row-parallel bias see one sequence shard; q/k norms
    always see only the rank's heads. Such gradients are summed over tp before the optimizer
    step (`allreduce_tp_partial_grads`), as Megatron does for layernorms under SP."""
    param.tp_partial_grad = True
    return param


def mark_tp_replicated_rows(param: nn.Parameter, rows: int, replica_set: int, num_sets: int) -> nn.Parameter:
    """Mark the last `rows` rows (dim 0) of a tp-split parameter as held by several tp ranks, each
    of which back-propagates only its own part: the ranks are split into `num_sets` sets of
    replicas and this rank is in set `replica_set` (for a fused QKV with more tp ranks than KV
    heads: the KV rows, one set per KV head). `sum_tp_replicated_rows` sums them in each set."""
    param.tp_replicated_rows = (rows, replica_set, num_sets)
    return param


def mark_embedding_group_grad(param: nn.Parameter) -> nn.Parameter:
    """Mark one of the two copies of a tied embedding (first and last pipeline stage on different
    ranks): its gradient is summed with the other copy's over the embedding group."""
    param.embedding_group_grad = True
    return param


# -- the sums ---------------------------------------------------------------------------------------
def allreduce_tp_partial_grads(module: nn.Module, tp_group, marker: str = "tp_partial_grad") -> None:
    """Sum the gradients of every marked parameter over tp (or, with marker `etp_partial_grad`,
    over expert tp), one all-reduce per dtype."""
    if group_size(tp_group) == 1:
        return
    buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for p in module.parameters():
        if getattr(p, marker, False) and p.grad is not None:
            buckets[(p.grad.dtype, p.grad.device)].append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])  # one buffer, one collective
        all_reduce(flat, group=tp_group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def sum_tp_replicated_rows(module: nn.Module, tp_group) -> None:
    """Sum the marked replicated rows (`mark_tp_replicated_rows`) within each set of replicas.

    One all-reduce over tp of a [sets, n] buffer where each rank fills only its own set's row sums
    the replicas of each set (and keeps the sets apart) without extra process groups."""
    marked = [p for p in module.parameters() if getattr(p, "tp_replicated_rows", None) is not None]
    if not marked:
        return
    specs = {p.tp_replicated_rows[1:] for p in marked}
    if len(specs) != 1:
        raise ValueError(f"parameters of one module are marked with different replica sets: {sorted(specs)}")
    (replica_set, num_sets), = specs
    rows = [(p.grad, p.tp_replicated_rows[0]) for p in marked if p.grad is not None]
    if not rows:
        return
    kv = [g.narrow(0, g.shape[0] - n, n) for g, n in rows]
    flat = torch.cat([t.reshape(-1) for t in kv])
    buf = flat.new_zeros(num_sets, flat.numel())
    buf[replica_set] = flat
    all_reduce(buf, group=tp_group)
    offset = 0
    for t in kv:
        t.copy_(buf[replica_set, offset: offset + t.numel()].view_as(t))
        offset += t.numel()


def sum_embedding_group_grads(model, embedding_group) -> None:
    """Sum the gradient of a tied embedding's copy (`mark_embedding_group_grad`) with the other
    end of the pipeline's. A frozen copy (under LoRA) has no gradient to sum."""
    for p in model.parameters():
        if getattr(p, "embedding_group_grad", False) and p.requires_grad:
            all_reduce(p.grad, group=embedding_group)


def finalize_grads(model) -> None:
    """Complete the gradients that the model-parallel layout leaves partial; call after backward,
    before the step. Per GPTModel this rank runs (`model.chunks`): the tp-partial sums, the
    expert-tp-partial sums and the replicated-row sums; then the tied-embedding sum over the
    pipeline's embedding group."""
    st = model.st
    for chunk in model.chunks:
        allreduce_tp_partial_grads(chunk, st.tp_group)
        allreduce_tp_partial_grads(chunk, st.etp_group, marker="etp_partial_grad")
        sum_tp_replicated_rows(chunk, st.tp_group)
    sum_embedding_group_grads(model, st.embedding_group)

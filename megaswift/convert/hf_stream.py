"""The live model's weights as full HF tensors, in memory: what a separate rollout engine (vLLM,
SGLang: `model.load_weights(iterable of (name, tensor))`) loads after each optimizer step, with
no checkpoint written and read back.

One layer at a time, for every canonical tensor of the layer, every rank writes the pieces it
holds into a zero tensor of the canonical shape and marks them with its rank; a MAX all-reduce of
the marks names one holder per element (tp replicas of KV heads, dp and cp replicas, the two
copies of a tied embedding hold identical values), each rank keeps only the elements it was
named for, and a SUM all-reduce assembles the tensor on every rank, bit for bit. The canonical
tensors are then split into HF tensors as export-hf does. Peak extra memory: two copies of one
layer's canonical tensors.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from megaswift.models.sharding import canonical_names, shard_layout

from .canonical import box_of, local_pieces
from .families import FAMILIES
from .hf_export import hf_tensors


def stream_hf_weights(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight of the model, on every rank; all ranks of the job
    must iterate it together (it is collective)."""
    cfg = model.cfg
    if model.lora_rank:
        raise NotImplementedError("streaming the weights of a LoRA model (base + merged adapters) is not written; "
                                  "export with --merge-lora")
    params = dict(model.named_parameters())
    layouts = model.shard_layouts()
    dev = next(model.parameters()).device
    world = dist.get_world_size() if dist.is_initialized() else 1
    me = dist.get_rank() + 1 if world > 1 else 1
    spec = FAMILIES[cfg.family]
    for group in canonical_names(cfg):
        tensors = {}
        for name in group:
            shape = shard_layout(name, cfg, 1, 0).canonical_shape
            full = torch.zeros(shape, dtype=torch.float32, device=dev)
            mark = torch.zeros(shape, dtype=torch.int32, device=dev)
            if name in params:
                for offsets, piece in local_pieces(params[name].detach(), layouts[name]):
                    box_of(full, offsets, piece.shape).copy_(piece)
                    box_of(mark, offsets, piece.shape).fill_(me)
            if world > 1:
                dist.all_reduce(mark, op=dist.ReduceOp.MAX)
                full.masked_fill_(mark != me, 0)
                dist.all_reduce(full)
            tensors[name] = full
        for hf_name, tensor in hf_tensors(group, tensors, cfg, spec):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)

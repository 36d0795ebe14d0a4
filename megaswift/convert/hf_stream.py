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

from megaswift.models.sharding import box_of, canonical_names, local_pieces, lora_layout, shard_layout
from megaswift.parallel.collectives import all_reduce, rank, world_size

from .families import FAMILIES
from .hf_export import hf_tensors
from .lora_export import merge_adapters


def stream_hf_weights(model, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every weight of the model, on every rank; all ranks of the job
    must iterate it together (it is collective). A LoRA model streams its base weights with the
    adapters merged in ((alpha / r) B A), which is what it samples with."""
    cfg = model.cfg
    params = dict(model.named_parameters())
    layouts = model.shard_layouts()
    dev = next(model.parameters()).device
    spec = FAMILIES[cfg.family]
    lora = model.lora_meta if model.lora_rank else None
    if model.lora_rank and lora is None:
        raise ValueError("a LoRA model without lora_meta (alpha, rank): attach adapters with train.build.attach_lora")
    for group in canonical_names(cfg):
        tensors = {name: _assemble(params.get(name), layouts.get(name), shard_layout(name, cfg, 1, 0), dev)
                   for name in group}
        if lora:
            adapters = {}
            for name in group:
                for which in ("A", "B"):
                    key = f"{name[: -len('.weight')]}.lora.{which}"
                    if _adapted(key, lora):
                        canon = lora_layout(key, cfg, lora["rank"], 1, 0)
                        adapters[key] = _assemble(params.get(key), layouts.get(key), canon, dev)
            tensors = merge_adapters(tensors, adapters, lora["alpha"] / lora["rank"])
        for hf_name, tensor in hf_tensors(group, tensors, cfg, spec):
            yield hf_name, tensor if dtype is None else tensor.to(dtype)


def _assemble(local, layout, canonical, dev) -> torch.Tensor:
    """The canonical tensor from every rank's pieces (see the module docstring); `local` None on
    ranks that do not hold it."""
    world = world_size()
    me = rank() + 1 if world > 1 else 1
    full = torch.zeros(canonical.canonical_shape, dtype=torch.float32, device=dev)
    mark = torch.zeros(canonical.canonical_shape, dtype=torch.int32, device=dev)
    if local is not None:
        for offsets, piece in local_pieces(local.detach(), layout):
            box_of(full, offsets, piece.shape).copy_(piece)
            box_of(mark, offsets, piece.shape).fill_(me)
    if world > 1:
        all_reduce(mark, "max")
        full.masked_fill_(mark != me, 0)
        all_reduce(full)
    return full


def _adapted(key: str, lora: dict) -> bool:
    """Whether the layer of adapter `key` is a LoRA target: every rank must agree on the
    collectives, including ranks (other pipeline stages) that do not hold the layer."""
    from megaswift.models.lora import target_set

    layer = key.rsplit(".lora.", 1)[0]
    return layer.rsplit(".", 1)[-1] in target_set(lora["targets"])

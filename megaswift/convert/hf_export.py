"""megaswift checkpoint -> HF directory (safetensors shards + index, config.json, tokenizer).

Streams one layer at a time: the canonical tensors of a layer are read from the DCP checkpoint,
split back into HF tensors (QKV per query group, gate/up), and handed to a shard writer.
"""
from __future__ import annotations

import json
import os

import torch

from megaswift.checkpoint.model_state import read_canonical, read_meta
from megaswift.models.config import ModelConfig
from megaswift.models.sharding import canonical_names, shard_layout

from .families import FAMILIES, FamilySpec
from .hf_io import ShardedSafetensorsWriter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split_to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig, spec: FamilySpec, out: dict) -> None:
    """Scatter the rows of one canonical tensor into the HF tensors `out` collects (hf name ->
    list of (hf_start, rows)). An HF tensor fed by several canonical segments (q_proj from every
    query group) is complete once all its pieces are in."""
    rows = tensor.flatten(0, 1) if tensor.ndim == 3 else tensor  # experts: [E x rows, cols], as segments index
    for seg in spec.segments(name, cfg):
        out.setdefault(seg.hf_name, []).append((seg.hf_start, rows.narrow(0, seg.canon_start, seg.length)))


def hf_tensors(group: list[str], tensors: dict[str, torch.Tensor], cfg: ModelConfig, spec: FamilySpec):
    """(HF name, tensor) of every HF tensor a group of canonical tensors (a layer) makes up."""
    pieces: dict[str, list] = {}
    for name in group:
        split_to_hf(name, tensors[name], cfg, spec, pieces)
    for hf_name, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        yield hf_name, torch.cat([t for _, t in parts]) if len(parts) > 1 else parts[0][1]


def default_export_dtype(meta: dict) -> str:
    """A training checkpoint stores fp32 master weights; it exports in its source model's dtype."""
    return meta.get("export_dtype") or meta.get("dtype", "float32")


def export_hf(ckpt_dir: str, hf_dir: str, dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3,
              merge_lora: bool = False) -> dict:
    """The whole model as an HF checkpoint. A LoRA checkpoint (adapters only) becomes a PEFT
    adapter directory, or with `merge_lora` the base weights with the adapters merged in."""
    meta = read_meta(ckpt_dir)
    cfg = ModelConfig.from_dict(meta["model_config"])
    spec = FAMILIES[cfg.family]
    dtype = dtype or default_export_dtype(meta)
    torch_dtype = DTYPES[dtype]
    stored = DTYPES[meta.get("dtype", "float32")]
    if "lora" in meta:
        from .lora_export import merged_reader, write_peft_adapter

        if not merge_lora:
            return write_peft_adapter(ckpt_dir, hf_dir, meta, cfg, spec, torch_dtype)
        read_group = merged_reader(ckpt_dir, meta, cfg, stored)
    else:
        def read_group(shapes):
            return read_canonical(ckpt_dir, shapes, stored)
    writer = ShardedSafetensorsWriter(hf_dir, max_shard_bytes)
    for group in canonical_names(cfg):
        shapes = {n: shard_layout(n, cfg, 1, 0).canonical_shape for n in group}
        for hf_name, full in hf_tensors(group, read_group(shapes), cfg, spec):
            writer.add(hf_name, full.to(torch_dtype))
    writer.close()
    copy_side(ckpt_dir, hf_dir)
    config = spec.hf_config(cfg, dtype)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {"tensors": writer.total, "files": len(writer.written)}


def copy_side(ckpt_dir: str, hf_dir: str) -> None:
    """The tokenizer and generation files kept with the checkpoint."""
    side = os.path.join(ckpt_dir, "hf")
    if os.path.isdir(side):
        from megaswift.checkpoint.model_state import copy_side_files

        copy_side_files(side, hf_dir)

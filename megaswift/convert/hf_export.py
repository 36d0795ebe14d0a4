"""megaswift checkpoint -> HF directory (safetensors shards + index, config.json, tokenizer).

Streams one layer at a time: the canonical tensors of a layer are read from the DCP checkpoint,
split back into HF tensors (QKV per query group, gate/up), and handed to a shard writer.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil

import torch

from megaswift.checkpoint.model_state import read_canonical, read_meta
from megaswift.dtypes import DTYPES
from megaswift.errors import CheckpointError
from megaswift.models.config import ModelConfig
from megaswift.models.sharding import canonical_names, shard_layout

from .families import FAMILIES, FamilySpec
from .hf_io import ShardedSafetensorsWriter



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
              merge_lora: bool = False, overwrite: bool = False, overwrite_option: str = "pass --overwrite") -> dict:
    """The whole model as an HF checkpoint. A LoRA checkpoint (adapters only) becomes a PEFT
    adapter directory, or with `merge_lora` the base weights with the adapters merged in.

    A non-empty `hf_dir` is refused unless `overwrite`; then its previous HF file set is replaced
    whole (see replace_hf_files). `overwrite_option` tells the user how to turn it on ("pass
    --overwrite"), for the messages. Everything is written to `<hf_dir>.export-tmp` first, so a
    failed export leaves `hf_dir` as it was."""
    meta = read_meta(ckpt_dir)
    check_export_target(hf_dir, overwrite, export_sources(meta), ckpt_dir, overwrite_option)
    cfg = ModelConfig.from_dict(meta["model_config"])
    spec = FAMILIES[cfg.family]
    dtype = dtype or default_export_dtype(meta)
    staging = _sibling(hf_dir, "export-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        info = _write(ckpt_dir, staging, meta, cfg, spec, dtype, max_shard_bytes, merge_lora)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info["kept"] = replace_hf_files(staging, hf_dir)
    return info


def _write(ckpt_dir: str, out_dir: str, meta: dict, cfg: ModelConfig, spec: FamilySpec, dtype: str,
           max_shard_bytes: int, merge_lora: bool) -> dict:
    torch_dtype = DTYPES[dtype]
    stored = DTYPES[meta.get("dtype", "float32")]
    if "lora" in meta:
        from .lora_export import merged_reader, write_peft_adapter

        if not merge_lora:  # the adapter, with the tokenizer files beside it
            info = write_peft_adapter(ckpt_dir, out_dir, meta, cfg, spec, torch_dtype)
            copy_side(ckpt_dir, out_dir)
            return info
        read_group = merged_reader(ckpt_dir, meta, cfg, stored)
    else:
        def read_group(shapes):
            return read_canonical(ckpt_dir, shapes, stored)
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for group in canonical_names(cfg):
        shapes = {n: shard_layout(n, cfg, 1, 0).canonical_shape for n in group}
        for hf_name, full in hf_tensors(group, read_group(shapes), cfg, spec):
            writer.add(hf_name, full.to(torch_dtype))
    writer.close()
    copy_side(ckpt_dir, out_dir)
    config = spec.hf_config(cfg, dtype)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return {"tensors": writer.total, "files": len(writer.written)}


# What makes up an HF checkpoint directory, for transformers or megaswift: weights in any format
# transformers reads, their indexes, the configs and the tokenizer. An overwrite removes every
# such file it does not rewrite: an old index or shard left beside new weights is read by one
# loader and not the other. Anything else in the directory belongs to the user and is kept.
HF_FILE_PATTERNS = (
    "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json",
    "adapter_model.bin", "tf_model.h5", "flax_model.msgpack", "config.json", "generation_config.json",
    "adapter_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
    "merges.txt", "chat_template.*", "*.tiktoken",
)


def is_hf_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in HF_FILE_PATTERNS)


def export_sources(meta: dict) -> list[str]:
    """Directories a checkpoint's weights were read from (its import source, a LoRA base, the
    training run's model.hf_path and reference): exporting over one would destroy them."""
    run = meta.get("train", {}).get("config", {})
    paths = [meta.get("source"), meta.get("lora", {}).get("base"), run.get("model", {}).get("hf_path"),
             run.get("dpo", {}).get("ref_path"), run.get("grpo", {}).get("ref_path")]
    return [p for p in paths if p]


def check_export_target(hf_dir: str, overwrite: bool, sources=(), ckpt_dir: str | None = None,
                        overwrite_option: str = "pass --overwrite") -> None:
    """Refuse, in one line, an export directory that is a source of the weights or lies in the
    checkpoint (whatever `overwrite` says), that is a file, or that is not empty (unless
    `overwrite`)."""
    target = os.path.realpath(hf_dir)
    for src in sources:
        if os.path.realpath(src) == target:
            raise CheckpointError(f"export directory {hf_dir} is the source of the weights being exported ({src}); "
                                  f"exporting there would overwrite them, so it is refused even if you "
                                  f"{overwrite_option}: export to another directory")
    if ckpt_dir is not None and _within(target, os.path.realpath(ckpt_dir)):
        raise CheckpointError(f"export directory {hf_dir} is inside the checkpoint being exported ({ckpt_dir}); "
                              "export to a directory outside it")
    if os.path.exists(hf_dir) and not os.path.isdir(hf_dir):
        raise CheckpointError(f"export directory {hf_dir} is a file; remove it or choose another directory")
    if not overwrite and os.path.isdir(hf_dir) and os.listdir(hf_dir):
        raise CheckpointError(f"export directory {hf_dir} exists and is not empty; export to a new or empty "
                              f"directory, or {overwrite_option} to replace the HF checkpoint in it")


def replace_hf_files(staging: str, hf_dir: str) -> list[str]:
    """Move the freshly written files of `staging` into `hf_dir`, replacing its previous HF file
    set whole; returns the names of the other entries, which are left in place.

    The previous files are first moved aside into `<hf_dir>.export-old` (renames, no copies), so a
    crash in between leaves both sets whole on disk, one of them beside the target."""
    if not os.path.isdir(hf_dir):
        parent = os.path.dirname(os.path.abspath(hf_dir))
        os.makedirs(parent, exist_ok=True)
        os.replace(staging, hf_dir)
        return []
    new = set(os.listdir(staging))
    old = [n for n in os.listdir(hf_dir)
           if n in new or (is_hf_file(n) and not os.path.isdir(os.path.join(hf_dir, n)))]
    trash = _sibling(hf_dir, "export-old")
    shutil.rmtree(trash, ignore_errors=True)
    os.makedirs(trash)
    # shutil.move renames, and copies only where hf_dir is a mount point of its own
    for name in old:
        shutil.move(os.path.join(hf_dir, name), os.path.join(trash, name))
    for name in sorted(new):
        shutil.move(os.path.join(staging, name), os.path.join(hf_dir, name))
    os.rmdir(staging)
    shutil.rmtree(trash)
    return sorted(set(os.listdir(hf_dir)) - new)


def _sibling(path: str, suffix: str) -> str:
    """`<path>.<suffix>` beside the directory `path` resolves to (through symlinks), so on its
    file system: moving files into place is a rename."""
    return os.path.realpath(path) + "." + suffix


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def copy_side(ckpt_dir: str, hf_dir: str) -> None:
    """The tokenizer and generation files kept with the checkpoint."""
    side = os.path.join(ckpt_dir, "hf")
    if os.path.isdir(side):
        from megaswift.checkpoint.model_state import copy_side_files

        copy_side_files(side, hf_dir)

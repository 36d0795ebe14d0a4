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
from megaswift.dtypes import DTYPES, EXPORT_FORMATS, FP8_BLOCK, MXFP4
from megaswift.errors import CheckpointError
from megaswift.models.config import ModelConfig
from megaswift.models.sharding import canonical_names, shard_layout

from . import fp8, mxfp4, passthrough
from .families import FAMILIES, FamilySpec, Rearranged, hf_shape
from .hf_io import ShardedSafetensorsWriter

def split_to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig, spec: FamilySpec, out: dict) -> None:
    """Scatter the rows of one canonical tensor into the HF tensors `out` collects (hf name ->
    list of (hf_start, rows)). An HF tensor fed by several canonical segments (q_proj from every
    query group) is complete once all its pieces are in."""
    rows = tensor.flatten(0, 1) if tensor.ndim == 3 else tensor  # experts: [E x rows, cols], as segments index
    for seg in spec.segments(name, cfg):
        if isinstance(seg, Rearranged):  # one HF tensor holding all of it, rearranged (gpt-oss's experts)
            out.setdefault(seg.hf_name, []).append((0, seg.to_hf(tensor).contiguous()))
            continue
        out.setdefault(seg.hf_name, []).append((seg.hf_start, rows.narrow(0, seg.canon_start, seg.length)))


def hf_tensors(group: list[str], tensors: dict[str, torch.Tensor], cfg: ModelConfig, spec: FamilySpec):
    """(HF name, tensor) of every HF tensor a group of canonical tensors (a layer) makes up."""
    pieces: dict[str, list] = {}
    for name in group:
        split_to_hf(name, tensors[name], cfg, spec, pieces)
    for hf_name, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        full = torch.cat([t for _, t in parts]) if len(parts) > 1 else parts[0][1]
        yield hf_name, full.view(hf_shape(hf_name, tuple(full.shape), cfg))


def default_export_dtype(meta: dict) -> str:
    """A training checkpoint stores fp32 master weights; it exports in its source model's dtype."""
    return meta.get("export_dtype") or meta.get("dtype", "float32")


def export_hf(ckpt_dir: str, hf_dir: str, dtype: str | None = None, max_shard_bytes: int = 2 * 1024**3,
              merge_lora: bool = False, overwrite: bool = False, overwrite_option: str = "pass --overwrite",
              fp8_block: tuple[int, int] = fp8.DEFAULT_BLOCK) -> dict:
    """The whole model as an HF checkpoint. A LoRA checkpoint (adapters only) becomes a PEFT
    adapter directory, or with `merge_lora` the base weights with the adapters merged in.

    `dtype`: a name in DTYPES, or FP8_BLOCK: 2-D linear weights quantized in blocks of
    `fp8_block` (convert/fp8.py), the rest bf16; or MXFP4: gpt-oss's expert weights in MXFP4
    (convert/mxfp4.py), the rest bf16. None: the checkpoint's default (its source's dtype); the
    pass-through tensors then stay as stored.

    A non-empty `hf_dir` is refused unless `overwrite`; then its previous HF file set is replaced
    whole (see replace_hf_files). `overwrite_option` tells the user how to turn it on ("pass
    --overwrite"), for the messages. Everything is written to `<hf_dir>.export-tmp` first, so a
    failed export leaves `hf_dir` as it was."""
    meta = read_meta(ckpt_dir)
    check_export_target(hf_dir, overwrite, export_sources(meta), ckpt_dir, overwrite_option)
    cfg = ModelConfig.from_dict(meta["model_config"])
    spec = FAMILIES[cfg.family]
    if dtype is not None and dtype not in EXPORT_FORMATS:
        raise CheckpointError(f"export dtype {dtype!r} is not one of {', '.join(EXPORT_FORMATS)}")
    if dtype == MXFP4 and cfg.family not in mxfp4.FAMILIES:
        raise CheckpointError(f"export --dtype mxfp4 writes gpt-oss's MoE expert weights in MXFP4, and a {cfg.family} "
                              f"checkpoint has no such experts ({', '.join(mxfp4.FAMILIES)} only); export it in "
                              "bfloat16 (or fp8-block)")
    keep_stored, dtype = dtype is None, dtype or default_export_dtype(meta)
    staging = _sibling(hf_dir, "export-tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        info = _write(ckpt_dir, staging, meta, cfg, spec, dtype, max_shard_bytes, merge_lora, keep_stored,
                      tuple(fp8_block))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    info["kept"] = replace_hf_files(staging, hf_dir)
    return info


# written in fp32 whatever the export's dtype, as DeepSeek publishes it and transformers keeps it
# (a bias moved in steps of 1e-3 does not survive bf16)
KEEP_FP32 = ("e_score_correction_bias",)


class _Converter:
    """Hands HF tensors to the shard writer in the export's format: cast to its dtype; or with
    fp8-block, 2-D linear weights quantized (and their scale grids beside them), the rest bf16;
    or with mxfp4, the 3-D expert weights as MXFP4 `_blocks` and `_scales`, the rest bf16."""

    def __init__(self, writer: ShardedSafetensorsWriter, dtype: str, block: tuple[int, int] = fp8.DEFAULT_BLOCK):
        self.writer, self.block = writer, block
        self.fp8, self.mxfp4 = dtype == FP8_BLOCK, dtype == MXFP4
        self.dtype = torch.bfloat16 if self.fp8 or self.mxfp4 else DTYPES[dtype]
        self.linear: set[str] = set()   # 2-D weights written, for modules_to_not_convert
        self.scaled: set[str] = set()   # the quantized ones among them
        self.experts: set[str] = set()  # expert weights written in mxfp4

    def add(self, name: str, tensor: torch.Tensor, as_stored: bool = False) -> None:
        if tensor.ndim == 2 and name.endswith(".weight"):
            self.linear.add(name)
        if as_stored:
            if name.endswith(fp8.SCALE_SUFFIX):
                self.scaled.add(name[: -len(fp8.SCALE_SUFFIX)])
            self.writer.add(name, tensor)
        elif self.mxfp4 and mxfp4.quantizable(name, tensor.shape):
            blocks, scales = mxfp4.quantize(name, tensor)
            self.writer.add(name + mxfp4.BLOCKS_SUFFIX, blocks)
            self.writer.add(name + mxfp4.SCALES_SUFFIX, scales)
            self.experts.add(name)
        elif self.fp8 and fp8.quantizable(name, tensor.shape):
            q, scale = fp8.quantize(name, tensor, self.block)
            self.writer.add(name, q)
            self.writer.add(name + fp8.SCALE_SUFFIX, scale)
            self.scaled.add(name)
        elif name.endswith(KEEP_FP32):
            self.writer.add(name, tensor.float())
        else:
            self.writer.add(name, tensor.to(self.dtype) if tensor.is_floating_point() else tensor)

    def quantization_config(self) -> dict | None:
        if self.mxfp4:
            if not self.experts:
                raise CheckpointError("export --dtype mxfp4 writes MoE expert weights (experts.gate_up_proj, "
                                      "experts.down_proj) in MXFP4, and this checkpoint has none; export it in bfloat16")
            return mxfp4.quantization_config([n[: -len(".weight")] for n in self.linear])
        if not self.fp8:
            return None
        unquantized = [n[: -len(".weight")] for n in self.linear - self.scaled if not n.endswith("embed_tokens.weight")]
        return fp8.quantization_config(self.block, unquantized)


def _write(ckpt_dir: str, out_dir: str, meta: dict, cfg: ModelConfig, spec: FamilySpec, dtype: str,
           max_shard_bytes: int, merge_lora: bool, keep_stored: bool = False,
           block: tuple[int, int] = fp8.DEFAULT_BLOCK) -> dict:
    stored = DTYPES[meta.get("dtype", "float32")]
    if "lora" in meta:
        from .lora_export import merged_reader, write_peft_adapter

        if not merge_lora:  # the adapter, with the tokenizer files beside it; no pass-through tensors
            if dtype in (FP8_BLOCK, MXFP4):
                raise CheckpointError(f"a PEFT adapter cannot be exported in {dtype}; export it in bfloat16, "
                                      f"or pass --merge-lora for {dtype} merged weights")
            info = write_peft_adapter(ckpt_dir, out_dir, meta, cfg, spec, DTYPES[dtype])
            copy_side(ckpt_dir, out_dir)
            return info
        read_group = merged_reader(ckpt_dir, meta, cfg, stored)
    else:
        def read_group(shapes):
            return read_canonical(ckpt_dir, shapes, stored)
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    out = _Converter(writer, dtype, block)
    for group in canonical_names(cfg):
        shapes = {n: shard_layout(n, cfg, 1, 0).canonical_shape for n in group}
        for hf_name, full in hf_tensors(group, read_group(shapes), cfg, spec):
            out.add(hf_name, full)
    for name, tensor, as_stored in passthrough.export_tensors(
            os.path.join(ckpt_dir, "hf"), block if out.fp8 else None, keep_stored):
        out.add(name, tensor, as_stored)
    writer.close()
    copy_side(ckpt_dir, out_dir)
    config = spec.hf_config(cfg, "bfloat16" if out.fp8 or out.mxfp4 else dtype)
    # the source's quantization_config (in extra_hf_config) describes its weights, not these
    config.pop("quantization_config", None)
    if out.fp8 or out.mxfp4:
        config["quantization_config"] = out.quantization_config()
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
    """The tokenizer and generation files kept with the checkpoint (its pass-through tensors go
    into the shards, see _write)."""
    side = os.path.join(ckpt_dir, "hf")
    if os.path.isdir(side):
        from megaswift.checkpoint.model_state import copy_side_files

        copy_side_files(side, hf_dir, passthrough=False)

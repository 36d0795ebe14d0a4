"""Save and load model weights as canonical tensors with torch.distributed.checkpoint.

Layout of a checkpoint directory:

    megaswift.json   format version, family, ModelConfig, the layout it was saved with, dtype
    model/           DCP files of the canonical tensors (independent of tp)
    hf/              tokenizer and generation files of the source HF checkpoint, for export, and
                     passthrough.safetensors: HF tensors kept but not trained (MTP layers)

A save writes into `<dir>.tmp` and renames it at the end, so an interrupted save never damages
the checkpoint that was there before. Every load reads through `safe_load.SafeFileSystemReader`:
nothing in a checkpoint is unpickled beyond an allow-list.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: named, not caught by Exception

from megaswift.errors import CheckpointError
from megaswift.parallel.collectives import any_rank, barrier, initialized, rank, world_size

from .canonical_shards import CanonicalLoadPlanner, CanonicalSavePlanner, CanonicalShards
from .safe_load import DamagedCheckpoint, SafeFileSystemReader

FORMAT_VERSION = 1
META_FILE = "megaswift.json"


def _is_rank0() -> bool:
    return rank() == 0


def _barrier():
    barrier()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def dcp_state(model) -> dict[str, CanonicalShards]:
    """The checkpointed tensors: every parameter, or under LoRA the adapters only (the frozen
    base stays where the run read it from)."""
    layouts = model.shard_layouts()
    adapters_only = model.lora_rank > 0
    return {name: CanonicalShards(p.detach(), layouts[name]) for name, p in model.named_parameters()
            if p.requires_grad or not adapters_only}


@contextlib.contextmanager
def staged_dir(ckpt_dir: str):
    """Collective. Yields `<dir>.tmp` to write into; once every rank is done, rank 0 swaps it in
    for `<dir>`. A save that dies before that leaves the previous `<dir>` untouched."""
    ckpt_dir = os.path.abspath(ckpt_dir)
    tmp = ckpt_dir + ".tmp"
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    failed = None
    try:
        yield tmp
    except (OSError, RuntimeError, CheckpointException) as e:  # a full disk shows as any of these
        failed = e
    # every rank learns whether any failed, so none waits at the commit for a rank that gave up
    if _any_rank(failed is not None):
        free = shutil.disk_usage(os.path.dirname(ckpt_dir)).free  # before the partial files go
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        why = _first_line(failed) if failed else "another rank failed to write its part"
        raise SaveFailed(f"{why}; {free / 1e6:.1f} MB were free there") from failed
    _barrier()
    if _is_rank0():
        old = ckpt_dir + ".old"
        if os.path.exists(ckpt_dir):
            os.replace(ckpt_dir, old)
        os.replace(tmp, ckpt_dir)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


class SaveFailed(CheckpointError):
    """A checkpoint could not be written (on any rank); its partial files are gone and every
    earlier checkpoint is as it was."""


def _any_rank(flag: bool) -> bool:
    if world_size() == 1:
        return flag
    from megaswift.device import get_device

    return any_rank(flag, get_device())


def _first_line(e: BaseException) -> str:
    """The root error in one line; DCP's CheckpointException carries each rank's traceback, whose
    last line is it."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return lines[-1].strip() if lines and type(e).__name__ == "CheckpointException" else \
        f"{type(e).__name__}: {lines[0] if lines else ''}"


def save_dcp(state: dict, path: str, file_per_tensor: bool = False) -> None:
    """`file_per_tensor`: one file per tensor piece instead of one per rank. torch's writer keeps
    every tensor it has written into a file (and its copy of a non-contiguous view) until that
    file is done, so one file per rank holds a copy of every view to the end of the save: 1.4 GB
    more at 32 layers of a 1 GB llama. Per tensor, the import's peak stays flat in depth, at the
    price of more files (a training checkpoint keeps one per rank: its parameters are resident
    anyway, and parallel file systems prefer fewer files)."""
    writer = dcp.FileSystemWriter(path, single_file_per_rank=not file_per_tensor)
    with _quiet_single_process():
        dcp.save(state, storage_writer=writer, planner=CanonicalSavePlanner(), no_dist=not initialized())


def load_dcp(state: dict, path: str, no_dist: bool | None = None) -> None:
    """Collective unless `no_dist` (default: when there is no process group)."""
    reader = SafeFileSystemReader(path)  # checks the metadata and files here, before any collective
    no_dist = not initialized() if no_dist is None else no_dist
    with _quiet_single_process():
        dcp.load(state, storage_reader=reader, planner=CanonicalLoadPlanner(path), no_dist=no_dist)


def write_meta(ckpt_dir: str, meta: dict, extra_files_from: str | None = None) -> None:
    """Rank 0 only: the metadata file and the tokenizer side files."""
    with open(os.path.join(ckpt_dir, META_FILE), "w") as f:
        json.dump({"format": FORMAT_VERSION, **meta}, f, indent=2)
    if extra_files_from:
        copy_side_files(extra_files_from, os.path.join(ckpt_dir, "hf"))


def save_model(model, ckpt_dir: str, meta: dict, extra_files_from: str | None = None) -> None:
    """Collective: every rank calls it. `extra_files_from` is a dir whose non-weight files are
    copied to `hf/` (tokenizer, generation config)."""
    with staged_dir(ckpt_dir) as tmp:
        save_dcp(dcp_state(model), os.path.join(tmp, "model"), file_per_tensor=True)  # flat in depth
        if _is_rank0():
            write_meta(tmp, meta, extra_files_from)


def load_model(model, ckpt_dir: str) -> None:
    """Fill the model's local parameters from a checkpoint saved under any tp."""
    read_meta(ckpt_dir)
    load_dcp(dcp_state(model), os.path.join(ckpt_dir, "model"))
    zero_padding(model)


@torch.no_grad()
def zero_padding(model) -> None:
    """Vocabulary padding rows are not in the checkpoint; keep them zero, as import makes them,
    so a loaded model is the same whichever way it was filled."""
    for name, layout in model.shard_layouts().items():
        if layout.pad:
            p = model.get_parameter(name)
            p.narrow(layout.dim, p.shape[layout.dim] - layout.pad, layout.pad).zero_()


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, META_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(f"{ckpt_dir} is not a megaswift checkpoint (no {META_FILE}); "
                              "create one with `megaswift import-hf`")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bad UTF-8
        raise DamagedCheckpoint(path, f"cannot be read ({type(e).__name__}: {' '.join(str(e).split())})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(path, f"holds a JSON {type(meta).__name__}, not an object")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} is not {FORMAT_VERSION}")
    return meta


def read_canonical(ckpt_dir: str, shapes: dict[str, tuple], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Whole canonical tensors `name -> shape`, read in this process alone (used by export)."""
    out = {name: torch.empty(shape, dtype=dtype) for name, shape in shapes.items()}
    load_dcp(out, os.path.join(ckpt_dir, "model"), no_dist=True)
    return out


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")

PASSTHROUGH_FILE = "passthrough.safetensors"
"""In a checkpoint's side directory: the HF tensors it keeps but does not train (convert/passthrough.py)."""

# Who draws side files from an HF checkpoint's weights: convert/passthrough.py registers the writer
# of PASSTHROUGH_FILE when it is imported. Which tensors pass through depends on the model family,
# which convert/ knows and this layer, below it, cannot import. Whatever copies side files from
# an HF checkpoint has read it through convert/hf_import.py first, which imports it.
_HF_SIDE_WRITERS: dict[str, object] = {}


def register_hf_side_writer(fn) -> None:
    """`fn(hf_dir, side_dir)` writes side files drawn from the HF checkpoint in `hf_dir`."""
    _HF_SIDE_WRITERS[f"{fn.__module__}.{fn.__qualname__}"] = fn


def _is_hf_checkpoint(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("model.safetensors", "model.safetensors.index.json"))


def copy_side_files(src: str, dst: str, passthrough: bool = True) -> None:
    """Copy tokenizer/generation files, never weights or the weight index. With `passthrough`
    (a checkpoint's side directory; not an HF export, which writes them into its shards) also
    the pass-through tensors: PASSTHROUGH_FILE of a checkpoint's side directory `src`, or drawn
    from the HF checkpoint `src` by the registered writers."""
    os.makedirs(dst, exist_ok=True)
    hf = _is_hf_checkpoint(src)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        keep = passthrough and name == PASSTHROUGH_FILE and not hf  # in an HF directory it is one of its weights
        if not os.path.isfile(path) or (not keep and (name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json"))):
            continue
        shutil.copy2(path, os.path.join(dst, name))
    if passthrough and hf:
        if not _HF_SIDE_WRITERS:  # its pass-through tensors would be lost without a word
            raise CheckpointError(f"side files of the HF checkpoint {src} are copied before megaswift.convert."
                                  "passthrough is imported; import it (or megaswift.convert.hf_import) first")
        for write in _HF_SIDE_WRITERS.values():
            write(src, dst)

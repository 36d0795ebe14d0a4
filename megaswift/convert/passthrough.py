"""HF tensors megaswift does not train but must keep: the multi-token-prediction layers of
DeepSeek-V3 / Kimi-K2 / GLM-4.5 (`FamilySpec.passthrough_prefixes`), which serving engines use
for speculative decoding.

Import copies them, bytes and dtypes as stored (fp8 weights with their `*_scale_inv` grids
included), into one file of the checkpoint's side directory, `hf/passthrough.safetensors`;
a training run started from an HF directory draws the same file from it into every checkpoint
it saves, and a run started from a megaswift checkpoint copies it on with the other side files.
Export writes them back into the safetensors shards beside the model's own tensors.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch

from megaswift.checkpoint.model_state import PASSTHROUGH_FILE, register_hf_side_writer

from . import fp8
from .families import FamilySpec, family_for
from .hf_io import HFReader, copy_safetensors, read_safetensors_header, read_safetensors_metadata, read_tensor

_BLOCK_KEY = "weight_block_size"  # in the file's metadata: the source's fp8 block, when it was quantized


def passthrough_names(reader: HFReader, spec: FamilySpec) -> list[str]:
    """The stored tensors (scale grids included) under the family's pass-through prefixes."""
    prefixes = spec.passthrough_prefixes(reader.hf_config)
    if not prefixes:
        return []
    return sorted(n for n in reader.stored_names() if n.startswith(prefixes))


def keep_passthrough(hf_dir: str, side_dir: str) -> None:
    """Write the pass-through tensors of the HF checkpoint in `hf_dir`, if it has any, into
    `side_dir`/PASSTHROUGH_FILE, as stored (rank 0 only: it is the side files' writer)."""
    reader = HFReader(hf_dir)
    if not reader.hf_config:
        return
    names = passthrough_names(reader, family_for(reader.hf_config))
    if not names:
        return
    visible = set(reader.names())
    for name in names:  # a quantized weight whose grid does not fit is named now, not at export
        if name in visible:
            reader.dtype(name)
    tensors = sorted(((n, *reader.stored_entry(n)) for n in names), key=lambda t: (t[2], t[1].start))
    meta = {"format": "pt"}
    if reader.block:
        meta[_BLOCK_KEY] = json.dumps(list(reader.block))
    copy_safetensors(os.path.join(side_dir, PASSTHROUGH_FILE), tensors, meta)


register_hf_side_writer(keep_passthrough)


def export_tensors(side_dir: str, fp8_block: tuple[int, int] | None, keep_stored: bool
                   ) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, as_stored) for every pass-through tensor kept in `side_dir`, one at a time.
    `as_stored` True: write the tensor exactly as it is; False: convert it as the export converts
    the model's own tensors (cast to its dtype; with `fp8_block`, quantize 2-D linear weights).

    - an fp8-block export (`fp8_block`) of an fp8 source quantized in the same blocks: every
      tensor as stored, scale grids included (serving engines load them as the original);
    - otherwise a quantized tensor is dequantized (fp32) and converted, its grid dropped;
    - the others are converted, except with `keep_stored` (an export in the dtype the checkpoint
      defaults to: not fp8-block and no --dtype), where they stay as stored, bit for bit."""
    path = os.path.join(side_dir, PASSTHROUGH_FILE)
    if not os.path.isfile(path):
        return
    entries = read_safetensors_header(path)
    block = read_safetensors_metadata(path).get(_BLOCK_KEY)
    block = tuple(json.loads(block)) if block else None
    quantized = {n for n in entries if block and n + fp8.SCALE_SUFFIX in entries}
    grids = {n + fp8.SCALE_SUFFIX for n in quantized}
    verbatim = fp8_block is not None and block is not None and tuple(fp8_block) == block
    for name, entry in entries.items():
        if verbatim:
            yield name, read_tensor(path, entry), True
            continue
        if name in grids:
            continue
        t = read_tensor(path, entry)
        if name in quantized:
            grid = entries[name + fp8.SCALE_SUFFIX]
            fp8.check_scale(name, entry.shape, name + fp8.SCALE_SUFFIX, grid.shape, grid.dtype, entry.dtype, block)
            yield name, fp8.dequantize(t, read_tensor(path, grid), block), False
        else:
            yield name, t, keep_stored and fp8_block is None

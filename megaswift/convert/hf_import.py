"""HF checkpoint -> megaswift model, streaming: each rank reads only the slices it holds."""
from __future__ import annotations

import torch

from megaswift.errors import CheckpointError
from megaswift.models.config import ModelConfig
from megaswift.models.sharding import canonical_names, flat_rows, shard_layout

from .canonical import fill_from_canonical
from .families import FAMILIES, FamilySpec, Segment
from .hf_io import HFReader

# HF tensors that carry no weights megaswift needs (older checkpoints saved RoPE buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_hf_shapes(cfg: ModelConfig, spec: FamilySpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the family needs and its full shape, from the canonical segments."""
    shapes: dict[str, list[int]] = {}
    for group in canonical_names(cfg):
        for name in group:
            canon = flat_rows(shard_layout(name, cfg, 1, 0).canonical_shape)
            for seg in spec.segments(name, cfg):
                shape = shapes.setdefault(seg.hf_name, [0, *canon[1:]])
                shape[0] = max(shape[0], seg.hf_start + seg.length)
    return {k: tuple(v) for k, v in shapes.items()}


def check_hf_tensors(reader: HFReader, cfg: ModelConfig, spec: FamilySpec) -> dict[str, tuple]:
    """Fail with one line naming the tensor when one is missing, misshaped or unexpected."""
    expected = expected_hf_shapes(cfg, spec)
    present = reader.names()
    for name, shape in expected.items():
        if name not in present:
            raise CheckpointError(f"checkpoint {reader.hf_dir} is missing tensor {name!r} (expected shape {list(shape)})")
        found = reader.shape(name)
        if found != shape:
            raise CheckpointError(f"tensor {name!r} has shape {list(found)}, but config.json implies {list(shape)}")
    allowed = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in present - set(expected) - allowed if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r}{more} in {reader.hf_dir} for family {cfg.family}")
    return expected


def _read_rows(reader: HFReader, segments: list[Segment], start: int, n: int, cols: tuple[int, int] | None):
    """Rows [start, start + n) of the (row-flattened) canonical tensor, columns `cols` of them,
    read from the HF tensors the segments name: only those bytes when a whole HF tensor's rows
    are wanted (a column slice), else the rows, then narrowed."""
    parts = []
    for seg in segments:
        lo, hi = max(start, seg.canon_start), min(start + n, seg.canon_start + seg.length)
        if lo >= hi:
            continue
        first = seg.hf_start + lo - seg.canon_start
        if cols is not None and first == 0 and hi - lo == reader.shape(seg.hf_name)[0]:
            parts.append(reader.read(seg.hf_name, 1, *cols))
            continue
        t = reader.read(seg.hf_name, 0, first, hi - lo)
        parts.append(t.narrow(1, *cols) if cols is not None else t)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def read_canonical_box(reader: HFReader, segments: list[Segment], shape, offsets, sizes) -> torch.Tensor:
    """The box of a canonical tensor of `shape` starting at `offsets`, read from the HF tensors
    the segments name. Segments index rows; a 3-D expert tensor's rows are flattened over its
    experts (expert e's rows start at e x shape[1])."""
    if len(shape) == 3:
        rows = shape[1]
        return torch.stack([
            _read_rows(reader, segments, e * rows + offsets[1], sizes[1], (offsets[2], sizes[2]))
            for e in range(offsets[0], offsets[0] + sizes[0])])
    full_cols = len(shape) == 1 or (offsets[1] == 0 and sizes[1] == shape[1])
    return _read_rows(reader, segments, offsets[0], sizes[0], None if full_cols else (offsets[1], sizes[1]))


@torch.no_grad()
def load_hf_into_model(model, hf_dir: str, reader: HFReader | None = None) -> None:
    """Fill every local parameter from its own slices of the HF tensors: a rank reads only the
    experts, heads and rows it holds."""
    cfg = model.cfg
    spec = FAMILIES[cfg.family]
    reader = reader or HFReader(hf_dir)
    check_hf_tensors(reader, cfg, spec)
    layouts = model.shard_layouts()
    for name, p in model.named_parameters():
        layout = layouts[name]
        segments = spec.segments(name, cfg)
        local = fill_from_canonical(
            lambda o, n: read_canonical_box(reader, segments, layout.canonical_shape, o, n), layout)
        if tuple(local.shape) != tuple(p.shape):
            raise CheckpointError(f"{name}: built {list(local.shape)} from the checkpoint, model expects {list(p.shape)}")
        p.copy_(local.to(p.dtype))

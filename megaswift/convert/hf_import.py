"""HF checkpoint -> megaswift model, streaming: each rank reads only the slices it holds."""
from __future__ import annotations

import torch

from megaswift.errors import CheckpointError
from megaswift.models.config import ModelConfig
from megaswift.models.sharding import canonical_names, flat_rows, local_pieces, shard_layout

from . import fp8
from .families import FAMILIES, FamilySpec, Rearranged, Segment, hf_shape
from .hf_io import HFReader
from .passthrough import passthrough_names

# HF tensors that carry no weights megaswift needs (older checkpoints saved RoPE buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def expected_hf_shapes(cfg: ModelConfig, spec: FamilySpec) -> dict[str, tuple[int, ...]]:
    """Every HF tensor the family needs and its full shape, from the canonical segments."""
    shapes: dict[str, list[int]] = {}
    rearranged: dict[str, tuple[int, ...]] = {}
    for group in canonical_names(cfg):
        for name in group:
            full = shard_layout(name, cfg, 1, 0).canonical_shape
            canon = flat_rows(full)
            for seg in spec.segments(name, cfg):
                if isinstance(seg, Rearranged):  # its shape is the rearrangement's (no data: meta)
                    rearranged[seg.hf_name] = tuple(seg.to_hf(torch.empty(full, device="meta")).shape)
                    continue
                shape = shapes.setdefault(seg.hf_name, [0, *canon[1:]])
                shape[0] = max(shape[0], seg.hf_start + seg.length)
    return {**{k: hf_shape(k, tuple(v), cfg) for k, v in shapes.items()}, **rearranged}


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
    allowed |= set(passthrough_names(reader, spec))  # kept beside the checkpoint (convert/passthrough.py)
    unexpected = sorted(n for n in present - set(expected) - allowed if not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        why = ""
        if unexpected[0].endswith(fp8.SCALE_SUFFIX) and reader.block is None:
            why = "; it is an fp8 scale grid, but config.json has no quantization_config to say how to apply it"
        elif unexpected[0].endswith(("_blocks", "_scales")) and not reader.mxfp4:
            why = ("; it is an MXFP4 block or scale tensor, but config.json has no quantization_config "
                   "(quant_method mxfp4) to say how to read it")
        raise CheckpointError(f"unexpected tensor {unexpected[0]!r}{more} in {reader.hf_dir} for family "
                              f"{cfg.family}{why}")
    return expected


def _read_rows(reader: HFReader, segments: list[Segment], start: int, out: torch.Tensor,
               cols: tuple[int, int] | None) -> None:
    """Fill `out` with rows [start, start + len(out)) of the (row-flattened) canonical tensor,
    columns `cols` of them, from the HF tensors the segments name: only those bytes when a
    whole HF tensor's rows are wanted (a column slice), else the rows, then narrowed."""
    n, covered = out.shape[0], 0
    for seg in segments:
        lo, hi = max(start, seg.canon_start), min(start + n, seg.canon_start + seg.length)
        if lo >= hi:
            continue
        first, dst = seg.hf_start + lo - seg.canon_start, out.narrow(0, lo - start, hi - lo)
        covered += hi - lo
        hf_dims = reader.shape(seg.hf_name)
        if len(hf_dims) == 3 and hf_dims[1] != 1:  # fused experts (families.hf_shape): rows over experts
            rows = reader.read_rows(seg.hf_name, first, hi - lo)
            dst.copy_(rows if cols is None else rows.narrow(1, *cols))
            continue
        if dst.ndim == 2 and len(hf_dims) == 3:  # a conv weight's singleton (families.hf_shape)
            dst = dst.unsqueeze(1)
        # `out` passed positionally: tests wrap `reader.read` in a recorder taking *args
        if cols is None:
            reader.read(seg.hf_name, 0, first, hi - lo, dst)
        elif first == 0 and hi - lo == reader.shape(seg.hf_name)[0]:
            reader.read(seg.hf_name, 1, *cols, dst)
        else:
            dst.copy_(reader.read(seg.hf_name, 0, first, hi - lo).narrow(1, *cols))
    if covered != n:  # rows nobody wrote would keep whatever was in memory
        raise CheckpointError(f"the family's segments cover {covered} of canonical rows [{start}, {start + n}) "
                              f"({', '.join(sorted({s.hf_name for s in segments}))})")


def read_canonical_box(reader: HFReader, segments: list[Segment], shape, offsets, sizes,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """The box of a canonical tensor of `shape` starting at `offsets`, read from the HF tensors
    the segments name, into `out` (of shape `sizes`) when given, so that import writes straight
    into a parameter and holds no copy of it. Segments index rows; a 3-D expert tensor's rows
    are flattened over its experts (expert e's rows start at e x shape[1])."""
    if out is None:
        out = torch.empty(sizes, dtype=reader.dtype(segments[0].hf_name))
    if isinstance(segments[0], Rearranged):  # whole experts, rearranged, then the box's other dims
        seg = segments[0]
        experts = seg.to_canonical(reader.read(seg.hf_name, 0, offsets[0], sizes[0]))
        return out.copy_(experts[(slice(None), *(slice(o, o + n) for o, n in zip(offsets[1:], sizes[1:])))])
    if len(shape) == 3:
        rows = shape[1]
        for i, e in enumerate(range(offsets[0], offsets[0] + sizes[0])):
            _read_rows(reader, segments, e * rows + offsets[1], out[i], (offsets[2], sizes[2]))
        return out
    full_cols = len(shape) == 1 or (offsets[1] == 0 and sizes[1] == shape[1])
    _read_rows(reader, segments, offsets[0], out, None if full_cols else (offsets[1], sizes[1]))
    return out


@torch.no_grad()
def load_hf_into_model(model, hf_dir: str, reader: HFReader | None = None) -> None:
    """Fill every local parameter from its own slices of the HF tensors: a rank reads only the
    experts, heads and rows it holds. Each slice is read into the parameter's own memory (or
    through one slice-sized buffer when the dtype differs), so what the load holds beyond the
    parameters does not grow with the model (issue 18 item 10)."""
    cfg = model.cfg
    spec = FAMILIES[cfg.family]
    reader = reader or HFReader(hf_dir)
    check_hf_tensors(reader, cfg, spec)
    layouts = model.shard_layouts()
    for name, p in model.named_parameters():
        layout = layouts[name]
        if tuple(layout.local_shape) != tuple(p.shape):
            raise CheckpointError(f"{name}: the checkpoint gives this rank {list(layout.local_shape)}, "
                                  f"the model expects {list(p.shape)}")
        segments = spec.segments(name, cfg)
        local = p.detach()
        for offsets, piece in local_pieces(local, layout):
            read_canonical_box(reader, segments, layout.canonical_shape, offsets, tuple(piece.shape), piece)
        if layout.pad:  # the padded vocabulary's rows past the real ones
            local.narrow(layout.dim, local.shape[layout.dim] - layout.pad, layout.pad).zero_()

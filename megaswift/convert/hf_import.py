"""HF checkpoint -> megaswift model, streaming: each rank reads only the slices it holds."""
from __future__ import annotations

import torch

from megaswift.errors import CheckpointError
from megaswift.models.config import ModelConfig
from megaswift.models.sharding import canonical_names, shard_layout

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
            canon = shard_layout(name, cfg, 1, 0).canonical_shape
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


def read_canonical_slice(reader: HFReader, segments: list[Segment], dim: int, start: int, n: int) -> torch.Tensor:
    """canonical.narrow(dim, start, n), read from the HF tensors the segments name."""
    if dim != 0:  # only row concatenations are fused, so a column slice comes from one tensor
        (seg,) = segments
        return reader.read(seg.hf_name, dim, start, n)
    parts = []
    for seg in segments:
        lo, hi = max(start, seg.canon_start), min(start + n, seg.canon_start + seg.length)
        if lo < hi:
            parts.append(reader.read(seg.hf_name, 0, seg.hf_start + lo - seg.canon_start, hi - lo))
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@torch.no_grad()
def load_hf_into_model(model, hf_dir: str, reader: HFReader | None = None) -> None:
    cfg, st = model.cfg, model.st
    spec = FAMILIES[cfg.family]
    reader = reader or HFReader(hf_dir)
    check_hf_tensors(reader, cfg, spec)
    for name, p in model.named_parameters():
        layout = shard_layout(name, cfg, st.tp_size, st.tp_rank)
        segments = spec.segments(name, cfg)
        local = fill_from_canonical(lambda d, s, n: read_canonical_slice(reader, segments, d, s, n), layout)
        if tuple(local.shape) != tuple(p.shape):
            raise CheckpointError(f"{name}: built {list(local.shape)} from the checkpoint, model expects {list(p.shape)}")
        p.copy_(local.to(p.dtype))

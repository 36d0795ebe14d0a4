"""Assemble a rank's local tensor from ranges of a canonical tensor, and take pieces back out.

`read(offsets, sizes)` returns the box of the canonical tensor that starts at `offsets`, from
wherever the canonical tensor lives (an HF safetensors file, a tensor in memory), so the same code
serves import and random init.
"""
from __future__ import annotations

from typing import Callable

import torch

from megaswift.models.sharding import ShardLayout


Box = tuple[int, ...]


def fill_from_canonical(read: Callable[[Box, Box], torch.Tensor], layout: ShardLayout) -> torch.Tensor:
    pieces = [read(offsets, sizes) for offsets, sizes in layout.boxes()]
    if layout.pad:
        shape = list(layout.local_shape)
        shape[layout.dim] = layout.pad
        ref = pieces[0] if pieces else None
        pieces.append(torch.zeros(shape, dtype=ref.dtype if ref is not None else torch.float32))
    return torch.cat(pieces, dim=layout.dim) if len(pieces) > 1 else pieces[0]


def local_pieces(local: torch.Tensor, layout: ShardLayout) -> list[tuple[Box, torch.Tensor]]:
    """(canonical offsets, view of `local`) for every range the rank holds; the padding rows are
    left out because they are not part of the canonical tensor."""
    out, at = [], 0
    for (offsets, _), (_, n) in zip(layout.boxes(), layout.ranges):
        out.append((offsets, local.narrow(layout.dim, at, n)))
        at += n
    return out


def box_of(full: torch.Tensor, offsets: Box, sizes: Box) -> torch.Tensor:
    return full[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))]

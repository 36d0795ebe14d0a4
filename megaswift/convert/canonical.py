"""Assemble a rank's local tensor from ranges of a canonical tensor, and take pieces back out.

`read(dim, start, n)` returns `canonical.narrow(dim, start, n)` from wherever the canonical tensor
lives (an HF safetensors file, a DCP checkpoint, a tensor in memory), so the same code serves
import, random init and checkpoint loading.
"""
from __future__ import annotations

from typing import Callable

import torch

from megaswift.models.sharding import ShardLayout


def fill_from_canonical(read: Callable[[int, int, int], torch.Tensor], layout: ShardLayout) -> torch.Tensor:
    pieces = [read(layout.dim, start, n) for start, n in layout.ranges]
    if layout.pad:
        shape = list(layout.canonical_shape)
        shape[layout.dim] = layout.pad
        ref = pieces[0] if pieces else None
        pieces.append(torch.zeros(shape, dtype=ref.dtype if ref is not None else torch.float32))
    return torch.cat(pieces, dim=layout.dim) if len(pieces) > 1 else pieces[0]


def local_pieces(local: torch.Tensor, layout: ShardLayout) -> list[tuple[int, torch.Tensor]]:
    """(canonical start along layout.dim, view of `local`) for every range the rank holds;
    the padding rows are left out because they are not part of the canonical tensor."""
    out, offset = [], 0
    for start, n in layout.ranges:
        out.append((start, local.narrow(layout.dim, offset, n)))
        offset += n
    return out

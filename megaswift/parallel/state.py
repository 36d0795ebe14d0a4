"""ParallelState: the one object that owns the rank grid and every process group.

It is built once per job from a `Layout` and passed explicitly to the model and the engine
(no module globals). Groups are slices of one rank grid, as in picotron's process-group
manager; the order (tp fastest, then cp, dp, pp) is Megatron's.

A process without torch.distributed gets `ParallelState.single()`: every size is 1, every group
is None, and every collective in `parallel/` is skipped for a group of size 1.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megaswift.errors import LayoutError

from .layout import Layout


@dataclass
class ParallelState:
    layout: Layout
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # coordinates in the dense grid (pp, dp, cp, tp) and expert grid (pp, edp, ep, etp)
    tp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    pp_rank: int = 0
    ep_rank: int = 0
    etp_rank: int = 0
    edp_rank: int = 0
    tp_group: object = None
    cp_group: object = None
    dp_group: object = None
    pp_group: object = None
    dp_cp_group: object = None  # gradients of dense weights are reduced over dp x cp
    embedding_group: object = None  # first and last pp rank: tied embedding gradients are summed here
    cp_ulysses_group: object = None  # inside cp: the ranks that trade sequence for heads (all-to-all)
    cp_ring_group: object = None  # inside cp: the ranks that pass K/V blocks around a ring
    ep_group: object = None
    etp_group: object = None
    edp_group: object = None  # gradients of expert weights are reduced over expert-dp
    # ranks of each group this rank belongs to (global ranks, group order)
    group_ranks: dict = field(default_factory=dict)

    # sizes under the names used everywhere (tp_size, not tensor_model_parallel_world_size)
    @property
    def tp_size(self) -> int:
        return self.layout.tp

    @property
    def cp_size(self) -> int:
        return self.layout.cp

    @property
    def dp_size(self) -> int:
        return self.layout.dp

    @property
    def pp_size(self) -> int:
        return self.layout.pp

    @property
    def ep_size(self) -> int:
        return self.layout.ep

    @property
    def etp_size(self) -> int:
        return self.layout.etp

    @property
    def edp_size(self) -> int:
        return self.layout.edp

    @property
    def sp(self) -> bool:
        return self.layout.sp and self.layout.tp > 1

    @classmethod
    def single(cls, device: torch.device | None = None) -> "ParallelState":
        return cls(layout=Layout(world_size=1), device=device or torch.device("cpu"))

    @classmethod
    def build(cls, layout: Layout, device: torch.device | None = None) -> "ParallelState":
        """Create every group. All ranks must call this, in the same order (new_group is collective)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        if world != layout.world_size:
            raise LayoutError(
                f"the layout needs {layout.world_size} processes but {world} were started;"
                f" launch with --nproc-per-node {layout.world_size} (or change parallel.*)"
            )
        if world == 1:
            return cls(layout=layout, device=device or torch.device("cpu"))
        rank = dist.get_rank()
        L = layout
        dense = torch.arange(world).view(L.pp, L.dp, L.cp, L.tp)
        expert = torch.arange(world).view(L.pp, L.edp, L.ep, L.etp)
        st = cls(layout=layout, rank=rank, device=device or torch.device("cpu"))
        p, d, c, t = [int(i) for i in (dense == rank).nonzero()[0]]
        st.pp_rank, st.dp_rank, st.cp_rank, st.tp_rank = p, d, c, t
        _, ed, e, et = [int(i) for i in (expert == rank).nonzero()[0]]
        st.edp_rank, st.ep_rank, st.etp_rank = ed, e, et

        def make(name: str, slices: list[torch.Tensor]) -> None:
            for ranks in slices:
                ranks = [int(r) for r in ranks.flatten()]
                group = dist.new_group(ranks)
                if rank in ranks:
                    setattr(st, f"{name}_group", group)
                    st.group_ranks[name] = ranks

        # Each list enumerates every slice along one named dimension of the grid.
        make("tp", [dense[i, j, k, :] for i in range(L.pp) for j in range(L.dp) for k in range(L.cp)])
        make("cp", [dense[i, j, :, k] for i in range(L.pp) for j in range(L.dp) for k in range(L.tp)])
        if L.cp > 1:  # cp rank c = ring index * ulysses + ulysses index
            cps = [dense[i, j, :, k].view(L.cp // L.ulysses, L.ulysses)
                   for i in range(L.pp) for j in range(L.dp) for k in range(L.tp)]
            make("cp_ulysses", [c[r, :] for c in cps for r in range(L.cp // L.ulysses)])
            make("cp_ring", [c[:, u] for c in cps for u in range(L.ulysses)])
        make("dp", [dense[i, :, j, k] for i in range(L.pp) for j in range(L.cp) for k in range(L.tp)])
        make("pp", [dense[:, i, j, k] for i in range(L.dp) for j in range(L.cp) for k in range(L.tp)])
        if L.pp > 1:
            make("embedding", [dense[[0, L.pp - 1], i, j, k] for i in range(L.dp) for j in range(L.cp)
                               for k in range(L.tp)])
        make("dp_cp", [dense[i, :, :, k] for i in range(L.pp) for k in range(L.tp)])
        make("ep", [expert[i, j, :, k] for i in range(L.pp) for j in range(L.edp) for k in range(L.etp)])
        make("etp", [expert[i, j, k, :] for i in range(L.pp) for j in range(L.edp) for k in range(L.ep)])
        make("edp", [expert[i, :, j, k] for i in range(L.pp) for j in range(L.ep) for k in range(L.etp)])
        return st

"""Let torch.distributed.checkpoint save and load a parameter as pieces of its canonical tensor.

DTensor can only describe regular shardings, but a rank's linear_fc1 holds two ranges of the
canonical [gate; up] tensor, linear_qkv with replicated KV heads holds a query range plus a KV
range shared with other ranks, and the vocab shard ends in padding. `CanonicalShards` describes
those pieces with DCP's own chunk protocol (`__create_write_items__`, `__create_chunk_list__`),
so DCP writes each piece once (identical chunks from KV replicas are deduplicated by DCP's
planner) and reads whatever pieces the loading layout needs: resharding comes for free.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadItemType, TensorWriteData, WriteItem, WriteItemType

from megaswift.errors import CheckpointError
from megaswift.models.sharding import ShardLayout, local_pieces


class CanonicalShards:
    def __init__(self, local: torch.Tensor, layout: ShardLayout):
        self.layout = layout
        self.pieces = local_pieces(local, layout)
        self._by_offset = {torch.Size(offsets): t for offsets, t in self.pieces}

    def size(self) -> torch.Size:
        return torch.Size(self.layout.canonical_shape)

    def __create_chunk_list__(self):
        return [ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.size()) for o, t in self.pieces]

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(o)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(o), sizes=t.size()),
                    properties=TensorProperties.create_from_tensor(t),
                    size=self.size(),
                ),
            )
            for o, t in self.pieces
        ]

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        return self._by_offset[torch.Size(index.offset)]


def _lookup(state_dict, index: MetadataIndex, fallback):
    obj = state_dict.get(index.fqn)
    if isinstance(obj, CanonicalShards):
        return obj.__get_tensor_shard__(index)
    return fallback(index)


class CanonicalSavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner only looks pieces up inside torch.Tensor values; ours are not tensors."""

    def lookup_object(self, index):
        return _lookup(self.state_dict, index, super().lookup_object)


class CanonicalLoadPlanner(DefaultLoadPlanner):
    """Reads tensors only. DCP routes an entry that its metadata calls bytes, whatever the state
    dict holds under that key, to `load_bytes`, which DefaultLoadPlanner unpickles without any
    allow-list; megaswift never stores one, so a bytes entry is refused.
    `source` names the checkpoint in that error."""

    def __init__(self, source: str = "the checkpoint"):
        super().__init__()
        self.source = source

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        # DCP's _init_state_dict walks the values in place and turns any object it does not know
        # into None (torch 2.13, planner_helpers._iterate_state_dict); put ours back after it.
        ours = {k: v for k, v in state_dict.items() if isinstance(v, CanonicalShards)}
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(ours)
        self.state_dict.update(ours)

    def lookup_tensor(self, index):
        return _lookup(self.state_dict, index, super().lookup_tensor)

    def create_local_plan(self):
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                self._refuse_bytes(item)
        return plan

    def load_bytes(self, read_item, value):
        self._refuse_bytes(read_item)

    def _refuse_bytes(self, item):
        raise CheckpointError(f"{self.source} stores {item.dest_index.fqn!r} as pickled bytes, which megaswift "
                              "never writes and will not unpickle; the checkpoint was altered or is not megaswift's")

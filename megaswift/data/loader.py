"""SFTLoader: a deterministic stream of items (samples, or packed rows of samples) cut into global
batches, and each global batch into this dp rank's micro batches.

The stream depends only on the dataset, seed, seq_len and packing, never on dp_size or
micro_batch_size, so a global batch holds the same items under any layout: losses do not depend
on the layout, and a run can resume with another layout from a count of consumed items.
"""
from __future__ import annotations

import bisect

import torch

from megaswift.errors import ConfigError, DataError

from .dataset import IGNORE_INDEX


class SFTLoader:
    def __init__(self, dataset, *, seq_len: int, packing: bool, micro_batch_size: int, global_batch_size: int,
                 dp_rank: int, dp_size: int, seed: int, pad_id: int):
        mb, gbs = micro_batch_size, global_batch_size
        if min(seq_len, mb, gbs, dp_size) < 1:
            raise ConfigError(f"seq_len ({seq_len}), micro_batch_size ({mb}), global_batch_size ({gbs}) and "
                              f"dp_size ({dp_size}) must all be >= 1")
        if gbs % (mb * dp_size):
            raise ConfigError(f"train.global_batch_size ({gbs}) must be divisible by train.micro_batch_size ({mb}) "
                              f"* dp ({dp_size}) = {mb * dp_size}; e.g. set global_batch_size to "
                              f"{max(1, round(gbs / (mb * dp_size))) * mb * dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank ({dp_rank}) must lie in [0, dp_size ({dp_size}))")
        self.dataset, self.seq_len, self.packing, self.seed, self.pad_id = dataset, seq_len, packing, seed, pad_id
        self.micro_batch_size, self.global_batch_size = mb, gbs
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.dropped = getattr(dataset, "dropped", 0)
        self.lengths = [self._item_length(i) for i in range(len(dataset))]
        if not self.lengths:
            raise DataError("the dataset has no samples to load")
        if max(self.lengths) > seq_len:
            raise ConfigError(f"the dataset holds samples of up to {max(self.lengths)} tokens but the loader's seq_len "
                              f"is {seq_len}: build the dataset with the same seq_len")
        self._loss_tokens = [self._item_loss_tokens(i) for i in range(len(dataset))]
        self.consumed_items = 0
        self.last_loss_tokens = 0
        """Label tokens in the whole global batch last returned (every dp rank's share), for
        normalising the loss without a collective."""
        self._ends: list[int] = []  # _ends[e]: global index one past the last item of epoch e
        self._cache: dict[int, list[list[int]]] = {}

    def _item_length(self, i: int) -> int:
        return len(self.dataset[i][0])

    def _item_loss_tokens(self, i: int) -> int:
        return sum(lab != IGNORE_INDEX for lab in self.dataset[i][1])

    # -- the item stream -----------------------------------------------------------------------
    def _epoch(self, e: int) -> list[list[int]]:
        """Items of epoch e, each a list of sample indices (one index without packing)."""
        if e not in self._cache:
            perm = torch.randperm(len(self.lengths), generator=torch.Generator().manual_seed(self.seed + e)).tolist()
            items = self._pack(perm) if self.packing else [[i] for i in perm]
            if len(self._cache) >= 2:  # a global batch spans at most the current and next epoch
                del self._cache[min(self._cache)]
            self._cache[e] = items
        return self._cache[e]

    def _pack(self, order: list[int]) -> list[list[int]]:
        rows, row, used = [], [], 0
        for i in order:
            if row and used + self.lengths[i] > self.seq_len:
                rows.append(row)
                row, used = [], 0
            row.append(i)
            used += self.lengths[i]
        return rows + [row] if row else rows

    def _locate(self, g: int) -> tuple[int, int]:
        """Global item index -> (epoch, index within it); packed epochs differ in length, so
        their ends are found (and remembered) one epoch at a time."""
        while not self._ends or self._ends[-1] <= g:
            e = len(self._ends)
            size = len(self._epoch(e)) if self.packing else len(self.lengths)
            self._ends.append((self._ends[-1] if self._ends else 0) + size)
        e = bisect.bisect_right(self._ends, g)
        return e, g - (self._ends[e - 1] if e else 0)

    def _items(self, start: int, count: int) -> list[list[int]]:
        e, i = self._locate(start)
        out: list[list[int]] = []
        while len(out) < count:
            out.extend(self._epoch(e)[i: i + count - len(out)])
            e, i = e + 1, 0
        return out

    @property
    def epoch(self) -> int:
        """Epoch of the next item (0-based)."""
        return self._locate(self.consumed_items)[0]

    @property
    def items_per_epoch(self) -> int:
        """Items in the epoch of the next item; with packing this varies a little by epoch."""
        e = self.epoch
        return self._ends[e] - (self._ends[e - 1] if e else 0)

    # -- batches -------------------------------------------------------------------------------
    def next_global_batch(self) -> list[dict]:
        """This rank's micro batches of the next global batch, in order; each a dict of [mb, seq_len]
        long tensors: input_ids, labels (-100 = no loss), position_ids, and document_ids (packing
        only, else None), token_mask (1 for real tokens, 0 for padding); num_tokens counts the
        tokens that are not padding."""
        gbs, share = self.global_batch_size, self.global_batch_size // self.dp_size
        every = self._items(self.consumed_items, gbs)
        self.last_loss_tokens = sum(self._loss_tokens[i] for item in every for i in item)
        mine = every[self.dp_rank * share: (self.dp_rank + 1) * share]
        self.consumed_items += gbs
        mb = self.micro_batch_size
        return [self._collate(mine[j: j + mb]) for j in range(0, share, mb)]

    def _collate(self, items: list[list[int]]) -> dict:
        return self._collate_rows([[self.dataset[i] for i in item] for item in items])

    def _collate_rows(self, rows: list[list[tuple[list[int], list[int]]]]) -> dict:
        """One tensor row per entry of `rows`, each the concatenation of its (ids, labels) samples."""
        shape = (len(rows), self.seq_len)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        document_ids = torch.zeros(shape, dtype=torch.long)
        token_mask = torch.zeros(shape, dtype=torch.long)
        real = 0
        for row, samples in enumerate(rows):
            off = 0
            for d, (ids, labs) in enumerate(samples):
                n = len(ids)
                input_ids[row, off: off + n] = torch.tensor(ids, dtype=torch.long)
                labels[row, off: off + n] = torch.tensor(labs, dtype=torch.long)
                position_ids[row, off: off + n] = torch.arange(n)
                document_ids[row, off: off + n] = d
                off += n
            real += off
            token_mask[row, :off] = 1
            # Padding is one more document: it attends only to itself, so real tokens never see it,
            # and ids stay non-decreasing, as varlen kernels expect.
            position_ids[row, off:] = torch.arange(self.seq_len - off)
            document_ids[row, off:] = len(samples)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
                "document_ids": document_ids if self.packing else None, "token_mask": token_mask,
                "num_tokens": real}

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"consumed_items": self.consumed_items, "seed": self.seed, "packing": self.packing,
                "seq_len": self.seq_len, "num_samples": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream where `state` left it; dp_size and micro_batch_size may differ."""
        mine = self.state_dict()
        for key in ("seed", "packing", "seq_len", "num_samples"):
            if key in state and state[key] != mine[key]:
                raise ConfigError(f"cannot resume the data stream: the checkpoint has {key}={state[key]!r} but this "
                                  f"run has {key}={mine[key]!r}; the item order would differ, so use the same "
                                  f"{key} (and data) to resume")
        self.consumed_items = int(state["consumed_items"])

"""SFTDataset: every row of a data path tokenized into (input_ids, labels) training samples."""
from __future__ import annotations

from megaswift.errors import DataError

from .chat import tokenize_chat
from .reader import read_rows

IGNORE_INDEX = -100


def make_sample(tokens: list[int], flags: list[bool], seq_len: int) -> tuple[list[int], list[int]] | None:
    """Shift for next-token prediction: position i predicts token i+1, which counts only when it
    is an assistant token. Keeps the first seq_len + 1 tokens so input_ids fit in seq_len.
    Returns None when truncation (or the row itself) leaves nothing to learn."""
    tokens, flags = tokens[: seq_len + 1], flags[: seq_len + 1]
    labels = [t if f else IGNORE_INDEX for t, f in zip(tokens[1:], flags[1:])]
    if all(lab == IGNORE_INDEX for lab in labels):
        return None
    return tokens[:-1], labels


class SFTDataset:
    """Samples of `path` (see read_rows) for a tokenizer with a chat template.

    Every rank builds the same dataset: tokenizing is deterministic, and it keeps ranks free of
    communication here. `dropped` counts rows with no label left within seq_len.
    """

    def __init__(self, path: str, tokenizer, seq_len: int):
        if seq_len < 1:
            raise DataError(f"data.seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.samples: list[tuple[list[int], list[int]]] = []
        self.dropped = 0
        for where, row in read_rows(path):
            sample = make_sample(*tokenize_chat(row, tokenizer, where), seq_len)
            if sample is None:
                self.dropped += 1
            else:
                self.samples.append(sample)
        if not self.samples:
            raise DataError(f"{path}: all {self.dropped} rows were dropped: none has an assistant token within "
                            f"data.seq_len={seq_len}; raise data.seq_len or shorten the prompts")
        self.lengths = [len(ids) for ids, _ in self.samples]
        self.num_loss_tokens = sum(sum(lab != IGNORE_INDEX for lab in labels) for _, labels in self.samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.samples[i]

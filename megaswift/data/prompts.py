"""Prompts for online RL (GRPO): rows with a `prompt` and any other columns, and the order in
which a run draws them.

A prompt is a string (tokenized as it is) or a message list (rendered by the tokenizer's chat
template with the generation prompt), as in TRL. The other columns of a row (e.g. `answer`)
travel with it to the reward functions. Prompts longer than `max_prompt_len` tokens keep their
last tokens (TRL truncates on the left too): the question usually sits at the end.
"""
from __future__ import annotations

import torch

from megaswift.errors import DataError

from .chat import _render, check_messages
from .reader import read_rows


class PromptDataset:
    def __init__(self, path: str, tokenizer, max_prompt_len: int):
        self.items: list[tuple[object, list[int], dict]] = []  # (prompt as given, token ids, other columns)
        self.truncated = 0
        for where, row in read_rows(path):
            if "prompt" not in row:
                raise DataError(f"{where}: no \"prompt\" column (a string or a message list); got keys {sorted(row)}")
            prompt = row["prompt"]
            if isinstance(prompt, str):
                text = prompt
            elif isinstance(prompt, list):
                check_messages({"messages": prompt}, where, need_assistant=False)
                text = _render(tokenizer, prompt, True, where)
            else:
                raise DataError(f"{where}: \"prompt\" must be a string or a message list, got {prompt!r:.80}")
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            if not ids:
                raise DataError(f"{where}: the prompt has no tokens")
            if len(ids) > max_prompt_len:
                ids, self.truncated = ids[-max_prompt_len:], self.truncated + 1
            self.items.append((prompt, ids, {k: v for k, v in row.items() if k != "prompt"}))
        self.columns = sorted({k for _, _, cols in self.items for k in cols})

    def __len__(self) -> int:
        return len(self.items)


class PromptOrder:
    """An endless, seeded sequence of prompt indices: each epoch a fresh permutation. Every
    rank draws the same indices; the algorithm splits them over dp."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self.epoch, self.pos = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            step = min(k - len(out), self.n - self.pos)
            out += self._perm[self.pos: self.pos + step]
            self.pos += step
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._perm = self._permutation()

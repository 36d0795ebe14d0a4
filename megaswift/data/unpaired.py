"""Unpaired, labelled completions for KTO: one prompt and one completion per row, desirable or
not, rendered and truncated exactly as preference pairs are (data/preference.py).

Row formats (JSONL or Parquet), TRL's unpaired preference format and its chat form:

- {"prompt": P, "completion": C, "label": true|false}: P a string or a message list, C a string
  or a message list (a string after a message-list prompt is the assistant's reply);
- {"messages": [..., {"role": "assistant", ...}], "label": true|false}: the last assistant
  message is the completion, the messages before it the prompt.

Each example also carries its KL row (KTO's mismatched pair): its own prompt followed by the
completion of the nearest example before it in the file (cyclically: the first takes from the
end) whose prompt tokens differ. That is TRL's rotation of completions by one, applied to the
whole data set once instead of to each per-device batch, so an example's KL row is fixed: the
same whatever the parallel layout or batch composition, and its reference log-probability can
be computed once before training.
"""
from __future__ import annotations

import torch

from megaswift.errors import DataError

from .chat import _render, check_messages
from .dataset import IGNORE_INDEX, make_sample
from .preference import TwoRowLoader, _ids
from .reader import read_rows

Sample = tuple[list[int], list[int]]


def split_unpaired(row, where: str) -> tuple[object, object, bool]:
    """(prompt, completion, label): the prompt a string or message list, the completion the same
    kind (a message list after a message-list prompt)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    label = row.get("label")
    if not isinstance(label, bool):
        raise DataError(f"{where}: a KTO row needs \"label\": true (desirable) or false (undesirable), got "
                        f"{label!r:.80}")
    if "messages" in row and "completion" not in row:
        messages = check_messages({"messages": row["messages"]}, where)
        if messages[-1]["role"] != "assistant" or len(messages) < 2:
            raise DataError(f"{where}: the last message must be the assistant's completion after a prompt, got "
                            f"role {messages[-1]['role']!r} in {len(messages)} message(s)")
        return messages[:-1], messages[-1:], label
    if "prompt" not in row or "completion" not in row:
        raise DataError(f"{where}: a KTO row needs \"prompt\", \"completion\" and \"label\", or \"messages\" and "
                        f"\"label\"; got keys {sorted(row)}")
    prompt, completion = row["prompt"], row["completion"]
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            raise DataError(f"{where}: with a string prompt, \"completion\" must be a string, got {completion!r:.80}")
        return prompt, completion, label
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: \"prompt\" must be a string or a non-empty message list, got {prompt!r:.80}")
    if isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    full = check_messages({"messages": list(prompt) + list(completion)}, where)
    return prompt, full[len(prompt):], label


def tokenize_unpaired(row, tokenizer, where: str) -> tuple[list[int], list[int], bool]:
    """(prompt ids, completion ids, label), tokenized as data/preference.py tokenizes a pair."""
    prompt, completion, label = split_unpaired(row, where)
    if isinstance(prompt, str):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return _ids(tokenizer, prompt), _ids(tokenizer, completion) + eos, label
    prompt_text = _render(tokenizer, prompt, True, where)
    full = _render(tokenizer, list(prompt) + list(completion), False, where)
    if not full.startswith(prompt_text):
        raise DataError(f"{where}: the chat template renders the prompt differently once a reply follows it, "
                        "so the reply cannot be cut off the rendering")
    return _ids(tokenizer, prompt_text), _ids(tokenizer, full[len(prompt_text):].rstrip()), label


def kl_partners(prompts: list[list[int]]) -> list[int]:
    """partner[i]: the example whose completion makes example i's KL row: the nearest one before
    i (cyclically) with different prompt tokens."""
    n = len(prompts)
    out = []
    for i in range(n):
        for k in range(1, n):
            j = (i - k) % n
            if prompts[j] != prompts[i]:
                out.append(j)
                break
        else:
            raise DataError(f"all {n} examples share one prompt, so there is no mismatched (prompt, completion) "
                            "pair for KTO's KL estimate; the data needs at least two different prompts")
    return out


class UnpairedDataset:
    """Every row of `path` as (sample, KL sample, label); every rank builds the same. Samples are
    (input_ids, labels) with labels on the completion tokens only."""

    def __init__(self, path: str, tokenizer, seq_len: int, max_prompt_len: int | None = None):
        rows, self.dropped = [], 0
        for where, row in read_rows(path):
            prompt, completion, label = tokenize_unpaired(row, tokenizer, where)
            if max_prompt_len is not None:
                prompt = prompt[-max_prompt_len:]
            if _sample(prompt, completion, seq_len) is None:
                self.dropped += 1
            else:
                rows.append((prompt, completion, label))
        if not rows:
            raise DataError(f"{path}: all {self.dropped} examples were dropped: no completion token fits in "
                            f"data.seq_len={seq_len}; raise data.seq_len or set data.max_prompt_len")
        self.partner = kl_partners([r[0] for r in rows])
        self.examples: list[tuple[Sample, Sample, bool]] = []
        for (prompt, completion, label), j in zip(rows, self.partner):
            kl = _sample(prompt, rows[j][1], seq_len)
            if kl is None:  # the prompt fits with a token to spare (its own sample did), so only an empty completion
                raise DataError(f"{path}: example {j}'s completion has no token")
            self.examples.append((_sample(prompt, completion, seq_len), kl, label))
        self.desirable = sum(e[2] for e in self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[Sample, Sample, bool]:
        return self.examples[i]

    def item_length(self, i: int) -> int:
        return max(len(self.examples[i][0][0]), len(self.examples[i][1][0]))

    def item_loss_tokens(self, i: int) -> int:
        return sum(lab != IGNORE_INDEX for lab in self.examples[i][0][1])


def _sample(prompt: list[int], completion: list[int], seq_len: int) -> Sample | None:
    return make_sample(prompt + completion, [False] * len(prompt) + [True] * len(completion), seq_len)


class UnpairedLoader(TwoRowLoader):
    """SFTLoader's deterministic, layout-independent, resumable stream with an example as the
    item. A micro batch of m examples is 2m rows: the m examples' rows, then their m KL rows in
    the same order; `label` [m] (bool: desirable) and `example_index` [m] name them."""

    def _collate(self, items: list[list[int]]) -> dict:
        examples = [self.dataset[item[0]] for item in items]
        batch = self._collate_rows([[sample] for sample, _, _ in examples] + [[kl] for _, kl, _ in examples])
        batch["label"] = torch.tensor([label for _, _, label in examples], dtype=torch.bool)
        batch["example_index"] = torch.tensor([item[0] for item in items], dtype=torch.long)
        return batch

    def collate_examples(self, indices: list[int]) -> dict:
        """The micro batch of these examples (in this order), outside the stream: for computing
        every example's reference log-probabilities before training."""
        return self._collate([[i] for i in indices])

"""Preference pairs for DPO: rows in the formats post-training teams already have, rendered with
the tokenizer's chat template, with labels on the response tokens only.

Row formats (JSONL or Parquet, one pair per row):

- TRL explicit prompt: {"prompt": P, "chosen": C, "rejected": R}. P is a string or a message
  list; C and R are strings or message lists (a string after a message-list prompt is the
  assistant's reply).
- TRL implicit prompt: {"chosen": [messages], "rejected": [messages]}: the messages both share
  from the start are the prompt, the rest are the responses.
- {"messages": [... , {"role": "assistant", ...}], "rejected_response": "..."}: the last
  assistant message is the chosen response, `rejected_response` the rejected one.

Tokenization (as TRL does it): the prompt is rendered with the generation prompt and tokenized
once, so chosen and rejected share exactly the same prompt tokens; each response is the rest of
its full rendering (for plain strings: the response text plus EOS). Truncation: the prompt keeps
its last `max_prompt_len` tokens, then prompt + response keep their first seq_len + 1 tokens
(inputs are shifted by one), so long responses lose their end. A pair whose chosen or rejected
response has no token left is dropped and counted.
"""
from __future__ import annotations

import torch

from megaswift.errors import DataError

from .chat import _render, check_messages
from .dataset import IGNORE_INDEX, make_sample
from .loader import SFTLoader
from .reader import read_rows

Sample = tuple[list[int], list[int]]


def split_row(row, where: str) -> tuple[object, object, object]:
    """(prompt, chosen, rejected): the prompt a string or message list, the responses the same
    kind (message lists after a message-list prompt)."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row and "rejected_response" in row:
        messages = check_messages({"messages": row["messages"]}, where)
        if messages[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the chosen assistant reply, got role "
                            f"{messages[-1]['role']!r}")
        rejected = row["rejected_response"]
        if not isinstance(rejected, str):
            raise DataError(f"{where}: \"rejected_response\" must be a string, got {rejected!r:.80}")
        return messages[:-1], messages[-1:], [{"role": "assistant", "content": rejected}]
    if "chosen" not in row or "rejected" not in row:
        raise DataError(f"{where}: a preference row needs \"chosen\" and \"rejected\" (with or without \"prompt\"), "
                        f"or \"messages\" and \"rejected_response\"; got keys {sorted(row)}")
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:  # implicit prompt: the shared leading messages
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise DataError(f"{where}: without \"prompt\", \"chosen\" and \"rejected\" must be message lists that "
                            "share the prompt messages")
        chosen = check_messages({"messages": chosen}, where + " (chosen)")
        rejected = check_messages({"messages": rejected}, where + " (rejected)")
        n = 0
        while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
            n += 1
        if n == 0:
            raise DataError(f"{where}: \"chosen\" and \"rejected\" share no leading messages, so there is no prompt")
        return chosen[:n], chosen[n:], rejected[n:]
    prompt = row["prompt"]
    if isinstance(prompt, str):
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise DataError(f"{where}: with a string prompt, \"{name}\" must be a string, got {value!r:.80}")
        return prompt, chosen, rejected
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: \"prompt\" must be a string or a non-empty message list, got {prompt!r:.80}")
    out = []
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if isinstance(value, str):
            value = [{"role": "assistant", "content": value}]
        out.append(check_messages({"messages": list(prompt) + list(value)}, f"{where} ({name})")[len(prompt):])
    return prompt, out[0], out[1]


def tokenize_pair(row, tokenizer, where: str) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, chosen response ids, rejected response ids)."""
    prompt, chosen, rejected = split_row(row, where)
    if isinstance(prompt, str):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = [_ids(tokenizer, t) for t in (prompt, chosen, rejected)]
        return ids[0], ids[1] + eos, ids[2] + eos
    prompt_text = _render(tokenizer, prompt, True, where)
    responses = []
    for reply in (chosen, rejected):
        full = _render(tokenizer, list(prompt) + list(reply), False, where)
        if not full.startswith(prompt_text):
            raise DataError(f"{where}: the chat template renders the prompt differently once a reply follows it, "
                            "so the reply cannot be cut off the rendering")
        # the trailing newline between turns is not part of what the model must say before stopping
        responses.append(_ids(tokenizer, full[len(prompt_text):].rstrip()))
    return _ids(tokenizer, prompt_text), responses[0], responses[1]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def pair_samples(prompt: list[int], chosen: list[int], rejected: list[int], seq_len: int,
                 max_prompt_len: int | None) -> tuple[Sample, Sample] | None:
    """Two (input_ids, labels) samples, labels on the response tokens; None when either response
    has no token within seq_len after truncation."""
    if max_prompt_len is not None:
        prompt = prompt[-max_prompt_len:]
    out = [make_sample(prompt + response, [False] * len(prompt) + [True] * len(response), seq_len)
           for response in (chosen, rejected)]
    return None if None in out else (out[0], out[1])


class PreferenceDataset:
    """Every row of `path` as a (chosen, rejected) pair of samples; every rank builds the same."""

    def __init__(self, path: str, tokenizer, seq_len: int, max_prompt_len: int | None = None):
        self.pairs: list[tuple[Sample, Sample]] = []
        self.dropped = 0
        for where, row in read_rows(path):
            pair = pair_samples(*tokenize_pair(row, tokenizer, where), seq_len, max_prompt_len)
            if pair is None:
                self.dropped += 1
            else:
                self.pairs.append(pair)
        if not self.pairs:
            raise DataError(f"{path}: all {self.dropped} pairs were dropped: no response token fits in "
                            f"data.seq_len={seq_len}; raise data.seq_len or set data.max_prompt_len")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Sample, Sample]:
        return self.pairs[i]

    def item_length(self, i: int) -> int:
        return max(len(self.pairs[i][0][0]), len(self.pairs[i][1][0]))

    def item_loss_tokens(self, i: int) -> int:
        return sum(lab != IGNORE_INDEX for sample in self.pairs[i] for lab in sample[1])


class TwoRowLoader(SFTLoader):
    """SFTLoader's stream over items that are two rows each (a preference pair; an unpaired
    example and its KL row), never packed; the dataset gives each item's length and loss tokens."""

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, packing=False, **kwargs)

    def _item_length(self, i: int) -> int:
        return self.dataset.item_length(i)

    def _item_loss_tokens(self, i: int) -> int:
        return self.dataset.item_loss_tokens(i)


class PreferenceLoader(TwoRowLoader):
    """SFTLoader's deterministic, layout-independent, resumable stream with a pair as the item.
    A micro batch of m pairs is 2m rows: the m chosen responses, then the m rejected ones in the
    same order (TRL's layout), so both halves of a pair always share a micro batch.
    `pair_index` [m] names the pairs (for precomputed reference log-probabilities)."""

    def _collate(self, items: list[list[int]]) -> dict:
        pairs = [self.dataset[item[0]] for item in items]
        batch = self._collate_rows([[chosen] for chosen, _ in pairs] + [[rejected] for _, rejected in pairs])
        batch["pair_index"] = torch.tensor([item[0] for item in items], dtype=torch.long)
        return batch

    def collate_pairs(self, pair_indices: list[int]) -> dict:
        """The micro batch of these pairs (in this order), outside the stream: for computing
        every pair's reference log-probabilities before training."""
        return self._collate([[i] for i in pair_indices])

"""Scoring a rollout batch: one rank per model replica calls the reward functions for its dp
rank's completions, and one all-reduce over the world gives every rank every reward, so
advantages and dynamic sampling are decided the same way everywhere without further talk."""
from __future__ import annotations

import torch

from megaswift.parallel import collectives

from . import rewards as reward_lib


class RewardScorer:
    def __init__(self, funcs, dataset, tokenizer, stop_strings, max_new_tokens: int, st, device):
        self.funcs, self.dataset, self.tokenizer = funcs, dataset, tokenizer
        self.stop_strings, self.max_new_tokens = tuple(stop_strings), max_new_tokens
        self.st, self.device = st, device

    def score_everywhere(self, local: list[dict], n_rows: int) -> torch.Tensor:
        """[global rows, functions + 2] (rewards, completion length, truncated) on every rank,
        from this dp rank's completions `local` (dicts of prompt index, completion ids, ...).
        A reward function's failure on one rank stops every rank with its message."""
        st, n_funcs = self.st, len(self.funcs)
        table = torch.zeros(n_rows, n_funcs + 2, dtype=torch.float64)
        start = st.dp_rank * len(local)
        error = None
        if st.tp_rank == 0 and st.cp_rank == 0 and st.pp_rank == 0:  # one rank per model replica
            try:
                table[start: start + len(local), :n_funcs] = self._call_rewards(local)
            except reward_lib.RewardError as e:
                error = str(e)
            for i, row in enumerate(local):
                table[start + i, n_funcs] = len(row["completion_ids"])
                table[start + i, n_funcs + 1] = float(row["truncated"])
        error = collectives.agree_on_error(error, "reward_error", self.device)
        if error is not None:
            raise reward_lib.RewardError(error)
        return collectives.all_reduce(table.to(self.device)).cpu()

    def _call_rewards(self, local: list[dict]) -> torch.Tensor:
        items = self.dataset.items
        prompts = [items[r["prompt"]][0] for r in local]
        columns = {c: [items[r["prompt"]][2].get(c) for r in local] for c in self.dataset.columns}
        return reward_lib.score(self.funcs, prompts, [self.completion_text(r) for r in local],
                                [r["completion_ids"] for r in local], columns, self.max_new_tokens)

    def completion_text(self, row: dict):
        """What the reward functions see: the decoded completion cut at a stop string, as a
        message list where the prompt was one."""
        text = self.tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        for s in self.stop_strings:
            if s in text:
                text = text[: text.index(s)]
        prompt = self.dataset.items[row["prompt"]][0]
        return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text

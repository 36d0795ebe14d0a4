"""GRPO's training batches: rollout completions as [prompt | completion | padding] rows of
data.seq_len tokens, labelled on the completion, and the data source that serves one rollout
batch for grpo.num_iterations optimizer steps.

Per-completion tensors ([rows, max_new_tokens]: which row position predicts each completion
token, its rollout log-probability, later its reference log-probability) are not sequence-shaped,
so context parallelism leaves them whole.
"""
from __future__ import annotations

import torch


def micro_batches(rows: list[dict], adv: torch.Tensor, prompts, micro_batch_size: int, seq_len: int,
                  max_new_tokens: int, pad_id: int) -> list[dict]:
    """`rows`: completions (prompt index, completion ids, rollout log-probabilities); `prompts`:
    the prompt dataset's items ((prompt, token ids, columns) by index)."""
    S, T = seq_len, max_new_tokens
    out = []
    for at in range(0, len(rows), micro_batch_size):
        part = rows[at: at + micro_batch_size]
        m = len(part)
        ids = torch.full((m, S), pad_id, dtype=torch.long)
        labels = torch.full((m, S), -100, dtype=torch.long)
        token_mask = torch.zeros(m, S, dtype=torch.bool)
        comp_index = torch.zeros(m, T, dtype=torch.long)
        comp_mask = torch.zeros(m, T, dtype=torch.bool)
        old = torch.zeros(m, T, dtype=torch.float32)
        for i, row in enumerate(part):
            p, c = prompts[row["prompt"]][1], row["completion_ids"]
            n = len(p) + len(c)
            ids[i, :n] = torch.tensor(p + c)
            token_mask[i, :n] = True
            where = torch.arange(len(p) - 1, n - 1)  # the position that predicts each completion token
            labels[i, where] = torch.tensor(c)
            comp_index[i, : len(c)], comp_mask[i, : len(c)] = where, True
            old[i, : len(c)] = torch.tensor(row["logps"])
        out.append({"input_ids": ids, "labels": labels, "token_mask": token_mask,
                    "position_ids": torch.arange(S).expand(m, S), "comp_index": comp_index,
                    "comp_mask": comp_mask, "old_logps": old, "advantages": adv[at: at + m].float(),
                    "mb_index": len(out), "num_tokens": int(token_mask.sum())})
    return out


class RolloutBatches:
    """GRPO's data source for the engine: each call gives one optimizer step's micro batches;
    `make_batches()` (a new rollout) serves `iterations` steps. A resumed run starts a fresh
    rollout batch. `fresh` is True for the first step on a rollout batch."""

    def __init__(self, make_batches, iterations: int, order, engine):
        self.make_batches, self.iterations, self.order, self.engine = make_batches, iterations, order, engine
        self.batches: list[dict] | None = None
        self.iteration = 0

    @property
    def fresh(self) -> bool:
        return self.iteration == 1

    def next_global_batch(self) -> list[dict]:
        if self.batches is None or self.iteration == self.iterations:
            self.batches, self.iteration = self.make_batches(self.order), 0
        self.iteration += 1
        return self.batches

    def state_dict(self) -> dict:
        return {"prompts": self.order.state_dict(), "rollouts": self.engine.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["prompts"])
        self.engine.rollouts = state["rollouts"]

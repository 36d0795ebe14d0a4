"""One rollout: the step's prompts (global batch / num_generations of them, split over dp) are
completed num_generations times each by the training model itself (rollout/sampler.py), seeded
per completion so every layout samples the same completions, and scored (rollout/scoring.py);
under dynamic sampling more prompts are sampled while groups have equal rewards
(rollout/dynamic_sampling.py)."""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass

import torch

from . import dynamic_sampling
from .rewards import combine
from .sampler import generate


@dataclass
class Rollout:
    rows: list[dict]       # this dp rank's completions to train on, group by group
    table: torch.Tensor    # [global completions, functions + 2] of the trained batch, global order
    stats: dict            # rewards and lengths over every completion sampled (all rounds)
    seconds: float


class RolloutEngine:
    """Samples from `model` with `params`; `g` is the grpo config section."""

    def __init__(self, ctx, g, model, dataset, tokenizer, params, scorer, pad_id: int):
        self.ctx, self.g, self.model, self.dataset = ctx, g, model, dataset
        self.tokenizer, self.params, self.scorer, self.pad_id = tokenizer, params, scorer, pad_id
        self.funcs = scorer.funcs
        self.rollouts = 0  # rollouts so far (kept in checkpoints: it seeds the next one)

    def collect(self, order, rows_per_step: int) -> Rollout:
        t0 = time.perf_counter()
        st, g = self.ctx.st, self.g
        G = g.num_generations
        n_global = rows_per_step // G  # groups per step
        n_local = n_global // st.dp_size
        self.rollouts += 1
        rounds = []
        for r in range(g.dynamic_sampling_max_rounds if g.dynamic_sampling else 1):
            prompts = order.take(n_global)[st.dp_rank * n_local: (st.dp_rank + 1) * n_local]
            local = self.generate(prompts, st.dp_rank * n_local, r)
            table = self.scorer.score_everywhere(local, n_global * G)
            rounds.append((local, table, dynamic_sampling.group_varies(table, self.funcs, G)))
            if not g.dynamic_sampling or dynamic_sampling.enough(rounds, n_local, st.dp_size):
                break
        picks = [dynamic_sampling.pick(rounds, n_local, d, g.dynamic_sampling) for d in range(st.dp_size)]
        # the final batch's rewards and lengths in global order, the same on every rank
        final = torch.cat([rounds[r][1][(d * n_local + j) * G: (d * n_local + j + 1) * G]
                           for d in range(st.dp_size) for r, j in picks[d]])
        mine = [rounds[r][0][j * G + k] for r, j in picks[st.dp_rank] for k in range(G)]
        return Rollout(mine, final, self._metrics(rounds), time.perf_counter() - t0)

    def generate(self, prompt_ids: list[int], first_group: int, round_: int) -> list[dict]:
        """num_generations completions of each prompt: dicts of the prompt index, completion ids,
        rollout log-probabilities and whether the completion was truncated."""
        G = self.g.num_generations
        rows = [(i, (first_group + j) * G + k) for j, i in enumerate(prompt_ids) for k in range(G)]
        seeds = [completion_seed(self.ctx.seed, self.rollouts, round_, row) for _, row in rows]
        out = []
        chunk = self.g.generation_batch_size or len(rows)
        with evaluating(self.model) as model:
            for at in range(0, len(rows), chunk):
                part = rows[at: at + chunk]
                with self.ctx.autocast():  # bf16 autocast: sample with the numerics that train
                    gen = generate(model, [self.dataset.items[i][1] for i, _ in part], self.params,
                                   seeds[at: at + chunk], pad_id=self.pad_id, tokenizer=self.tokenizer)
                for (i, _), ids, lp, trunc in zip(part, gen.completion_ids, gen.logps, gen.truncated):
                    out.append({"prompt": i, "completion_ids": ids, "logps": lp, "truncated": trunc})
        return out

    def _metrics(self, rounds) -> dict:
        """Over every completion sampled this rollout (all rounds): rewards and lengths."""
        n_funcs = len(self.funcs)
        table = torch.cat([t for _, t, _ in rounds])
        values = table[:, :n_funcs]
        reward = combine(values, self.funcs)
        lengths, truncated = table[:, n_funcs], table[:, n_funcs + 1]
        varies = torch.cat([v for _, _, v in rounds])
        out = {"reward": reward.mean().item(), "reward_std": reward.std().item() if reward.numel() > 1 else 0.0}
        for j, f in enumerate(self.funcs):
            col = values[:, j]
            seen = col[~torch.isnan(col)]
            out[f"rewards/{f.short}/mean"] = seen.mean().item() if seen.numel() else float("nan")
            out[f"rewards/{f.short}/std"] = seen.std().item() if seen.numel() > 1 else 0.0
        out.update({"completions/mean_length": lengths.mean().item(), "completions/max_length": lengths.max().item(),
                    "completions/min_length": lengths.min().item(),
                    "completions/truncated_fraction": truncated.mean().item(),
                    "frac_reward_zero_std": 1.0 - varies.float().mean().item()})
        if self.g.dynamic_sampling:
            out["dynamic_sampling/rounds"] = len(rounds)
        return out


def stop_token_ids(source_dir: str | None, tokenizer) -> tuple[int, ...]:
    """The tokens that end a completion: the tokenizer's EOS and those of the checkpoint's
    generation_config.json (chat models list their end-of-turn token there, e.g. Qwen's
    <|im_end|> beside <|endoftext|>), as transformers' generate stops on them."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if source_dir is not None:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(source_dir).eos_token_id
        except OSError:  # no generation_config.json
            eos = None
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return tuple(sorted(ids))


@contextlib.contextmanager
def evaluating(model):
    """The model in eval mode (no LoRA dropout) for sampling and the sync check, then back to
    training."""
    model.eval()
    try:
        yield model
    finally:
        model.train()


def completion_seed(seed: int, rollout: int, round_: int, row: int) -> int:
    """A completion's sampling seed: from the run seed, the rollout, the dynamic-sampling round and
    the completion's index in the global batch, so it does not depend on the layout."""
    digest = hashlib.sha256(f"{seed}/{rollout}/{round_}/{row}".encode()).digest()
    return int.from_bytes(digest[:7], "little")

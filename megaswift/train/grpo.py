"""Group relative policy optimisation on the shared engine: rollouts, rewards, advantages, and the
clipped surrogate loss of train/grpo_loss.py; the optimizer step is the SFT engine's.

One step:
1. Rollout (`RolloutBatches.next_global_batch`, every num_iterations steps): the step's prompts
   (global batch / num_generations of them, split over dp) are completed num_generations times
   each by the training model itself (rollout/sampler.py), seeded per completion, so every layout
   samples the same completions. One rank of each model replica scores them with the reward
   functions; one all-reduce over the world gives every rank every reward, so advantages (and
   DAPO's dynamic sampling, which samples more prompts while groups have equal rewards) are
   decided the same way everywhere without further talk.
2. Before the first update on a rollout batch (`before_step`): the weight-sync check compares the
   rollout log-probabilities with the trainer's forward on one micro batch, and, with beta > 0,
   the reference model's log-probabilities are computed once for the batch.
3. Updates: the loss of every completion token, against the rollout log-probabilities (the
   importance ratio's denominator), normalised by the loss type's units over the global batch.

Rows are [prompt | completion | padding] of data.seq_len tokens, labelled on the completion.
Per-completion tensors ([rows, max_new_tokens]: which row position predicts each completion
token, its rollout log-probability, its reference log-probability) are not sequence-shaped, so
context parallelism leaves them whole; under CP each rank gathers its tokens' log-probabilities
from the others (gather_sequence) and computes the whole loss, as DPO does.
"""
from __future__ import annotations

import contextlib
import hashlib
import time

import torch
import torch.distributed as dist

from megaswift import device
from megaswift.errors import MegaswiftError
from megaswift.parallel.context_parallel import gather_sequence
from megaswift.rollout import rewards as reward_lib
from megaswift.rollout.sampler import SamplingParams, generate

from . import grpo_loss
from .dpo import forward_without_schedule, load_reference, reference_context, reference_mode, reference_source
from .engine import Algorithm


class RolloutMismatchError(MegaswiftError):
    """The rollout engine's log-probabilities disagree with the trainer's on the same tokens."""


class GRPO(Algorithm):
    name = "grpo"
    loss_replicated_over_cp = True  # each cp rank gathers the whole rows' log-probabilities

    # -- setup -----------------------------------------------------------------------------------
    def build_data(self, trainer):
        from megaswift.data.prompts import PromptDataset, PromptOrder

        from .sft import loader_setup

        cfg = trainer.cfg
        self.trainer, self.cfg, self.st = trainer, cfg.grpo, trainer.st
        g = self.cfg
        self.tokenizer, loader_args = loader_setup(trainer)
        self.pad_id = loader_args["pad_id"]
        self.seq_len = cfg.data.seq_len
        max_prompt = cfg.data.max_prompt_len or self.seq_len - g.max_new_tokens
        dataset = PromptDataset(cfg.data.path, self.tokenizer, max_prompt)
        self.funcs = reward_lib.load_reward_funcs(g.reward_funcs, g.reward_weights)
        self.rows_per_step = cfg.train.global_batch(self.st.dp_size)
        self.metrics = ("clip_ratio/low", "clip_ratio/high", "clip_ratio/region") + (("kl",) if g.beta else ())
        trainer.model.logits_temperature = g.temperature
        self.rollout_model = trainer.model  # the built-in engine samples from the policy itself
        self.params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                     top_k=g.top_k, stop_token_ids=stop_token_ids(trainer.source_dir, self.tokenizer),
                                     stop_strings=tuple(g.stop_strings))
        self.ref_model, self.ref_mode = None, None
        if g.beta:
            self.ref_mode = reference_mode(cfg, "grpo")
            if self.ref_mode == "copy":
                self.ref_model = load_reference(trainer, reference_source(cfg, g.ref_path))
        self.dataset, self.rollouts, self._ref = dataset, 0, {}
        self.rollout_stats: dict = {}  # metrics of the current rollout batch, logged with each of its steps
        self.rollout_s = None  # seconds the last rollout took, logged with the step that waited for it
        if device.rank() == 0:
            cut = f", {dataset.truncated} cut to their last {max_prompt} tokens" if dataset.truncated else ""
            print(f"data: {len(dataset)} prompts from {cfg.data.path}{cut}; {self.rows_per_step // g.num_generations} "
                  f"prompts x {g.num_generations} completions per rollout; rewards: "
                  f"{', '.join(f.name for f in self.funcs)}", flush=True)
        return RolloutBatches(self, PromptOrder(len(dataset), cfg.train.seed))

    # -- rollout ---------------------------------------------------------------------------------
    def rollout(self, order) -> list[dict]:
        """This rank's micro batches for the next rollout batch (num_iterations steps)."""
        t0 = time.perf_counter()
        st, g = self.st, self.cfg
        G = g.num_generations
        n_global = self.rows_per_step // G  # groups per step
        n_local = n_global // st.dp_size
        self.rollouts += 1
        rounds = []
        for r in range(g.dynamic_sampling_max_rounds if g.dynamic_sampling else 1):
            prompts = order.take(n_global)[st.dp_rank * n_local: (st.dp_rank + 1) * n_local]
            local = self._generate(prompts, st.dp_rank * n_local, r)
            table = self._score_everywhere(local, n_global * G)
            rounds.append((local, table, self._group_varies(table)))
            if not g.dynamic_sampling or all(len(self._kept(rounds, n_local, d)) >= n_local
                                             for d in range(st.dp_size)):
                break
        picks = [self._pick(rounds, n_local, d) for d in range(st.dp_size)]
        # the final batch's rewards and lengths in global order, the same on every rank
        final = torch.cat([rounds[r][1][(d * n_local + j) * G: (d * n_local + j + 1) * G]
                           for d in range(st.dp_size) for r, j in picks[d]])
        n_funcs = len(self.funcs)
        reward = reward_lib.combine(final[:, :n_funcs], self.funcs)
        adv = grpo_loss.group_advantages(reward, G, g.scale_rewards)
        lengths = final[:, n_funcs]
        mine = [rounds[r][0][j * G + k] for r, j in picks[st.dp_rank] for k in range(G)]
        adv_mine = adv[st.dp_rank * n_local * G: (st.dp_rank + 1) * n_local * G]
        mask = torch.arange(g.max_new_tokens)[None, :] < lengths[:, None]
        self.step_units = grpo_loss.units(mask, g.loss_type, g.max_new_tokens)
        self.step_tokens = float(lengths.sum())
        self.rollout_stats = self._rollout_metrics(rounds, adv)
        self.rollout_s = time.perf_counter() - t0
        return self._micro_batches(mine, adv_mine)

    def _generate(self, prompt_ids: list[int], first_group: int, round_: int) -> list[dict]:
        """num_generations completions of each prompt: dicts of the prompt index, completion ids,
        rollout log-probabilities and whether the completion was truncated."""
        g, G = self.cfg, self.cfg.num_generations
        rows = [(i, (first_group + j) * G + k) for j, i in enumerate(prompt_ids) for k in range(G)]
        seeds = [_seed(self.trainer.cfg.train.seed, self.rollouts, round_, row) for _, row in rows]
        out = []
        chunk = g.generation_batch_size or len(rows)
        with evaluating(self.rollout_model) as model:
            for at in range(0, len(rows), chunk):
                part = rows[at: at + chunk]
                with self.trainer._autocast():  # bf16 autocast: sample with the numerics that train
                    gen = generate(model, [self.dataset.items[i][1] for i, _ in part], self.params,
                                   seeds[at: at + chunk], pad_id=self.pad_id, tokenizer=self.tokenizer)
                for (i, _), ids, lp, trunc in zip(part, gen.completion_ids, gen.logps, gen.truncated):
                    out.append({"prompt": i, "completion_ids": ids, "logps": lp, "truncated": trunc})
        return out

    def _completion_text(self, row: dict):
        text = self.tokenizer.decode(row["completion_ids"], skip_special_tokens=True)
        for s in self.cfg.stop_strings:
            if s in text:
                text = text[: text.index(s)]
        prompt = self.dataset.items[row["prompt"]][0]
        return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text

    def _score_everywhere(self, local: list[dict], n_rows: int) -> torch.Tensor:
        """[global rows, functions + 2] (rewards, completion length, truncated) on every rank.
        One rank per model replica calls the reward functions for its dp rank's rows; a failure
        there stops every rank with its message."""
        st = self.st
        n_funcs = len(self.funcs)
        table = torch.zeros(n_rows + 1, n_funcs + 2, dtype=torch.float64)  # last row: the error flag
        start = st.dp_rank * len(local)
        leader = st.tp_rank == 0 and st.cp_rank == 0 and st.pp_rank == 0
        error = None
        if leader:
            try:
                table[start: start + len(local), :n_funcs] = self._call_rewards(local)
            except reward_lib.RewardError as e:
                error = str(e)
                table[-1, 0] = 1
            for i, row in enumerate(local):
                table[start + i, n_funcs] = len(row["completion_ids"])
                table[start + i, n_funcs + 1] = float(row["truncated"])
        if dist.is_initialized() and dist.get_world_size() > 1:
            if error is not None:
                dist.distributed_c10d._get_default_store().set("megaswift/reward_error", error)
            t = table.to(self.trainer.device)
            dist.all_reduce(t)
            table = t.cpu()
            if table[-1, 0] > 0 and error is None:
                error = dist.distributed_c10d._get_default_store().get("megaswift/reward_error").decode()
        if error is not None:
            raise reward_lib.RewardError(error)
        return table[:-1]

    def _call_rewards(self, local: list[dict]) -> torch.Tensor:
        items = self.dataset.items
        prompts = [items[r["prompt"]][0] for r in local]
        columns = {c: [items[r["prompt"]][2].get(c) for r in local] for c in self.dataset.columns}
        return reward_lib.score(self.funcs, prompts, [self._completion_text(r) for r in local],
                                [r["completion_ids"] for r in local], columns, self.cfg.max_new_tokens)

    def _group_varies(self, table: torch.Tensor) -> torch.Tensor:
        """[groups] True where a group's rewards are not all equal."""
        reward = reward_lib.combine(table[:, : len(self.funcs)], self.funcs).view(-1, self.cfg.num_generations)
        return (reward.max(1).values - reward.min(1).values) > 1e-9

    def _kept(self, rounds, n_local: int, d: int) -> list[tuple[int, int]]:
        """(round, group) of dp rank d's groups with varying rewards, in the order sampled."""
        out = []
        for r, (_, _, varies) in enumerate(rounds):
            out += [(r, j) for j in range(n_local) if varies[d * n_local + j]]
        return out

    def _pick(self, rounds, n_local: int, d: int) -> list[tuple[int, int]]:
        """The groups dp rank d trains on: all of the first round's, or under dynamic sampling the
        first n_local with varying rewards, topped up with equal-reward ones if too few."""
        if not self.cfg.dynamic_sampling:
            return [(0, j) for j in range(n_local)]
        kept = self._kept(rounds, n_local, d)
        rest = [(r, j) for r in range(len(rounds)) for j in range(n_local) if (r, j) not in kept]
        return (kept + rest)[:n_local]

    def _rollout_metrics(self, rounds, adv: torch.Tensor) -> dict:
        """Over every completion sampled this rollout (all rounds): rewards, lengths; over the
        trained batch: advantages."""
        n_funcs = len(self.funcs)
        table = torch.cat([t for _, t, _ in rounds])
        values = table[:, :n_funcs]
        reward = reward_lib.combine(values, self.funcs)
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
                    "frac_reward_zero_std": 1.0 - varies.float().mean().item(),
                    "advantages/mean_abs": adv.abs().mean().item(), "advantages/std": adv.std().item(),
                    "advantages/max": adv.max().item(), "advantages/min": adv.min().item()})
        if self.cfg.dynamic_sampling:
            out["dynamic_sampling/rounds"] = len(rounds)
        return out

    def _micro_batches(self, rows: list[dict], adv: torch.Tensor) -> list[dict]:
        mbs, S, T = self.trainer.cfg.train.micro_batch_size, self.seq_len, self.cfg.max_new_tokens
        out = []
        for at in range(0, len(rows), mbs):
            part = rows[at: at + mbs]
            m = len(part)
            ids = torch.full((m, S), self.pad_id, dtype=torch.long)
            labels = torch.full((m, S), -100, dtype=torch.long)
            token_mask = torch.zeros(m, S, dtype=torch.bool)
            comp_index = torch.zeros(m, T, dtype=torch.long)
            comp_mask = torch.zeros(m, T, dtype=torch.bool)
            old = torch.zeros(m, T, dtype=torch.float32)
            for i, row in enumerate(part):
                p, c = self.dataset.items[row["prompt"]][1], row["completion_ids"]
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

    # -- the engine's hooks ----------------------------------------------------------------------
    def before_step(self, micro_batches: list[dict]) -> None:
        if self.source.iteration == 1:  # a fresh rollout batch
            self._ref = {}
            if self.cfg.sync_check:
                self._check_sync(micro_batches[0])
            if self.cfg.beta:
                for mb in micro_batches:
                    model = self.ref_model if self.ref_model is not None else self.trainer.model
                    with reference_context(self.trainer.model, self.ref_mode):
                        self._ref[mb["mb_index"]] = self._completion_logps(model, mb)
        for mb in micro_batches:
            mb["ref_logps"] = self._ref.get(mb["mb_index"])

    @torch.no_grad()
    def _completion_logps(self, model, mb: dict) -> torch.Tensor | None:
        """[rows, max_new_tokens] log-probabilities of the completion tokens (None off the last
        pipeline stage)."""
        out = forward_without_schedule(model, self.forward_inputs(mb))
        return None if out is None else self._logps(out, mb)

    def _logps(self, per_token_loss: torch.Tensor, mb: dict) -> torch.Tensor:
        st = self.st
        if st.cp_size > 1:  # this rank's tokens -> the whole rows
            per_token_loss = gather_sequence(per_token_loss, mb["cp_index"], mb["cp_source"], self.seq_len,
                                             st.cp_group)
        return -per_token_loss.gather(1, mb["comp_index"])

    def _check_sync(self, mb: dict) -> None:
        """Stop when the rollout engine's log-probabilities of its own tokens are not the trainer's."""
        with evaluating(self.trainer.model) as model:
            logps = self._completion_logps(model, mb)
        stats = torch.zeros(3, dtype=torch.float64, device=self.trainer.device)  # sum |diff|, tokens, max |diff|
        if logps is not None:
            mask = mb["comp_mask"]
            diff = (logps.double() - mb["old_logps"].double()).abs()[mask]
            stats[0], stats[1] = diff.sum(), float(diff.numel())
            stats[2] = diff.max() if diff.numel() else 0.0
        if dist.is_initialized() and dist.get_world_size() > 1:
            total = stats[:2].clone()
            dist.all_reduce(total)
            peak = stats[2:].clone()
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            stats = torch.cat([total, peak])
        mean = (stats[0] / stats[1].clamp_min(1)).item()
        self.rollout_stats.update({"rollout/logp_diff_mean": mean, "rollout/logp_diff_max": stats[2].item()})
        tol = self.cfg.sync_check_tol
        if tol is None:
            tol = 1e-3 if self.trainer.compute_dtype == torch.float32 else 5e-2
        if mean > tol:
            raise RolloutMismatchError(
                f"rollout engine and trainer disagree on their own tokens: mean |log p diff| {mean:.3g} over "
                f"{int(stats[1])} tokens (max {stats[2].item():.3g}) > grpo.sync_check_tol={tol:g}; the rollout "
                f"weights are stale or corrupted")

    def count(self, mb: dict) -> float:
        return grpo_loss.units(mb["comp_mask"], self.cfg.loss_type, self.cfg.max_new_tokens)

    def loss_from_output(self, per_token_loss, mb: dict):
        g = self.cfg
        logp = self._logps(per_token_loss, mb)
        mask = mb["comp_mask"]
        ref = mb.get("ref_logps")
        loss, stats = grpo_loss.per_token_loss(
            logp, mb["old_logps"].to(logp.dtype), mb["advantages"].to(logp.dtype), mask, epsilon=g.epsilon,
            epsilon_high=g.epsilon_high, beta=g.beta, ref_logp=None if ref is None else ref.to(logp.dtype),
            level=g.importance_sampling_level)
        total, _ = grpo_loss.aggregate(loss, mask, g.loss_type, g.max_new_tokens)
        # the engine divides these sums by the batch's units; per-token means want its tokens
        per_token = self.step_units / max(self.step_tokens, 1.0)
        extra = {"clip_ratio/low": stats["clipped_low"] * per_token, "clip_ratio/high": stats["clipped_high"] * per_token,
                 "clip_ratio/region": (stats["clipped_low"] + stats["clipped_high"]) * per_token}
        if g.beta:
            extra["kl"] = stats["kl"] * per_token
        return total, extra

    def step_metrics(self, data_s: float, step_s: float) -> dict:
        out = dict(self.rollout_stats)
        rollout_s, self.rollout_s = self.rollout_s or 0.0, None
        out.update({"time/rollout_s": rollout_s, "time/rollout_share": rollout_s / max(step_s, 1e-9),
                    "time/update_share": max(0.0, step_s - data_s) / max(step_s, 1e-9)})
        return out


class RolloutBatches:
    """GRPO's data source for the engine: each call gives one optimizer step's micro batches; a
    rollout batch serves grpo.num_iterations steps. A resumed run starts a fresh rollout batch."""

    def __init__(self, alg: GRPO, order):
        self.alg, self.order = alg, order
        self.batches: list[dict] | None = None
        self.iteration = 0
        alg.source = self

    def next_global_batch(self) -> list[dict]:
        if self.batches is None or self.iteration == self.alg.cfg.num_iterations:
            self.batches, self.iteration = self.alg.rollout(self.order), 0
        self.iteration += 1
        return self.batches

    def state_dict(self) -> dict:
        return {"prompts": self.order.state_dict(), "rollouts": self.alg.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["prompts"])
        self.alg.rollouts = state["rollouts"]


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


def _seed(seed: int, rollout: int, round_: int, row: int) -> int:
    """A completion's sampling seed: from the run seed, the rollout, the dynamic-sampling round and
    the completion's index in the global batch, so it does not depend on the layout."""
    digest = hashlib.sha256(f"{seed}/{rollout}/{round_}/{row}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


def run(cfg) -> dict:
    from .build import build_trainer

    trainer = build_trainer(cfg, GRPO())
    return trainer.train()

"""Group relative policy optimisation on the shared engine: rollouts (rollout/), advantages, and
the clipped surrogate loss of train/grpo_loss.py; the optimizer step is the engine's.

One step:
1. Rollout (every grpo.num_iterations steps): rollout/generation.py samples and scores the
   step's completions; the same rewards reach every rank, so advantages are computed everywhere.
2. Before the first update on a rollout batch: the weight-sync check compares the rollout
   log-probabilities with the trainer's forward on one micro batch, and with beta > 0 the
   reference model's log-probabilities are computed once for the batch (train/reference.py).
3. Updates: the loss of every completion token against the rollout log-probabilities (the
   importance ratio's denominator), normalised by the loss type's units over the global batch.
Under CP each rank gathers its tokens' log-probabilities from the others (gather_sequence) and
computes the whole loss, as DPO does.
"""
from __future__ import annotations

import torch

from megaswift import device
from megaswift.errors import ConfigError, MegaswiftError
from megaswift.parallel import collectives
from megaswift.parallel.context_parallel import gather_sequence
from megaswift.rollout import rewards as reward_lib

from . import grpo_loss
from .algorithm import Algorithm
from .grpo_batch import RolloutBatches, micro_batches
from .grpo_config import GRPOSection
from .reference import Reference


class RolloutMismatchError(MegaswiftError):
    """The rollout engine's log-probabilities disagree with the trainer's on the same tokens."""


class GRPO(Algorithm):
    name = "grpo"
    config_section = GRPOSection
    loss_replicated_over_cp = True  # each cp rank gathers the whole rows' log-probabilities
    generates = True

    @classmethod
    def check_plan(cls, cfg, layout, global_batch: int) -> None:
        """Batch and length rules, and the reward functions importable, before launch."""
        g = cfg.grpo
        if global_batch % (g.num_generations * layout.dp):
            raise ConfigError(f"train.global_batch_size={global_batch} (completions per step) must be a multiple of "
                              f"grpo.num_generations x dp = {g.num_generations} x {layout.dp} = "
                              f"{g.num_generations * layout.dp}: each dp rank samples whole groups")
        if cfg.data.packing:
            raise ConfigError("data.packing is not supported by grpo: each row is one prompt and its completion")
        room = cfg.data.seq_len - g.max_new_tokens
        if room < 1 or (cfg.data.max_prompt_len or 0) > room:
            raise ConfigError(f"data.seq_len={cfg.data.seq_len} must hold data.max_prompt_len "
                              f"({cfg.data.max_prompt_len or 'at least 1'}) + grpo.max_new_tokens ({g.max_new_tokens})")
        reward_lib.load_reward_funcs(g.reward_funcs, g.reward_weights)

    @classmethod
    def weight_sources(cls, cfg) -> list[str]:
        return [cfg.grpo.ref_path] if cfg.grpo.ref_path else []

    def build_data(self, ctx):
        from megaswift.data.prompts import PromptDataset, PromptOrder
        from megaswift.rollout.generation import RolloutEngine, stop_token_ids
        from megaswift.rollout.sampler import SamplingParams
        from megaswift.rollout.scoring import RewardScorer

        cfg, g = ctx.cfg, ctx.cfg.grpo
        self.ctx, self.cfg = ctx, g
        tokenizer = ctx.tokenizer()
        self.pad_id = ctx.loader_args(tokenizer)["pad_id"]
        max_prompt = cfg.data.max_prompt_len or cfg.data.seq_len - g.max_new_tokens
        self.dataset = PromptDataset(cfg.data.path, tokenizer, max_prompt)
        funcs = reward_lib.load_reward_funcs(g.reward_funcs, g.reward_weights)
        self.rows_per_step = cfg.train.global_batch(ctx.st.dp_size)
        self.metrics = ("clip_ratio/low", "clip_ratio/high", "clip_ratio/region") + (("kl",) if g.beta else ())
        ctx.model.logits_temperature = g.temperature
        params = SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature, top_p=g.top_p,
                                top_k=g.top_k, stop_token_ids=stop_token_ids(ctx.source_dir, tokenizer),
                                stop_strings=tuple(g.stop_strings))
        scorer = RewardScorer(funcs, self.dataset, tokenizer, g.stop_strings, g.max_new_tokens, ctx.st, ctx.device)
        # the built-in engine samples from the policy itself
        self.engine = RolloutEngine(ctx, g, ctx.model, self.dataset, tokenizer, params, scorer, self.pad_id)
        self.reference = Reference(ctx, "grpo") if g.beta else None
        self._ref: dict = {}
        self.rollout_stats: dict = {}  # metrics of the current rollout batch, logged with each of its steps
        self.rollout_s = None  # seconds the last rollout took, logged with the step that waited for it
        if device.rank() == 0:
            cut = f", {self.dataset.truncated} cut to their last {max_prompt} tokens" if self.dataset.truncated else ""
            print(f"data: {len(self.dataset)} prompts from {cfg.data.path}{cut}; {self.rows_per_step // g.num_generations}"
                  f" prompts x {g.num_generations} completions per rollout; rewards: "
                  f"{', '.join(f.name for f in funcs)}", flush=True)
        self.source = RolloutBatches(self.rollout, g.num_iterations, PromptOrder(len(self.dataset), ctx.seed),
                                     self.engine)
        return self.source

    def rollout(self, order) -> list[dict]:
        """This rank's micro batches for the next rollout batch, with their advantages."""
        g, st = self.cfg, self.ctx.st
        r = self.engine.collect(order, self.rows_per_step)
        n_funcs = len(self.engine.funcs)
        adv = grpo_loss.group_advantages(reward_lib.combine(r.table[:, :n_funcs], self.engine.funcs),
                                         g.num_generations, g.scale_rewards)
        lengths = r.table[:, n_funcs]
        mask = torch.arange(g.max_new_tokens)[None, :] < lengths[:, None]
        self.step_units = grpo_loss.units(mask, g.loss_type, g.max_new_tokens)
        self.step_tokens = float(lengths.sum())
        self.rollout_stats = dict(r.stats, **{"advantages/mean_abs": adv.abs().mean().item(),
                                              "advantages/std": adv.std().item(), "advantages/max": adv.max().item(),
                                              "advantages/min": adv.min().item()})
        self.rollout_s = r.seconds
        n_mine = len(r.rows)
        adv_mine = adv[st.dp_rank * n_mine: (st.dp_rank + 1) * n_mine]
        return micro_batches(r.rows, adv_mine, self.dataset.items, self.ctx.cfg.train.micro_batch_size,
                             self.ctx.cfg.data.seq_len, g.max_new_tokens, self.pad_id)

    # -- the engine's hooks ----------------------------------------------------------------------
    def before_step(self, micro_batches: list[dict]) -> None:
        if self.source.fresh:  # a fresh rollout batch
            self._ref = {}
            if self.cfg.sync_check:
                self._check_sync(micro_batches[0])
            if self.reference is not None:
                for mb in micro_batches:
                    out = self.reference.forward(self.forward_inputs(mb))
                    self._ref[mb["mb_index"]] = None if out is None else self._logps(out, mb)
        for mb in micro_batches:
            mb["ref_logps"] = self._ref.get(mb["mb_index"])

    def _logps(self, per_token_loss: torch.Tensor, mb: dict) -> torch.Tensor:
        """[rows, max_new_tokens] log-probabilities of the completion tokens."""
        st = self.ctx.st
        if st.cp_size > 1:  # this rank's tokens -> the whole rows
            per_token_loss = gather_sequence(per_token_loss, mb["cp_index"], mb["cp_source"],
                                             self.ctx.cfg.data.seq_len, st.cp_group)
        return -per_token_loss.gather(1, mb["comp_index"])

    @torch.no_grad()
    def _check_sync(self, mb: dict) -> None:
        """Stop when the rollout engine's log-probabilities of its own tokens are not the trainer's."""
        from megaswift.rollout.generation import evaluating

        with evaluating(self.ctx.model) as model:
            out = model.forward_without_schedule(**self.forward_inputs(mb))
        stats = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)  # sum |diff|, tokens, max |diff|
        if out is not None:
            diff = (self._logps(out, mb).double() - mb["old_logps"].double()).abs()[mb["comp_mask"]]
            stats[0], stats[1] = diff.sum(), float(diff.numel())
            stats[2] = diff.max() if diff.numel() else 0.0
        total, peak = collectives.all_reduce(stats[:2].clone()), collectives.all_reduce(stats[2:].clone(), "max")
        mean = (total[0] / total[1].clamp_min(1)).item()
        self.rollout_stats.update({"rollout/logp_diff_mean": mean, "rollout/logp_diff_max": peak[0].item()})
        tol = self.cfg.sync_check_tol
        if tol is None:
            tol = 1e-3 if self.ctx.compute_dtype == torch.float32 else 5e-2
        if mean > tol:
            raise RolloutMismatchError(
                f"rollout engine and trainer disagree on their own tokens: mean |log p diff| {mean:.3g} over "
                f"{int(total[1])} tokens (max {peak[0].item():.3g}) > grpo.sync_check_tol={tol:g}; the rollout "
                f"weights are stale or corrupted")

    def count(self, mb: dict) -> float:
        return grpo_loss.units(mb["comp_mask"], self.cfg.loss_type, self.cfg.max_new_tokens)

    def loss_from_output(self, per_token_loss, mb: dict):
        g = self.cfg
        logp = self._logps(per_token_loss, mb)
        mask, ref = mb["comp_mask"], mb.get("ref_logps")
        loss, stats = grpo_loss.per_token_loss(
            logp, mb["old_logps"].to(logp.dtype), mb["advantages"].to(logp.dtype), mask, epsilon=g.epsilon,
            epsilon_high=g.epsilon_high, beta=g.beta, ref_logp=None if ref is None else ref.to(logp.dtype),
            level=g.importance_sampling_level)
        total, _ = grpo_loss.aggregate(loss, mask, g.loss_type, g.max_new_tokens)
        # the engine divides these sums by the batch's units; per-token means want its tokens
        per_token = self.step_units / max(self.step_tokens, 1.0)
        extra = {"clip_ratio/low": stats["clipped_low"] * per_token,
                 "clip_ratio/high": stats["clipped_high"] * per_token,
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

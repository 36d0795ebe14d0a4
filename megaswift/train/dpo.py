"""Direct preference optimisation on the shared engine: a batch builder (preference pairs), the
reference log-probabilities, and the loss of train/dpo_loss.py; everything else is the engine's.

Sequence log-probabilities come from the model's vocab-parallel cross-entropy (the per-token
loss is -log p of each label, computed without gathering the vocabulary on one rank), summed
over the response tokens. Under context parallelism each cp rank sums its own tokens and the
sums are all-reduced (backward: identity), so every cp rank holds the whole pair's loss; under
pipeline parallelism it all happens on the last stage.

Reference log-probabilities, three ways (`dpo.reference`, `dpo.precompute_ref`), all equal: a
frozen copy or the policy with its adapters off (train/reference.py), or every pair's computed
once before training and kept in `<output_dir>/ref_logps.pt`, looked up by pair index.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from megaswift import device
from megaswift.errors import ConfigError
from megaswift.parallel import collectives
from megaswift.parallel.tp_comm import group_size, reduce_from_tp_region
from megaswift.section import Section, at_least

from .algorithm import Algorithm
from .dpo_loss import dpo_loss
from .reference import Reference, reference_mode

REF_FILE = "ref_logps.pt"


@dataclass(kw_only=True)
class DPOSection(Section):
    _section: ClassVar[str] = "dpo"

    beta: float = at_least(0.0, 0.1)
    """Strength of the KL anchor to the reference model (TRL's beta)."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust"] = "sigmoid"
    """DPO (sigmoid), SLiC (hinge), IPO, or robust DPO with label smoothing."""
    label_smoothing: float = at_least(0.0, 0.0)
    """Probability that a pair's preference is flipped (robust); must be below 0.5."""
    rpo_alpha: float = at_least(0.0, 0.0)
    """Weight of an NLL term on the chosen response (RPO): its mean token negative log-likelihood."""
    reference: Literal["auto", "copy", "adapters"] = "auto"
    """Where reference log-probabilities come from when not precomputed: a frozen copy of the
    starting model sharded like the policy, or the policy with its LoRA adapters switched off
    (auto: adapters under LoRA, else a copy)."""
    precompute_ref: bool = False
    """Compute every pair's reference log-probabilities once before training (with the starting
    weights) and keep them with the run, so no reference model is held during training."""
    ref_path: str | None = None
    """Reference weights (an HF directory or a megaswift checkpoint); default: the weights the
    run starts from (model.hf_path, or a weights-only checkpoint.load)."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type == "robust" and not self.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must be below 0.5 for the robust loss; got {self.label_smoothing}")
        if self.beta <= 0:
            raise ConfigError(f"dpo.beta must be > 0; got {self.beta}")


def sequence_logps(per_token_loss: torch.Tensor, labels: torch.Tensor, cp_group=None):
    """(summed log-probabilities [rows], response tokens [rows]) of each row's labelled tokens;
    all-reduced over the cp group when the rows are cp shards."""
    logps = -per_token_loss.sum(-1)
    tokens = (labels != -100).sum(-1).to(logps.dtype)
    if group_size(cp_group) > 1:
        logps = reduce_from_tp_region(logps, cp_group)  # forward: sum; backward: identity
        tokens = collectives.all_reduce(tokens.clone(), group=cp_group)
    return logps, tokens


class DPO(Algorithm):
    name = "dpo"
    config_section = DPOSection
    loss_replicated_over_cp = True  # a pair's loss is whole on every cp rank (see engine)
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected")

    @classmethod
    def check_plan(cls, cfg, layout, global_batch: int) -> None:
        if cfg.data.packing:
            raise ConfigError("data.packing is not supported by dpo: a micro batch holds whole pairs, one per row; "
                              "set data.packing false (pairs are padded to data.seq_len)")

    @classmethod
    def weight_sources(cls, cfg) -> list[str]:
        return [cfg.dpo.ref_path] if cfg.dpo.ref_path else []

    def build_data(self, ctx):
        from megaswift.data.preference import PreferenceDataset, PreferenceLoader

        cfg = ctx.cfg
        self.ctx, self.cfg = ctx, cfg.dpo
        tokenizer = ctx.tokenizer()
        dataset = PreferenceDataset(cfg.data.path, tokenizer, cfg.data.seq_len, cfg.data.max_prompt_len)
        loader = PreferenceLoader(dataset, **ctx.loader_args(tokenizer))
        self.mode = "precompute" if self.cfg.precompute_ref else reference_mode(cfg, "dpo")
        if device.rank() == 0:
            dropped = f", {dataset.dropped} dropped (no response token within data.seq_len)" if dataset.dropped else ""
            print(f"data: {len(dataset)} preference pairs from {cfg.data.path}{dropped}; reference: {self.mode}",
                  flush=True)
        if self.mode == "precompute":
            self.reference, self.table = None, self._reference_table(loader)
        else:
            self.reference = Reference(ctx, "dpo", self.mode)
        return loader

    def dry_run_batches(self, ctx, n_micro: int) -> list[dict]:
        """Pairs of full-length rows (chosen rows, then rejected), and the reference as the run
        would hold it (a precomputed table is a lookup: no model)."""
        from .algorithm import lm_rows

        cfg = ctx.cfg
        pairs = cfg.train.micro_batch_size
        if getattr(self, "ctx", None) is not ctx:  # the reference once, as build_data would
            self.ctx, self.cfg = ctx, cfg.dpo
            self.mode = "precompute" if self.cfg.precompute_ref else reference_mode(cfg, "dpo")
            self.reference, self.table = None, torch.zeros(max(1, n_micro * pairs), 2, dtype=torch.float64)
            if self.mode != "precompute":
                self.reference = Reference(ctx, "dpo", self.mode)
        out = []
        for i in range(n_micro):
            mb = lm_rows(2 * pairs, cfg.data.seq_len, ctx.model.cfg.vocab_size)
            mb["pair_index"] = torch.arange(i * pairs, (i + 1) * pairs)
            out.append(mb)
        return out

    # -- reference log-probabilities -------------------------------------------------------------
    def _reference_logps(self, reference: Reference, mb: dict) -> torch.Tensor | None:
        """[pairs, 2] (chosen, rejected) on the ranks that compute the loss, else None."""
        out = reference.forward(self.forward_inputs(mb))
        if out is None:
            return None
        logps, _ = sequence_logps(out, mb["labels"], self.ctx.st.cp_group)
        m = logps.shape[0] // 2
        return torch.stack([logps[:m], logps[m:]], dim=1).double()

    def _reference_table(self, loader) -> torch.Tensor:
        """[pairs, 2] reference log-probabilities of every pair, computed once (or read back from
        `<output_dir>/ref_logps.pt` on resume) and the same on every rank."""
        ctx = self.ctx
        path = ctx.path(REF_FILE)
        n = len(loader.dataset)
        if ctx.resume_dir is not None and os.path.isfile(path):
            table = torch.load(path, weights_only=True)
            if table.shape == (n, 2):
                return table
        # on a fresh run the policy holds the starting weights; a resumed one has moved on
        policy_is_reference = ctx.resume_dir is None and self.cfg.ref_path is None
        reference = Reference(ctx, "dpo", "policy" if policy_is_reference else "copy")
        table = self._compute_table(reference, loader, n)
        if device.rank() == 0:
            os.makedirs(ctx.output_dir, exist_ok=True)
            torch.save(table, path)
        return table

    def _compute_table(self, reference: Reference, loader, n: int) -> torch.Tensor:
        """Every pair's reference log-probabilities: dp ranks split the pairs (each forward padded
        to the same count, since MoE models reduce statistics over dp), the last stage fills them,
        and sums over dp and pp give every rank the whole table."""
        ctx, st = self.ctx, self.ctx.st
        mbs = loader.micro_batch_size
        mine = list(range(st.dp_rank, n, st.dp_size))
        per_rank = -(-n // st.dp_size)  # ceil: every rank runs as many forwards as the fullest one
        rounds = -(-per_rank // mbs)
        table = torch.zeros(n, 2, dtype=torch.float64, device=ctx.device)
        for k in range(rounds):
            chunk = mine[k * mbs: (k + 1) * mbs]
            real = len(chunk)
            chunk = chunk + [0] * (mbs - real)  # padding forwards keep the ranks in step
            mb = ctx.prepare_micro_batch(loader.collate_pairs(chunk))
            with ctx.autocast():
                logps = self._reference_logps(reference, mb)
            if logps is not None and real:
                table[torch.tensor(chunk[:real], device=ctx.device)] = logps[:real].to(table)
        for group in (st.dp_group, st.pp_group):
            collectives.all_reduce(table, group=group)
        return table.cpu()

    # -- the engine's hooks ----------------------------------------------------------------------
    def before_step(self, micro_batches: list[dict]) -> None:
        for mb in micro_batches:
            if self.mode == "precompute":
                mb["ref_logps"] = self.table[mb["pair_index"].cpu()].to(mb["input_ids"].device)
            else:
                mb["ref_logps"] = self._reference_logps(self.reference, mb)

    def count(self, mb: dict) -> int:
        return int(mb["pair_index"].numel())

    def loss_from_output(self, per_token_loss, mb: dict):
        c = self.cfg
        logps, tokens = sequence_logps(per_token_loss, mb["labels"], self.ctx.st.cp_group)
        m = logps.shape[0] // 2
        chosen, rejected = logps[:m], logps[m:]
        ref = mb["ref_logps"].to(logps.dtype)
        losses, chosen_r, rejected_r = dpo_loss(chosen, rejected, ref[:, 0], ref[:, 1], loss_type=c.loss_type,
                                                beta=c.beta, label_smoothing=c.label_smoothing,
                                                chosen_tokens=tokens[:m], rejected_tokens=tokens[m:])
        if c.rpo_alpha:  # RPO: the chosen response's mean token NLL
            losses = losses + c.rpo_alpha * (-chosen / tokens[:m].clamp_min(1))
        extra = {"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
                 "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
                 "rewards/margins": (chosen_r - rejected_r).sum(),
                 "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum()}
        return losses.sum(), extra

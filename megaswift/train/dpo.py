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

The reference-free loss types (simpo, cpo, orpo; train/dpo_loss.py `reference_free_loss`) hold
no reference at all: no copy, no adapters-off forward, no table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from megaswift import device
from megaswift.errors import ConfigError
from megaswift.parallel import collectives
from megaswift.parallel.tp_comm import group_size, reduce_from_tp_region
from megaswift.section import Section, at_least

from .algorithm import Algorithm
from .dpo_loss import REFERENCE_FREE, dpo_loss, reference_free_loss
from .reference import Reference, precomputed_table, reference_mode

REF_FILE = "ref_logps.pt"


@dataclass(kw_only=True)
class DPOSection(Section):
    _section: ClassVar[str] = "dpo"

    beta: float = at_least(0.0, 0.1)
    """Strength of the KL anchor to the reference model (TRL's beta); under simpo and cpo the
    scale of the log-probability margin, under orpo the weight of the odds-ratio term (TRL's)."""
    loss_type: Literal["sigmoid", "hinge", "ipo", "robust", "simpo", "cpo", "orpo"] = "sigmoid"
    """DPO (sigmoid), SLiC (hinge), IPO, robust DPO with label smoothing; or, with no reference
    model, SimPO, CPO or ORPO (TRL's CPOTrainer simpo / sigmoid and ORPOTrainer)."""
    simpo_gamma: float | None = None
    """SimPO's target reward margin gamma (TRL's simpo_gamma): simpo only; default 0.5."""
    cpo_alpha: float | None = at_least(0.0, None)
    """Weight of the chosen response's NLL (its mean token negative log-likelihood) under cpo and
    simpo (TRL's cpo_alpha); default 1.0 under cpo, 0 under simpo (pure SimPO)."""
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
        lt = self.loss_type
        # defaults are resolved where they are used (simpo_margin, nll_weight), never written
        # into the config: a saved config stays valid under another loss_type
        if self.simpo_gamma is not None and lt != "simpo":
            raise ConfigError(f"dpo.simpo_gamma is SimPO's margin and needs dpo.loss_type simpo; got loss_type {lt}")
        if self.cpo_alpha is not None and lt not in ("cpo", "simpo"):
            raise ConfigError(f"dpo.cpo_alpha weighs the NLL of cpo and simpo; got loss_type {lt} (ORPO's NLL has "
                              "weight 1; DPO's is dpo.rpo_alpha)")
        if not self.reference_free:
            return
        for key, value, default in (("ref_path", self.ref_path, None), ("precompute_ref", self.precompute_ref, False),
                                    ("reference", self.reference, "auto")):
            if value != default:
                raise ConfigError(f"dpo.{key} ({value}) has no use under dpo.loss_type {lt}: it trains without a "
                                  "reference model; remove the setting")
        for key in ("rpo_alpha", "label_smoothing"):
            if getattr(self, key):
                fix = "use dpo.cpo_alpha" if key == "rpo_alpha" and lt != "orpo" else "remove the setting"
                raise ConfigError(f"dpo.{key} is not used by dpo.loss_type {lt}; {fix}")

    @property
    def simpo_margin(self) -> float:
        """SimPO's gamma: simpo_gamma, or TRL's default 0.5."""
        return 0.5 if self.simpo_gamma is None else self.simpo_gamma

    @property
    def nll_weight(self) -> float:
        """The weight of the chosen response's NLL: 1 under orpo; cpo_alpha under cpo and simpo
        (TRL's defaults: 1 under cpo, 0 under simpo); 0 otherwise."""
        if self.loss_type == "orpo":
            return 1.0
        if self.loss_type in ("cpo", "simpo"):
            return self.cpo_alpha if self.cpo_alpha is not None else float(self.loss_type == "cpo")
        return 0.0

    @property
    def reference_free(self) -> bool:
        """SimPO, CPO and ORPO need no reference model."""
        return self.loss_type in REFERENCE_FREE


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

    def _set_up(self, ctx) -> None:
        """The section, the reference mode and the metrics of this run."""
        self.ctx, self.cfg = ctx, ctx.cfg.dpo
        self.mode = "precompute" if self.cfg.precompute_ref else reference_mode(ctx.cfg, "dpo")
        if self.cfg.reference_free:
            self.metrics = DPO.metrics + ("nll_loss",) + (
                ("log_odds_ratio", "log_odds_chosen") if self.cfg.loss_type == "orpo" else ())
        self.reference, self.table = None, None

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
        self._set_up(ctx)
        tokenizer = ctx.tokenizer()
        dataset = PreferenceDataset(cfg.data.path, tokenizer, cfg.data.seq_len, cfg.data.max_prompt_len)
        loader = PreferenceLoader(dataset, **ctx.loader_args(tokenizer))
        self.mode = "precompute" if self.cfg.precompute_ref else reference_mode(cfg, "dpo")
        if device.rank() == 0:
            dropped = f", {dataset.dropped} dropped (no response token within data.seq_len)" if dataset.dropped else ""
            print(f"data: {len(dataset)} preference pairs from {cfg.data.path}{dropped}; reference: {self.mode}",
                  flush=True)
        if self.mode == "precompute":
            self.table = precomputed_table(ctx, "dpo", REF_FILE, len(loader.dataset), loader.micro_batch_size,
                                           loader.collate_pairs, self._reference_logps)
        elif self.mode != "none":
            self.reference = Reference(ctx, "dpo", self.mode)
        return loader

    def dry_run_batches(self, ctx, n_micro: int) -> list[dict]:
        """Pairs of full-length rows (chosen rows, then rejected), and the reference as the run
        would hold it (a precomputed table is a lookup: no model)."""
        from .algorithm import lm_rows

        cfg = ctx.cfg
        pairs = cfg.train.micro_batch_size
        if getattr(self, "ctx", None) is not ctx:  # the reference once, as build_data would
            self._set_up(ctx)
            if self.mode == "precompute":
                self.table = torch.zeros(max(1, n_micro * pairs), 2, dtype=torch.float64)
            elif self.mode != "none":
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

    # -- the engine's hooks ----------------------------------------------------------------------
    def before_step(self, micro_batches: list[dict]) -> None:
        if self.mode == "none":
            return
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
        if c.reference_free:
            return self._reference_free_loss(chosen, rejected, tokens[:m], tokens[m:])
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

    def _reference_free_loss(self, chosen, rejected, chosen_tokens, rejected_tokens):
        """SimPO, CPO, ORPO: the preference term plus the chosen response's mean token NLL (weight
        cpo_alpha; 1 under orpo), per pair, so the engine's division by the step's pairs makes
        both means over pairs."""
        c = self.cfg
        losses, chosen_r, rejected_r, extras = reference_free_loss(
            chosen, rejected, chosen_tokens, rejected_tokens, loss_type=c.loss_type, beta=c.beta,
            simpo_gamma=c.simpo_margin)
        nll = -chosen / chosen_tokens.clamp_min(1)
        alpha = c.nll_weight
        if alpha:
            losses = losses + alpha * nll
        # logps as TRL logs them: the mean token log-probabilities under simpo and orpo, sums under cpo
        avg = c.loss_type != "cpo"
        shown_c = chosen / chosen_tokens.clamp_min(1) if avg else chosen
        shown_r = rejected / rejected_tokens.clamp_min(1) if avg else rejected
        extra = {"rewards/chosen": chosen_r.sum(), "rewards/rejected": rejected_r.sum(),
                 "rewards/accuracies": (chosen_r > rejected_r).float().sum(),
                 "rewards/margins": (chosen_r - rejected_r).sum(),
                 "logps/chosen": shown_c.detach().sum(), "logps/rejected": shown_r.detach().sum(),
                 "nll_loss": nll.detach().sum()}
        extra.update({k: v.sum() for k, v in extras.items()})
        return losses.sum(), extra

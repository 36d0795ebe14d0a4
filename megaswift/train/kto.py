"""Kahneman-Tversky optimisation (KTO) on the shared engine: a batch builder (unpaired, labelled
completions with their KL rows, data/unpaired.py), the reference log-probabilities, the batch's
KL estimate, and the loss of train/kto_loss.py; everything else is the engine's.

Every example brings two rows: its own (prompt + completion, the row that trains) and its KL row
(its prompt + another example's completion, fixed by the data set: data/unpaired.py). Before
any forward of a step (`before_step`), the policy (no gradient) and the reference score every
micro batch's KL rows, and z0 = max(0, mean over the global batch's KL rows of policy minus
reference log-probabilities) is summed over the micro batches and all-reduced over dp (and pp,
where only the last stage has the numbers; cp ranks already hold whole sequence sums), so z0 is
the same on every rank and independent of the layout and of gradient accumulation. TRL instead
takes each device's micro batch mean and averages those over devices; with one micro batch per
device and equal batches the two agree.

Reference log-probabilities, three ways (`kto.reference`, `kto.precompute_ref`), as DPO's: a
frozen copy or the policy with its adapters off (train/reference.py), or every example's (and
its KL row's) computed once before training and kept in `<output_dir>/kto_ref_logps.pt`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from megaswift import device
from megaswift.errors import ConfigError
from megaswift.parallel import collectives
from megaswift.section import Section, at_least

from .algorithm import Algorithm
from .dpo import sequence_logps
from .kto_loss import kl_estimate, kto_loss
from .reference import Reference, precomputed_table, reference_mode

REF_FILE = "kto_ref_logps.pt"


@dataclass(kw_only=True)
class KTOSection(Section):
    _section: ClassVar[str] = "kto"

    beta: float = at_least(0.0, 0.1)
    """Strength of the anchor to the reference model (TRL's beta)."""
    desirable_weight: float = at_least(0.0, 1.0)
    """Weight of the desirable examples' losses (TRL's desirable_weight); > 0."""
    undesirable_weight: float = at_least(0.0, 1.0)
    """Weight of the undesirable examples' losses (TRL's undesirable_weight); > 0. The KTO paper
    suggests desirable_weight x desirable examples / (undesirable_weight x undesirable examples)
    in [1, 4/3]."""
    reference: Literal["auto", "copy", "adapters"] = "auto"
    """Where reference log-probabilities come from when not precomputed: a frozen copy of the
    starting model sharded like the policy, or the policy with its LoRA adapters switched off
    (auto: adapters under LoRA, else a copy)."""
    precompute_ref: bool = False
    """Compute every example's (and its KL row's) reference log-probabilities once before
    training and keep them with the run, so no reference model is held during training."""
    ref_path: str | None = None
    """Reference weights (an HF directory or a megaswift checkpoint); default: the weights the
    run starts from (model.hf_path, or a weights-only checkpoint.load)."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"kto.{name} must be > 0; got {getattr(self, name)}")


def _rows(mb: dict, lo: int, hi: int, n: int) -> dict:
    """Rows lo:hi of a micro batch of n rows (every row-first tensor; the rest as it is)."""
    return {k: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v for k, v in mb.items()}


class KTO(Algorithm):
    name = "kto"
    config_section = KTOSection
    loss_replicated_over_cp = True  # an example's loss is whole on every cp rank (see engine)
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl",
               "count/desirable", "count/undesirable")

    @classmethod
    def check_plan(cls, cfg, layout, global_batch: int) -> None:
        if cfg.data.packing:
            raise ConfigError("data.packing is not supported by kto: a micro batch holds whole examples, one per "
                              "row; set data.packing false (examples are padded to data.seq_len)")

    @classmethod
    def weight_sources(cls, cfg) -> list[str]:
        return [cfg.kto.ref_path] if cfg.kto.ref_path else []

    def build_data(self, ctx):
        from megaswift.data.unpaired import UnpairedDataset, UnpairedLoader

        cfg = ctx.cfg
        self.ctx, self.cfg = ctx, cfg.kto
        tokenizer = ctx.tokenizer()
        dataset = UnpairedDataset(cfg.data.path, tokenizer, cfg.data.seq_len, cfg.data.max_prompt_len)
        loader = UnpairedLoader(dataset, **ctx.loader_args(tokenizer))
        self.mode = "precompute" if self.cfg.precompute_ref else reference_mode(cfg, "kto")
        if device.rank() == 0:
            dropped = f", {dataset.dropped} dropped (no completion token within data.seq_len)" if dataset.dropped else ""
            print(f"data: {len(dataset)} examples ({dataset.desirable} desirable, "
                  f"{len(dataset) - dataset.desirable} undesirable) from {cfg.data.path}{dropped}; "
                  f"reference: {self.mode}", flush=True)
        if self.mode == "precompute":
            self.reference = None
            self.table = precomputed_table(ctx, "kto", REF_FILE, len(loader.dataset), loader.micro_batch_size,
                                           loader.collate_examples, self._reference_logps)
        else:
            self.reference = Reference(ctx, "kto", self.mode)
        return loader

    def dry_run_batches(self, ctx, n_micro: int) -> list[dict]:
        """Examples of full-length rows (their rows, then their KL rows), and the reference as
        the run would hold it (a precomputed table is a lookup: no model)."""
        from .algorithm import lm_rows

        cfg = ctx.cfg
        m = cfg.train.micro_batch_size
        if getattr(self, "ctx", None) is not ctx:  # the reference once, as build_data would
            self.ctx, self.cfg = ctx, cfg.kto
            self.mode = "precompute" if self.cfg.precompute_ref else reference_mode(cfg, "kto")
            self.reference, self.table = None, torch.zeros(max(1, n_micro * m), 2, dtype=torch.float64)
            if self.mode != "precompute":
                self.reference = Reference(ctx, "kto", self.mode)
        out = []
        for i in range(n_micro):
            mb = lm_rows(2 * m, cfg.data.seq_len, ctx.model.cfg.vocab_size)
            mb["example_index"] = torch.arange(i * m, (i + 1) * m)
            mb["label"] = torch.arange(m) % 2 == 0
            out.append(mb)
        return out

    # -- log-probabilities -----------------------------------------------------------------------
    def _logps(self, out, mb: dict) -> torch.Tensor | None:
        if out is None:
            return None
        return sequence_logps(out, mb["labels"], self.ctx.st.cp_group)[0]

    def _reference_logps(self, reference: Reference, mb: dict) -> torch.Tensor | None:
        """[m, 2] (the example's row, its KL row) on the ranks that compute the loss, else None."""
        logps = self._logps(reference.forward(self.forward_inputs(mb)), mb)
        if logps is None:
            return None
        m = logps.shape[0] // 2
        return torch.stack([logps[:m], logps[m:]], dim=1).double()

    # -- the engine's hooks ----------------------------------------------------------------------
    def before_step(self, micro_batches: list[dict]) -> None:
        """Reference log-probabilities of every row, the policy's of every KL row (no gradient),
        then z0 over the global batch; each micro batch keeps only its examples' rows."""
        ctx, st = self.ctx, self.ctx.st
        dev = micro_batches[0]["input_ids"].device
        kl = torch.zeros(2, dtype=torch.float64, device=dev)      # sum of KL log-ratios, KL rows (last stage)
        counts = torch.zeros(2, dtype=torch.float64, device=dev)  # desirable examples, examples
        for mb in micro_batches:
            m = mb["label"].numel()
            if self.mode == "precompute":
                ref = self.table[mb["example_index"].cpu()].to(dev)
            else:
                ref = self._reference_logps(self.reference, mb)
            kl_rows = _rows(mb, m, 2 * m, 2 * m)
            with torch.no_grad():
                policy = self._logps(ctx.model.forward_without_schedule(**self.forward_inputs(kl_rows)), kl_rows)
            if policy is not None:
                kl += torch.stack([(policy.double() - ref[:, 1]).sum(), torch.tensor(float(m), device=dev,
                                                                                     dtype=torch.float64)])
            counts += torch.stack([mb["label"].sum().double(), torch.tensor(float(m), device=dev,
                                                                            dtype=torch.float64)])
            mb.update(_rows(mb, 0, m, 2 * m))
            mb["ref_logps"] = None if ref is None else ref[:, 0]
        both = collectives.all_reduce(torch.cat([kl, counts]), group=st.dp_group)
        if st.pp_size > 1:  # only the last stage has the log-probabilities
            both[:2] = collectives.all_reduce(both[:2].clone(), group=st.pp_group)
        self.kl = kl_estimate(both[0], both[1])
        self.n_good, self.n_all = both[2], both[3]

    def count(self, mb: dict) -> int:
        return int(mb["label"].numel())

    def loss_from_output(self, per_token_loss, mb: dict):
        c = self.cfg
        logps, _ = sequence_logps(per_token_loss, mb["labels"], self.ctx.st.cp_group)
        good = mb["label"]
        losses, rewards = kto_loss(logps, mb["ref_logps"].to(logps.dtype), good, self.kl, beta=c.beta,
                                   desirable_weight=c.desirable_weight, undesirable_weight=c.undesirable_weight)
        # the engine divides every sum by the global batch's examples: rescale the per-class sums
        # so that they come out as means over the desirable (undesirable) examples, as TRL's
        n_bad = self.n_all - self.n_good
        to_good = torch.where(self.n_good > 0, self.n_all / self.n_good.clamp_min(1), 0.0)
        to_bad = torch.where(n_bad > 0, self.n_all / n_bad.clamp_min(1), 0.0)
        both = (self.n_good > 0) & (n_bad > 0)
        logps_d, bad = logps.detach().double(), ~good
        r = rewards.double()
        chosen_r, rejected_r = r[good].sum() * to_good, r[bad].sum() * to_bad
        extra = {"rewards/chosen": chosen_r, "rewards/rejected": rejected_r,
                 "rewards/margins": torch.where(both, chosen_r - rejected_r, 0.0),
                 "logps/chosen": logps_d[good].sum() * to_good, "logps/rejected": logps_d[bad].sum() * to_bad,
                 "kl": self.kl * good.numel(), "count/desirable": good.sum().double() * self.n_all,
                 "count/undesirable": bad.sum().double() * self.n_all}
        return losses.sum(), extra

"""A frozen reference model: what DPO's and GRPO's KL anchors (and a distillation teacher) run.

Two ways to get reference outputs during training (`<section>.reference`):
- copy: a frozen model sharded like the policy, loaded from `<section>.ref_path` or the weights
  the run starts from;
- adapters: under LoRA, the policy itself with its adapters switched off (no second copy).
DPO's and KTO's third way, reference log-probabilities computed once before training, is
`precomputed_table` below, built on `Reference.forward`.
"""
from __future__ import annotations

import contextlib
import os

import torch

from megaswift import device, setup
from megaswift.errors import ConfigError
from megaswift.parallel import collectives


def reference_mode(cfg, section: str) -> str:
    """`<section>.reference` resolved: copy or adapters; "none" where the section's loss needs no
    reference (dpo's reference-free loss types: simpo, cpo, orpo)."""
    lora = cfg.model.lora.rank > 0
    sec = getattr(cfg, section)
    if getattr(sec, "reference_free", False):
        return "none"
    mode = sec.reference
    if mode == "auto":
        mode = "adapters" if lora and sec.ref_path is None else "copy"
    if mode == "adapters" and not lora:
        raise ConfigError(f"{section}.reference: adapters needs LoRA (model.lora.rank > 0): without adapters the "
                          "policy has no frozen base to serve as the reference")
    return mode


def reference_source(cfg, ref_path: str | None) -> str:
    """`ref_path`, else the weights the run starts from."""
    from megaswift.checkpoint.model_state import META_FILE, read_meta

    if ref_path:
        return ref_path
    if cfg.model.hf_path:
        return cfg.model.hf_path
    load = cfg.checkpoint.load
    if load and load != "latest" and os.path.isfile(os.path.join(load, META_FILE)) and "train" not in read_meta(load):
        return load
    raise ConfigError("the reference model needs weights: set dpo.ref_path / grpo.ref_path (an HF directory or a "
                      "megaswift checkpoint), or model.hf_path to the model the run started from")


class Reference:
    """Reference outputs for one algorithm section (`dpo`, `grpo`): `forward(inputs)` is the
    reference model's output on one micro batch (None off the last pipeline stage)."""

    def __init__(self, ctx, section: str, mode: str | None = None):
        self.ctx, self.section = ctx, section
        self.mode = mode or reference_mode(ctx.cfg, section)
        self.frozen = self.load() if self.mode == "copy" else None

    def load(self):
        """A frozen copy of the reference weights, sharded like the policy (the dry run: shaped
        only, nothing read)."""
        cfg = self.ctx.cfg
        source = None if self.ctx.dry_run else reference_source(cfg, getattr(cfg, self.section).ref_path)
        return setup.build_frozen_model(cfg, self.ctx.model, self.ctx.st, source)

    @property
    def model(self):
        return self.frozen if self.frozen is not None else self.ctx.model

    def context(self):
        """Where the policy itself is the reference (adapters off), the context that makes it so."""
        if self.frozen is None and self.mode == "adapters":
            return self.ctx.model.adapters_disabled()
        return contextlib.nullcontext()

    @torch.no_grad()
    def forward(self, inputs: dict):
        with self.context():
            return self.model.forward_without_schedule(**inputs)


def precomputed_table(ctx, section: str, filename: str, n: int, micro_batch_size: int, collate, logps
                      ) -> torch.Tensor:
    """[n, 2] reference log-probabilities of every example (DPO: a pair's chosen and rejected
    responses; KTO: an example's row and its KL row), computed once before training, or read
    back from `<output_dir>/<filename>` on resume, and the same on every rank.

    `collate(indices)` builds the micro batch of those examples and `logps(reference, mb)` gives
    its [m, 2] log-probabilities (None off the last pipeline stage). dp ranks split the examples,
    each running as many forwards as the fullest one (padding forwards keep the ranks in step:
    MoE models reduce statistics over dp); the last stage fills the table, and sums over dp and
    pp hand it to every rank."""
    path = ctx.path(filename)
    if ctx.resume_dir is not None and os.path.isfile(path):
        table = torch.load(path, weights_only=True)
        if table.shape == (n, 2):
            return table
    # on a fresh run the policy holds the starting weights; a resumed one has moved on
    policy_is_reference = ctx.resume_dir is None and getattr(ctx.cfg, section).ref_path is None
    reference = Reference(ctx, section, "policy" if policy_is_reference else "copy")
    st, mbs = ctx.st, micro_batch_size
    mine = list(range(st.dp_rank, n, st.dp_size))
    per_rank = -(-n // st.dp_size)  # ceil: every rank runs as many forwards as the fullest one
    rounds = -(-per_rank // mbs)
    table = torch.zeros(n, 2, dtype=torch.float64, device=ctx.device)
    for k in range(rounds):
        chunk = mine[k * mbs: (k + 1) * mbs]
        real = len(chunk)
        chunk = chunk + [0] * (mbs - real)
        mb = ctx.prepare_micro_batch(collate(chunk))
        with ctx.autocast():
            out = logps(reference, mb)
        if out is not None and real:
            table[torch.tensor(chunk[:real], device=ctx.device)] = out[:real].to(table)
    for group in (st.dp_group, st.pp_group):
        collectives.all_reduce(table, group=group)
    table = table.cpu()
    if device.rank() == 0:
        os.makedirs(ctx.output_dir, exist_ok=True)
        torch.save(table, path)
    return table

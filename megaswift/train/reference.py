"""A frozen reference model: what DPO's and GRPO's KL anchors (and a distillation teacher) run.

Two ways to get reference outputs during training (`<section>.reference`):
- copy: a frozen model sharded like the policy, loaded from `<section>.ref_path` or the weights
  the run starts from;
- adapters: under LoRA, the policy itself with its adapters switched off (no second copy).
(DPO's third way, reference log-probabilities computed once before training, is built on
`Reference.forward` in train/dpo.py.)
"""
from __future__ import annotations

import contextlib
import os

import torch

from megaswift import setup
from megaswift.errors import ConfigError


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

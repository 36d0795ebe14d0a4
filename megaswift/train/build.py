"""Everything before the first step: the plan (train/plan.py), the process groups, the model
and where its weights come from, then the Trainer. `run` is what `megaswift train` calls.
"""
from __future__ import annotations

import os
import sys

import torch

from megaswift import device, setup

from .optim import schedule_warnings
from .plan import Plan, plan_training, restart_attempt
from .registry import algorithm_class


def attach_lora(cfg, model, plan: Plan) -> None:
    """Adapters on the model, base frozen. A resumed LoRA run first loads its base weights from
    where the run started (its checkpoint holds the adapters only)."""
    lora = cfg.model.lora
    if plan.resume_dir is not None:
        base = plan.lora_base
        setup.load_weights(model, base)
    else:
        base = os.path.abspath(plan.hf_dir or plan.weights_dir)
    model.add_lora(lora.rank, lora.alpha, lora.dropout, lora.targets, seed=cfg.train.seed)
    model.lora_meta = {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout, "targets": lora.targets,
                       "base": base}


def build_trainer(cfg, algorithm):
    """Plan, start the process groups, build and fill the model, and hand over to the Trainer."""
    from .engine import Trainer

    plan = plan_training(cfg, device.world_size_from_env(), type(algorithm))
    if os.environ.get("RANK", "0") == "0":  # once, not per rank; `launch`'s own plan stays quiet
        for line in schedule_warnings(cfg.optim, cfg.train.steps):
            print(f"megaswift: warning: {line}", file=sys.stderr, flush=True)
    if restart_attempt() > 0 and os.environ.get("RANK", "0") == "0":  # before the process group exists
        where = f"resuming from {plan.resume_dir}" if plan.resume_dir else "no checkpoint yet, starting over"
        print(f"restart {restart_attempt()} (launch --max-restarts): {where}", flush=True)
    st = setup.setup_parallel(cfg, plan.layout)
    torch.manual_seed(cfg.train.seed)
    # fp32 master weights on every device; bf16/fp16 (model.dtype) is the autocast compute dtype
    model = setup.build_model(cfg, plan.model_cfg, st, setup.MASTER_DTYPE)
    if plan.hf_dir or plan.weights_dir:  # an HF directory or a weights-only megaswift checkpoint
        setup.load_weights(model, plan.hf_dir or plan.weights_dir)
    if cfg.model.lora.rank or plan.lora_base:
        attach_lora(cfg, model, plan)
    # a resumed run loads its weights inside the Trainer, after the dp buffers exist
    trainer = Trainer(cfg, algorithm, model, st, source_dir=plan.side_files, export_dtype=plan.export_dtype,
                      resume_dir=plan.resume_dir)
    return trainer


def run(cfg, algorithm: str) -> dict:
    """Train with the named algorithm (train/registry.py); the end-of-run summary."""
    return build_trainer(cfg, algorithm_class(algorithm)()).train()

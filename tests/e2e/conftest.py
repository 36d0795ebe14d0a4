import os

import pytest

SFT_STEPS = 1200  # briefly trained: about 30% held-out accuracy, so DPO and GRPO have room to act


@pytest.fixture(scope="session")
def arithmetic_sft(tmp_path_factory):
    """The quickstart's model, data and a short SFT on them (one process, ~35 s), shared by the
    DPO and GRPO learning tests: {"model", "train", "test", "hf" (the SFT export)}."""
    from megaswift.config import load_config
    from megaswift.quickstart import build_inputs
    from megaswift.train.build import build_trainer
    from megaswift.train.sft import SFT

    out = str(tmp_path_factory.mktemp("arithmetic"))
    paths = build_inputs(out)
    sft = {"model": {"hf_path": paths["model"], "attention_backend": "sdpa"},
           "data": {"path": paths["train"], "seq_len": 24},
           "train": {"steps": SFT_STEPS, "micro_batch_size": 16, "global_batch_size": 16, "seed": 0,
                     "output_dir": os.path.join(out, "sft")},
           "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 50, "weight_decay": 0.1, "clip_grad": 1.0},
           "checkpoint": {"export_hf": True}, "log": {"every": 10000}}
    build_trainer(load_config(None, [], base=sft), SFT()).train()
    return {**paths, "root": out, "hf": os.path.join(out, "sft", "hf")}

"""`megaswift quickstart`: the main job end to end, on CPU, with nothing downloaded.

1. build a tiny Qwen3-style checkpoint, a digit-level tokenizer and an addition data set;
2. SFT under TP=2: two processes on gloo, through `megaswift launch`, as a user would run it;
3. the run exports an HF checkpoint; transformers loads it and answers held-out questions.

It always runs on the CPU (two gloo ranks), also on a GPU machine, so that it behaves the same
everywhere; the GPU paths have their own tests and benchmark.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import yaml

from megaswift.errors import MegaswiftError

# Sizes of the data set and the training recipe (model sizes: arithmetic.MODEL_SIZE); tuned in
# benchmarks/quickstart_tuning.md: lr 3e-3 is unreliable across seeds, 1.5e-3 too slow.
N_TRAIN, N_TEST, N_EVAL = 8000, 200, 200
TRAIN = {
    "data": {"seq_len": 24},
    "train": {"steps": 1500, "micro_batch_size": 16, "global_batch_size": 16, "seed": 0},
    "optim": {"lr": 2e-3, "min_lr": 2e-4, "warmup_steps": 50, "schedule": "cosine", "weight_decay": 0.1,
              "clip_grad": 1.0},
    "log": {"every": 100},
}


def build_inputs(out: str, seed: int = 0) -> dict:
    """Tokenizer, random-weight model and data under `out`; returns their paths."""
    from transformers import AutoTokenizer

    from megaswift.recipes import arithmetic

    model_dir = os.path.join(out, "model")
    arithmetic.write_tokenizer(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    arithmetic.write_model(model_dir, len(tok), seed=seed, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id, **arithmetic.MODEL_SIZE)
    train, test = arithmetic.write_arithmetic_data(os.path.join(out, "data"), N_TRAIN, N_TEST, seed=seed)
    return {"model": model_dir, "train": train, "test": test}


def write_config(out: str, paths: dict, steps: int | None) -> str:
    cfg = json.loads(json.dumps(TRAIN))
    cfg["model"] = {"hf_path": paths["model"], "attention_backend": "sdpa"}
    cfg["data"]["path"] = paths["train"]
    cfg["parallel"] = {"tp": 2}
    cfg["train"]["output_dir"] = os.path.join(out, "run")
    if steps:
        cfg["train"]["steps"] = steps
    cfg["checkpoint"] = {"export_hf": True, "export_overwrite": True}  # run/hf is the quickstart's own
    path = os.path.join(out, "sft.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def quickstart_command(ns) -> int:
    from megaswift.recipes import arithmetic

    out = os.path.abspath(ns.out)
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/3] building a tiny Qwen3 checkpoint, tokenizer and {N_TRAIN} addition questions in {out}", flush=True)
    paths = build_inputs(out)
    config = write_config(out, paths, ns.steps)
    cmd = [sys.executable, "-m", "megaswift", "launch", "--nproc-per-node", "2", "--", "train", "sft", "--config", config]
    print(f"[2/3] SFT under TP=2 on two CPU processes:\n      megaswift {' '.join(cmd[3:])}", flush=True)
    env = {**os.environ, "MEGASWIFT_FORCE_CPU": "1", "OMP_NUM_THREADS": "1"}
    code = subprocess.call(cmd, env=env)
    if code != 0:
        raise MegaswiftError(f"training failed with exit code {code}; its output is above")
    hf_dir = os.path.join(out, "run", "hf")
    print(f"[3/3] loading the export {hf_dir} with transformers and answering {N_EVAL} held-out questions",
          flush=True)
    result = arithmetic.evaluate(hf_dir, paths["test"], n=N_EVAL)
    for q, want, got in result["examples"][:8]:
        print(f"      {q:<22} -> {got!r:<7} ({'right' if got.strip() == want else 'expected ' + want})")
    print(f"held-out accuracy: {result['correct']}/{result['total']} = {100 * result['accuracy']:.1f}% "
          f"(quickstart took {time.perf_counter() - t0:.0f} s)", flush=True)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    return 0

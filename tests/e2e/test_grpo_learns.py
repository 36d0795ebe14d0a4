"""GRPO learns: the tiny arithmetic model, briefly SFT-trained (tests/e2e/conftest.py), then GRPO
at tp=2 through the CLI (`megaswift launch -- train grpo`, configs/grpo_arithmetic.yaml: 40 steps,
64 prompts x 8 completions, exact-match reward) raises the mean reward of its own samples
clearly from the first 5 steps to the last 5, and the export answers more held-out questions.

Measured on the 2-core machine (about 80 s with the launch and both evaluations): mean reward
0.228 over the first 5 steps, 0.350 over the last 5; held-out greedy accuracy 0.320 -> 0.480;
the sync check's largest |log-prob difference| 1.9e-5 (tp=2)."""
import json
import os

import yaml

from megaswift.recipes import arithmetic
from tests.helpers.cli import megaswift


def test_grpo_raises_the_exact_match_reward(arithmetic_sft):
    out = arithmetic_sft["root"]
    train, _ = arithmetic.write_prompt_data(os.path.join(out, "prompts"), 2000, 200, seed=1)
    with open(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "grpo_arithmetic.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["hf_path"], cfg["data"]["path"] = arithmetic_sft["hf"], train
    cfg["train"]["output_dir"] = os.path.join(out, "grpo")
    config = os.path.join(out, "grpo.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    megaswift("launch", "--nproc-per-node", "2", "--", "train", "grpo", "--config", config, timeout=600)
    with open(os.path.join(out, "grpo", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == cfg["train"]["steps"]
    reward = [r["reward"] for r in rows]
    first, last = sum(reward[:5]) / 5, sum(reward[-5:]) / 5
    before = arithmetic.evaluate(arithmetic_sft["hf"], arithmetic_sft["test"], n=200)["accuracy"]
    after = arithmetic.evaluate(os.path.join(out, "grpo", "hf"), arithmetic_sft["test"], n=200)["accuracy"]
    share = sum(r["time/rollout_share"] for r in rows) / len(rows)
    print(f"exact-match reward: first 5 steps {first:.3f}, last 5 {last:.3f}; held-out greedy accuracy "
          f"{before:.3f} -> {after:.3f}; rollout share of step time {share:.2f}; "
          f"sync check max |diff| {max(r['rollout/logp_diff_max'] for r in rows):.2e}")
    assert last > first + 0.05
    assert after > before
    assert all(r["rollout/logp_diff_max"] < 1e-4 for r in rows)

"""DPO learns a preference that generalises: a tiny model briefly SFT-trained on addition, then
DPO at tp=2 through the CLI (`megaswift launch -- train dpo`) on pairs whose rejected answer is off
by 1-10, ends with rewards/accuracies above 0.9 on its training batches and prefers the correct
sum on more held-out pairs than before (measured with transformers on the export).

Measured on the 2-core machine, from the shared 1200-step SFT (tests/e2e/conftest.py):
rewards/accuracies 0.562 over the first 10 DPO steps, 1.000 over the last 10; held-out preference
0.885 after SFT, 0.950 after DPO."""
import json
import os

import yaml

from megaswift.recipes import arithmetic
from tests.helpers.cli import megaswift


def test_dpo_lifts_rewards_and_held_out_preference(arithmetic_sft):
    out, sft_hf = arithmetic_sft["root"], arithmetic_sft["hf"]
    train, test = arithmetic.write_preference_data(os.path.join(out, "pairs"), 400, 200, seed=1)
    before = arithmetic.preference_accuracy(sft_hf, test)

    with open(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "dpo_arithmetic.yaml")) as f:
        cfg = yaml.safe_load(f)
    cfg["model"]["hf_path"], cfg["data"]["path"] = sft_hf, train
    cfg["train"]["output_dir"] = os.path.join(out, "dpo")
    cfg["log"] = {"every": 100}
    config = os.path.join(out, "dpo.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    megaswift("launch", "--nproc-per-node", "2", "--", "train", "dpo", "--config", config, timeout=600)
    with open(os.path.join(out, "dpo", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    last = sum(r["rewards/accuracies"] for r in rows[-10:]) / 10
    after = arithmetic.preference_accuracy(os.path.join(out, "dpo", "hf"), test)
    print(f"rewards/accuracies first 10 steps {sum(r['rewards/accuracies'] for r in rows[:10]) / 10:.3f}, "
          f"last 10 {last:.3f}; held-out preference {before:.3f} -> {after:.3f}")
    assert last > 0.9
    assert after > before and after > 0.85

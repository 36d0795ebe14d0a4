"""The README's main job, run as a user runs it: `megaswift quickstart` trains SFT at TP=2 on two
CPU processes, exports, and transformers answers held-out addition questions from the export."""
import json

from tests.helpers.cli import megaswift

MIN_ACCURACY = 0.5  # measured 99.5% with this recipe (README); chance is about 1%


def test_quickstart_learns_and_exports(tmp_path):
    out = tmp_path / "qs"
    proc = megaswift("quickstart", "--out", str(out), timeout=900)
    assert "held-out accuracy" in proc.stdout, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    assert rows[-1]["loss"] < rows[0]["loss"] / 5, (rows[0]["loss"], rows[-1]["loss"])
    result = json.load(open(out / "eval.json"))
    assert result["total"] == 200
    assert result["accuracy"] >= MIN_ACCURACY, result["examples"][:10]

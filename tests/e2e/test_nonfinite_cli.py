"""The reproduction of issue 18 item 1 through the CLI: at lr 1e5 the gradients go NaN at step 2.

Before: every step logged `loss nan`, NaN checkpoints were saved and `keep` pruned the good
ones, the HF export was 70% NaN, and the summary crashed on min() of nothing. Now the run stops
at step 2 with one line naming it and the last good checkpoint, which is still there."""
import json
import os

from tests.helpers.train import write_chat_data
from tests.helpers.cli import megaswift

BLOW_UP = ["--optim.lr", "1e5", "--train.steps", "10", "--checkpoint.every", "1", "--checkpoint.keep", "2",
           "--checkpoint.export_hf", "true", "--data.seq_len", "64", "--train.micro_batch_size", "2",
           "--train.global_batch_size", "4"]


def _train(tiny_hf, tmp_path, *extra):
    data = write_chat_data(str(tmp_path / "train.jsonl"))
    run = tmp_path / "run"
    proc = megaswift("train", "sft", "--model.hf_path", tiny_hf["llama"], "--data.path", data,
                     "--train.output_dir", str(run), *BLOW_UP, *extra, check=False)
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    return proc, run, rows


def _finite_checkpoints(run):
    root = run / "checkpoints"
    names = sorted(os.listdir(root))
    assert all(json.load(open(root / n / "megaswift.json")).get("finite") is True for n in names)
    return names


def test_a_run_that_goes_nan_stops_and_keeps_its_last_good_checkpoint(tiny_hf, tmp_path):
    proc, run, rows = _train(tiny_hf, tmp_path)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megaswift: error:")]
    assert errors == [f"megaswift: error: step 2: the gradient norm is nan; the run stopped before applying it "
                      f"(train.on_nonfinite=stop), the last good checkpoint is {run}/checkpoints/step_1; lower "
                      f"optim.lr, or set train.on_nonfinite=skip to drop such steps"], proc.stderr
    assert "Traceback" not in proc.stderr
    assert [r["step"] for r in rows] == [1, 2]  # the failing step is logged, then nothing more
    assert _finite_checkpoints(run) == ["step_1"]
    assert not (run / "hf").exists()  # no export of a run that did not finish


def test_skip_drops_steps_up_to_the_limit(tiny_hf, tmp_path):
    proc, run, rows = _train(tiny_hf, tmp_path, "--train.on_nonfinite", "skip", "--train.max_skipped_steps", "2")
    assert proc.returncode == 2, proc.stderr
    assert "step 4: the gradient norm is nan: 3 non-finite steps in a row, more than train.max_skipped_steps=2" \
        in proc.stderr, proc.stderr
    assert [(r["step"], r.get("skipped"), r.get("skipped_steps")) for r in rows] == [
        (1, None, None), (2, 1, 1), (3, 1, 2), (4, 1, 3)]
    assert _finite_checkpoints(run) == ["step_2", "step_3"]  # skipped steps keep the finite weights
    assert not (run / "hf").exists()

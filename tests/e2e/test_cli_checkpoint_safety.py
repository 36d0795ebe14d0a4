"""A crafted or damaged checkpoint through the CLI: `export-hf DIR`, `train sft --checkpoint.load DIR`
and `--checkpoint.load latest` refuse it in one line (or, for latest, resume from the previous
good checkpoint) and never run the code a crafted `.metadata` carries."""
import os
import pickle
import shutil

import pytest
import yaml

from tests.helpers.train import run_train, train_config, write_chat_data
from tests.helpers.cli import megaswift


@pytest.fixture(scope="module")
def trained(tiny_hf, tmp_path_factory):
    """A 2-step SFT run (tiny llama, a checkpoint after each step) and a CLI config for it."""
    root = tmp_path_factory.mktemp("ckpt_safety")
    data = write_chat_data(str(root / "data" / "train.jsonl"), n=16)
    run_train(0, 1, tiny_hf["llama"], data, str(root / "run"), train__steps=2, checkpoint__every=1)
    cfg = train_config(tiny_hf["llama"], data, str(root / "run"), checkpoint__every=1).to_dict()
    with open(root / "sft.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    return {"run": str(root / "run"), "config": str(root / "sft.yaml")}


class _RunsCommand:
    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _craft(path: str, marker) -> None:
    payload = _RunsCommand()
    payload.marker = marker
    with open(path, "wb") as f:
        pickle.dump(payload, f)


def _one_error_line(proc, *expected):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("megaswift: error:") == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("megaswift: error:"))
    for text in expected:
        assert text in line, line


@pytest.fixture
def run_copy(trained, tmp_path):
    return str(shutil.copytree(trained["run"], tmp_path / "run"))


def _step(run, n):
    return os.path.join(run, "checkpoints", f"step_{n}")


def test_export_hf_refuses_a_crafted_checkpoint(run_copy, tmp_path):
    marker = tmp_path / "MARKER"
    _craft(os.path.join(_step(run_copy, 2), "model", ".metadata"), marker)
    proc = megaswift("export-hf", _step(run_copy, 2), str(tmp_path / "hf"), check=False)
    _one_error_line(proc, "model/.metadata holds a disallowed object", f"{os.system.__module__}.system")
    assert not marker.exists()


def test_train_refuses_a_crafted_checkpoint_load(trained, run_copy, tmp_path):
    marker = tmp_path / "MARKER"
    _craft(os.path.join(_step(run_copy, 2), "optim", ".metadata"), marker)
    proc = megaswift("train", "sft", "--config", trained["config"], "--train.output_dir", str(tmp_path / "new"),
                     "--checkpoint.load", _step(run_copy, 2), "--train.steps", "3", check=False)
    _one_error_line(proc, "optim/.metadata holds a disallowed object", f"{os.system.__module__}.system")
    assert not marker.exists()


def test_latest_resumes_from_the_previous_checkpoint_past_a_crafted_one(trained, run_copy, tmp_path):
    marker = tmp_path / "MARKER"
    _craft(os.path.join(_step(run_copy, 2), "model", ".metadata"), marker)
    proc = megaswift("train", "sft", "--config", trained["config"], "--train.output_dir", run_copy,
                     "--checkpoint.load", "latest", "--train.steps", "3", check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    notes = [ln for ln in proc.stdout.splitlines() if "is damaged" in ln]
    assert len(notes) == 1 and notes[0].startswith("checkpoint step_2 is damaged ("), proc.stdout
    assert "disallowed object" in notes[0] and notes[0].endswith("; resuming from step_1"), notes[0]
    assert not marker.exists()
    assert f"resumed from {_step(run_copy, 1)} at step 1" in proc.stdout, proc.stdout
    from megaswift.checkpoint.train_state import check_checkpoint
    assert check_checkpoint(_step(run_copy, 3))["train"]["step"] == 3


def test_latest_with_only_damaged_checkpoints_is_one_line(trained, run_copy, tmp_path):
    marker = tmp_path / "MARKER"
    _craft(os.path.join(_step(run_copy, 2), "model", ".metadata"), marker)
    os.remove(os.path.join(_step(run_copy, 1), "model", "__0_0.distcp"))
    proc = megaswift("train", "sft", "--config", trained["config"], "--train.output_dir", run_copy,
                     "--checkpoint.load", "latest", "--train.steps", "3", check=False)
    _one_error_line(proc, "checkpoint.load=latest: no intact checkpoint", "disallowed object")
    assert not marker.exists()

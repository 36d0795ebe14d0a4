"""Resume: 6 steps straight equal 3 steps + resume + 3 steps, bitwise at the same layout and within
fp32 tolerance (rtol 1e-5) at another layout; a save killed midway leaves the last checkpoint whole;
a DeepSeek-V3 run whose expert biases move every step resumes bitwise, biases included."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.helpers.train import run_train, train_config, write_chat_data
from megaswift.checkpoint.train_state import completed_steps
from megaswift.testing.dist import run_distributed


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat_data(str(tmp_path_factory.mktemp("sft") / "train.jsonl"))


@pytest.fixture(scope="module")
def straight(tiny_hf, data, tmp_path_factory):
    """6 steps at tp=2 in one go, saving every 3 steps."""
    out = str(tmp_path_factory.mktemp("straight"))
    metrics = run_distributed(run_train, 2, tiny_hf["llama"], data, out, parallel__tp=2, train__steps=6,
                              checkpoint__every=3)[0]
    return out, metrics


def _losses(metrics, steps):
    by_step = {m["step"]: m for m in metrics}
    return [by_step[s]["loss"] for s in steps], [by_step[s]["grad_norm"] for s in steps]


def test_straight_run_saved_and_logged(straight):
    out, metrics = straight
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "grad_norm", "lr", "tokens", "tokens_per_s", "elapsed_s"):
        assert all(key in m for m in metrics), key
    assert completed_steps(out) == [3, 6]
    assert metrics[-1]["loss"] < metrics[0]["loss"]


def test_resume_same_layout_is_bitwise(straight, tiny_hf, data, tmp_path):
    _, want = straight
    out = str(tmp_path)
    run_distributed(run_train, 2, tiny_hf["llama"], data, out, parallel__tp=2, train__steps=3)
    got = run_distributed(run_train, 2, tiny_hf["llama"], data, out, parallel__tp=2, train__steps=6,
                          checkpoint__load="latest")[0]
    assert _losses(got, range(1, 7)) == _losses(want, range(1, 7))  # exact equality, not a tolerance


def test_resume_at_another_layout(straight, tiny_hf, data):
    """Saved at tp=2 (dp=1); resumed at dp=2 with ZeRO-1 and two micro batches per rank."""
    out, want = straight
    got = run_distributed(run_train, 2, tiny_hf["llama"], data, os.path.join(out, "other"), train__steps=6,
                          checkpoint__load=os.path.join(out, "checkpoints", "step_3"), optim__zero=1,
                          train__micro_batch_size=2)[0]
    assert [m["step"] for m in got] == [4, 5, 6]
    np.testing.assert_allclose(_losses(got, (4, 5, 6)), _losses(want, (4, 5, 6)), rtol=1e-5)


def _cli(config_path, out, *extra, env=None):
    cmd = [sys.executable, "-m", "megaswift", "train", "sft", "--config", config_path, *extra]
    return subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def test_killed_save_keeps_previous_checkpoint(tiny_hf, data, tmp_path):
    out = str(tmp_path / "run")
    cfg = train_config(tiny_hf["llama"], data, out, train__steps=2).to_dict()
    path = str(tmp_path / "sft.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    first = _cli(path, out)
    assert first.wait(timeout=120) == 0, first.stdout.read()
    assert completed_steps(out) == [2]

    # resume towards step 4 and kill the job while step_4 is written but not yet committed
    second = _cli(path, out, "--train.steps", "4", "--checkpoint.load", "latest",
                  env={"MEGASWIFT_TEST_PAUSE_BEFORE_COMMIT_S": "120"})
    marker = os.path.join(out, "checkpoints", "step_4.tmp", "PAUSED")
    deadline = time.monotonic() + 120
    while not os.path.exists(marker):
        assert second.poll() is None, second.stdout.read()
        assert time.monotonic() < deadline, "the save never started"
        time.sleep(0.1)
    os.killpg(second.pid, signal.SIGKILL)
    second.wait()
    assert completed_steps(out) == [2]
    assert os.path.isdir(os.path.join(out, "checkpoints", "step_4.tmp"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        killed_run = [json.loads(line) for line in f]

    # `latest` skips the partial save, resumes from step 2 and repeats steps 3 and 4 exactly
    third = _cli(path, out, "--train.steps", "4", "--checkpoint.load", "latest")
    log = third.communicate(timeout=120)[0]
    assert third.returncode == 0, log
    assert "resumed from" in log and "step_2" in log
    assert completed_steps(out) == [2, 4]
    assert not os.path.exists(os.path.join(out, "checkpoints", "step_4.tmp"))
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the killed run's rows after step 2 are replaced
    assert [r["loss"] for r in rows[2:]] == [r["loss"] for r in killed_run if r["step"] in (3, 4)]


def test_weights_only_checkpoint_starts_a_new_run(tiny_hf, data, tmp_path):
    """checkpoint.load at an import-hf checkpoint (no training state) starts from its weights:
    the same losses as starting from the HF checkpoint itself."""
    from megaswift.checkpoint.model_state import save_model
    from megaswift.setup import hf_model_config
    from megaswift.config import load_config
    from megaswift.convert.hf_import import load_hf_into_model
    from megaswift.models.decoder import GPTModel

    hf = tiny_hf["qwen2"]
    model = GPTModel(hf_model_config(hf, load_config()))
    load_hf_into_model(model, hf)
    ckpt = str(tmp_path / "imported")
    save_model(model, ckpt, {"family": model.cfg.family, "model_config": model.cfg.to_dict(), "dtype": "float32"},
               extra_files_from=hf)
    from_hf = run_train(0, 1, hf, data, str(tmp_path / "a"), train__steps=2)
    from_ckpt = run_train(0, 1, hf, data, str(tmp_path / "b"), train__steps=2, checkpoint__load=ckpt)
    assert [m["loss"] for m in from_ckpt] == [m["loss"] for m in from_hf]


def test_zero1_checkpoint_resumes_bitwise_and_at_tp2(tiny_hf, data, tmp_path):
    """A save under ZeRO-1 (optimizer state gathered bucket by bucket, each dp rank writing every
    other parameter) resumes exactly at its own layout and within 1e-5 at tp=2."""
    hf, zero = tiny_hf["llama"], dict(optim__zero=1, parallel__ddp_bucket_size=20000)
    out = str(tmp_path / "z")
    want = run_distributed(run_train, 2, hf, data, out, train__steps=6, checkpoint__every=3, **zero)[0]
    step3 = os.path.join(out, "checkpoints", "step_3")
    same = run_distributed(run_train, 2, hf, data, str(tmp_path / "same"), train__steps=6,
                           checkpoint__load=step3, **zero)[0]
    assert _losses(same, (4, 5, 6)) == _losses(want, (4, 5, 6))
    other = run_distributed(run_train, 2, hf, data, str(tmp_path / "tp2"), train__steps=6,
                            checkpoint__load=step3, parallel__tp=2)[0]
    np.testing.assert_allclose(_losses(other, (4, 5, 6)), _losses(want, (4, 5, 6)), rtol=1e-5)


def test_expert_bias_run_resumes_bitwise(data, tmp_path):
    """deepseek_v3 (3 layers, 2 with experts) at pp=2, one biased layer per stage, with bias
    updates (moe.bias_update_rate) and the sequence-wise loss: 4 steps straight equal 2 steps,
    resume, 2 steps, bit for bit; the final checkpoints hold the same moved biases."""
    import torch

    from megaswift.checkpoint.model_state import read_canonical
    from megaswift.testing.tiny import make_tiny_hf

    hf = make_tiny_hf("deepseek_v3", str(tmp_path / "hf"), seed=30, num_hidden_layers=3)
    run = dict(parallel__pp=2, parallel__pp_layers="[2,1]", moe__aux_loss_coef=0.01, moe__aux_loss_type="seq",
               moe__bias_update_rate=0.05, train__steps=4)
    straight = str(tmp_path / "straight")
    want = run_distributed(run_train, 2, hf, data, straight, checkpoint__every=2, **run)[0]
    got = run_distributed(run_train, 2, hf, data, str(tmp_path / "resumed"), **run,
                          checkpoint__load=os.path.join(straight, "checkpoints", "step_2"))[0]
    assert [m["step"] for m in got] == [3, 4]
    for key in ("loss", "grad_norm", "moe_aux_loss", "moe_expert_bias_absmax"):
        assert [m[key] for m in got] == [m[key] for m in want[2:]], key
    names = {f"decoder.layers.{i}.mlp.router.expert_bias": (8,) for i in (1, 2)}
    at = {(d, s): read_canonical(os.path.join(tmp_path, d, "checkpoints", f"step_{s}"), names, torch.float32)
          for d, s in (("straight", 2), ("straight", 4), ("resumed", 4))}
    for n in names:
        assert torch.equal(at["resumed", 4][n], at["straight", 4][n]), n
        assert not torch.equal(at["straight", 2][n], at["straight", 4][n]), n  # they moved after the resume

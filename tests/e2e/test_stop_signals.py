"""A scheduler's stop signal and Ctrl-C under `megaswift launch` (issue 18 items 5 and 7).

SIGTERM (preemption, the time limit) or SIGUSR1 (Slurm's warning before the limit) to the
launcher: torchrun's agent forwards it to the ranks, which finish their step, agree, save one
checkpoint and exit 75; a rerun with SLURM_RESTART_COUNT set (what a requeued job sees) resumes
from that checkpoint without being told. Ctrl-C (SIGINT to the whole process group, as a
terminal sends it): one line saying where it stopped, no per-rank tracebacks, exit 130.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers.cli import process_tree
from tests.helpers.train import train_config, write_chat_data


@pytest.fixture(scope="module")
def config(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("stop")
    data = write_chat_data(str(root / "train.jsonl"))
    cfg = train_config(tiny_hf["llama"], data, str(root / "unused"), train__steps=400, parallel__timeout_s=60).to_dict()
    path = str(root / "sft.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _launch(config, out_dir, *extra, env=None):
    return [sys.executable, "-m", "megaswift", "launch", "--nproc-per-node", "2", "--", "train", "sft",
            "--config", config, "--train.output_dir", out_dir, *extra], {**os.environ, "MEGASWIFT_FORCE_CPU": "1",
                                                                         **(env or {})}


def _start(config, out_dir):
    cmd, env = _launch(config, out_dir)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _rows(out_dir) -> list[dict]:
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _signal_after_two_steps(proc, out_dir, send, timeout_s=120):
    """Wait until the run has logged 2 steps, `send()` a signal, return (exit code, output)."""
    deadline = time.monotonic() + timeout_s
    try:
        while len(_rows(out_dir)) < 2:
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the run logged no steps"
            time.sleep(0.2)
        send()
        log = proc.communicate(timeout=timeout_s)[0]
        return proc.returncode, log
    finally:
        for pid in process_tree(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _megaswift_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if line.startswith("megaswift: ")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_saves_and_a_requeued_run_resumes(config, sig, tmp_path):
    out = str(tmp_path / "out")
    proc = _start(config, out)
    code, log = _signal_after_two_steps(proc, out, lambda: proc.send_signal(sig))
    assert code == 75, log
    lines = _megaswift_lines(log)
    assert len(lines) == 1 and lines[0].startswith(f"megaswift: stopped: {sig.name} after step "), log
    assert "Traceback" not in log
    step = int(lines[0].split(" after step ")[1].split(":")[0])
    ckpt = os.path.join(out, "checkpoints", f"step_{step}")
    assert os.path.isfile(os.path.join(ckpt, "megaswift.json"))
    assert [r["step"] for r in _rows(out)] == list(range(1, step + 1))
    # the requeued job: the same command with SLURM_RESTART_COUNT=1, here for two more steps
    cmd, env = _launch(config, out, "--train.steps", str(step + 2), env={"SLURM_RESTART_COUNT": "1"})
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resumed from {ckpt} at step {step}" in again.stdout + again.stderr
    assert [r["step"] for r in _rows(out)][-2:] == [step + 1, step + 2]


def test_ctrl_c_under_launch_is_one_line(config, tmp_path):
    out = str(tmp_path / "out")
    proc = _start(config, out)
    code, log = _signal_after_two_steps(proc, out, lambda: os.killpg(proc.pid, signal.SIGINT))
    assert code == 130, log
    assert "Traceback" not in log, log
    lines = _megaswift_lines(log)
    assert len(lines) == 1 and lines[0].startswith("megaswift: interrupted: Ctrl-C during step "), log
    assert lines[0].endswith("the last complete checkpoint is none (none was saved yet)"), log

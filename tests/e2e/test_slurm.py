"""`megaswift slurm` against a real Slurm (tests/helpers/slurm_cluster.py): a 2-node SFT job, one srun
task per node, each running `megaswift launch` with the rendezvous on the first node, submitted
through sbatch, run to completion under slurmctld, leaving its metrics and its HF export.

Skipped, with the reason, only where Slurm is missing and cannot be installed (no root); CI runs
as root and installs Debian's packages (about 10 s)."""
import argparse
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers.train import train_config, write_chat_data
from megaswift.launch.slurm import add_arguments, render
from tests.helpers.slurm_cluster import LocalSlurm, Unavailable


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except Unavailable as e:
        cluster.stop()
        pytest.skip(f"no Slurm here: {e}")
    except BaseException:
        cluster.stop()  # every daemon it started, even when the start failed
        raise
    yield cluster
    cluster.stop()


def test_dry_run_renders_one_task_per_node(tiny_hf, tmp_path):
    data = write_chat_data(str(tmp_path / "train.jsonl"))
    out = subprocess.run([sys.executable, "-m", "megaswift", "slurm", "--nodes", "16", "--gpus-per-node", "8",
                          "--partition", "gpu", "--account", "proj", "--sbatch=--exclusive", "--dry-run", "--",
                          "train", "sft", "--model.hf_path", tiny_hf["llama"], "--data.path", data,
                          "--parallel.tp", "8"],
                         capture_output=True, text=True, env={**os.environ, "MEGASWIFT_FORCE_CPU": "1"},
                         cwd=str(tmp_path))  # the dry run creates its --log-dir (default slurm_logs) here
    assert out.returncode == 0, out.stderr
    script = out.stdout
    for line in ("#SBATCH --nodes=16", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --exclusive"):
        assert line in script, script
    assert "srun --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64" in script
    assert "--nproc-per-node 8" in script and "--rdzv-endpoint $MEGASWIFT_RDZV" in script


def render_lines(*args: str) -> list[str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return render(parser.parse_args(list(args)), ["train", "sft"]).splitlines()


@pytest.mark.parametrize("args, cpus", [
    (("--gpus-per-node", "8"), 64),  # 8 per rank
    (("--gpus-per-node", "8", "--cpus-per-task", "12"), 12),
    (("--gpus-per-node", "0", "--nproc-per-node", "2"), 2),  # a CPU cluster: one per rank
    (("--gpus-per-node", "8", "--cpus-per-task", "0"), None),  # the cluster's default
])
def test_each_task_asks_for_cpus_for_its_ranks(args, cpus):
    lines = render_lines("--nodes", "2", *args)
    srun = next(line for line in lines if line.startswith("srun "))
    asked = [line for line in lines if "--cpus-per-task" in line]
    if cpus is None:
        assert asked == [], lines
    else:  # srun repeats it: since Slurm 22.05 a step does not inherit sbatch's --cpus-per-task
        assert asked == [f"#SBATCH --cpus-per-task={cpus}", srun] and f" --cpus-per-task={cpus} " in srun, lines


def test_rendezvous_port_comes_from_the_job_id_unless_given():
    def endpoint(job_id: int, *args: str) -> str:
        export = next(line for line in render_lines("--nodes", "2", *args) if line.startswith("export MEGASWIFT_RDZV="))
        out = subprocess.run(["bash", "-c", f'{export}; echo "$MEGASWIFT_RDZV"'], capture_output=True, text=True,
                             env={**os.environ, "SLURM_JOB_ID": str(job_id)}, check=True)
        return out.stdout.strip()

    ports = set()
    for job_id in (1234, 5678):
        host, port = endpoint(job_id).rsplit(":", 1)
        assert host == socket.gethostname() and 20000 <= int(port) < 32768  # below the ephemeral range
        ports.add(int(port))
    assert len(ports) == 2, ports
    assert endpoint(1234, "--rdzv-port", "31000") == f"{socket.gethostname()}:31000"


def test_bad_layout_fails_before_submitting(tiny_hf, tmp_path):
    out = subprocess.run([sys.executable, "-m", "megaswift", "slurm", "--nodes", "1", "--gpus-per-node", "3",
                          "--dry-run", "--", "verify", tiny_hf["llama"], "--parallel.tp", "2"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "world size 3 is not divisible by tp(2)" in out.stderr, out.stderr


def test_two_node_sft_job_runs_to_completion(slurm, tiny_hf, tmp_path):
    data = write_chat_data(str(tmp_path / "train.jsonl"))
    out_dir = str(tmp_path / "run")
    cfg = train_config(tiny_hf["llama"], data, out_dir, train__steps=3, checkpoint__export_hf=True,
                       parallel__timeout_s=120).to_dict()
    config = str(tmp_path / "sft.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    submit = slurm.run([sys.executable, "-m", "megaswift", "slurm", "--nodes", "2", "--gpus-per-node", "0",
                        "--nproc-per-node", "1", "--time", "00:10:00", "--log-dir", str(tmp_path / "logs"), "--",
                        "train", "sft", "--config", config], env={"MEGASWIFT_FORCE_CPU": "1"}, cwd=str(tmp_path))
    m = re.search(r"submitted job (\d+): script (\S+), log (\S+)", submit.stdout)
    assert m, submit.stdout + submit.stderr
    job_id, log = m.group(1), m.group(3)
    state = slurm.wait_job(job_id, timeout_s=300)
    text = open(log).read() if os.path.isfile(log) else "(no log)"
    assert state == "COMPLETED", f"{state}\n{text}\n{slurm.logs()}"
    assert "2 node(s)" in text
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert os.path.isfile(os.path.join(out_dir, "hf", "config.json"))
    assert any(n.endswith(".safetensors") for n in os.listdir(os.path.join(out_dir, "hf")))


def test_dry_run_script_submits_as_printed(slurm, tiny_hf, tmp_path):
    """`megaswift slurm --dry-run ... > job.sbatch; sbatch job.sbatch`: Slurm does not create the
    --output directory, so the dry run must have created it, or the job fails with no log at all."""
    logs = tmp_path / "logs"
    dry = slurm.run([sys.executable, "-m", "megaswift", "slurm", "--nodes", "1", "--gpus-per-node", "0",
                     "--time", "00:05:00", "--job-name", "dry", "--log-dir", str(logs), "--dry-run", "--",
                     "verify", tiny_hf["llama"], "--seq-len", "8", "--batch-size", "1"],
                    env={"MEGASWIFT_FORCE_CPU": "1"}, cwd=str(tmp_path))
    script = tmp_path / "job.sbatch"
    script.write_text(dry.stdout)
    job_id = slurm.run(["sbatch", "--parsable", str(script)], env={"MEGASWIFT_FORCE_CPU": "1"},
                       cwd=str(tmp_path)).stdout.strip().split(";")[0]
    state = slurm.wait_job(job_id, timeout_s=180)
    log = logs / f"dry-{job_id}.out"
    text = log.read_text() if log.is_file() else "(no log)"
    assert state == "COMPLETED", f"{state}\n{text}\n{slurm.logs()}"
    assert "PASS" in text, text


def test_a_job_past_its_time_limit_is_requeued_and_ends_as_if_uninterrupted(slurm, tiny_hf, tmp_path):
    """`--requeue`: SIGUSR1 comes --signal-lead-s before the time limit; the rank finishes its
    step, saves and exits 75, the script requeues the job, and the next run resumes from that
    checkpoint. The losses equal those of a run that was never interrupted.

    When the limit runs out is made certain: once the job has trained a few steps its limit is cut
    to 1 minute (Slurm's least), which leaves less than the 50 s lead, and once it is requeued the
    limit goes back to 10 minutes so that the next run can finish, and it may start at once. Steps are slowed to 0.2 s
    (MEGASWIFT_TEST_STEP_DELAY_S) so that the tiny model is still training when the signal comes."""
    from tests.helpers.train import run_train

    data = write_chat_data(str(tmp_path / "train.jsonl"))
    overrides = dict(train__steps=200, checkpoint__every=1000)
    want = run_train(0, 1, tiny_hf["llama"], data, str(tmp_path / "uninterrupted"), **overrides)
    out_dir = str(tmp_path / "run")
    config = str(tmp_path / "sft.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(train_config(tiny_hf["llama"], data, out_dir, **overrides).to_dict(), f)
    submit = slurm.run([sys.executable, "-m", "megaswift", "slurm", "--nodes", "1", "--gpus-per-node", "0",
                        "--time", "00:10:00", "--requeue", "--signal-lead-s", "50", "--job-name", "requeue",
                        "--log-dir", str(tmp_path / "logs"), "--", "train", "sft", "--config", config],
                       env={"MEGASWIFT_FORCE_CPU": "1", "MEGASWIFT_TEST_STEP_DELAY_S": "0.2"}, cwd=str(tmp_path))
    job_id = re.search(r"submitted job (\d+)", submit.stdout).group(1)
    log = tmp_path / "logs" / f"requeue-{job_id}.out"
    metrics = os.path.join(out_dir, "metrics.jsonl")

    def wait_for(what, ready, timeout_s=240):
        deadline = time.monotonic() + timeout_s
        while not ready():
            assert time.monotonic() < deadline, f"{what} never happened\n{log.read_text() if log.is_file() else ''}"
            time.sleep(0.5)

    wait_for("10 steps", lambda: os.path.isfile(metrics) and sum(1 for _ in open(metrics)) >= 10)
    slurm.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=1"])
    wait_for("a requeue", lambda: "JobState=PENDING" in slurm.run(["scontrol", "show", "job", job_id]).stdout)
    # Slurm holds a requeued job back for about two minutes (its BeginTime) so that the node has
    # cleaned up the first run and no longer rejects the job's new credential (revocations are
    # compared in whole seconds: a restart within the second of the requeue was once refused,
    # "Job credential revoked"). Waive the hold only once the node is idle again and a further
    # second has passed.
    wait_for("the node's clean-up", lambda: re.search(r"State=IDLE\s", slurm.run(["scontrol", "show", "node"]).stdout))
    time.sleep(2)
    slurm.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10", "StartTime=now"])
    state = slurm.wait_job(job_id, timeout_s=300)
    text = log.read_text() if log.is_file() else "(no log)"
    assert state == "COMPLETED", f"{state}\n{text}\n{slurm.logs()}"
    stopped = re.search(r"megaswift: stopped: SIGUSR1 after step (\d+)", text)
    assert stopped and 10 <= int(stopped.group(1)) < 200, text
    assert f"resumed from {out_dir}/checkpoints/step_{stopped.group(1)}" in text, text
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == list(range(1, 201))
    assert [r["loss"] for r in rows] == [r["loss"] for r in want]

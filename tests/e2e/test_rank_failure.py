"""A data-parallel job of 4 ranks (no point-to-point traffic): a rank that dies, or hangs inside
a step, ends every rank with a non-zero exit and a message naming it, within parallel.timeout_s.
The hang is caught by the collective timeout; the survivors name the rank that never finished
the step's forward and backward (recorded in the job's store).

A hung rank ignores torchrun's SIGTERM (its handler only asks for a stop after the step), so
torchrun kills it 30 s later (its fixed grace on a failure): a hang case takes start-up +
parallel.timeout_s + 30 s. parallel.timeout_s is kept short so that little of it is waiting: a
4-rank run of this config passes at 2 s on the 2-core machine."""
import os
import time

import pytest
import yaml

from tests.helpers.cli import megaswift_timed
from tests.helpers.train import train_config, write_chat_data

TIMEOUT_S = 10
SLACK_S = 70  # start-up of 4 ranks on 2 cores, step 1, and torchrun's 30 s before it kills a hung rank


@pytest.fixture(scope="module")
def config(tiny_hf, tmp_path_factory):
    root = tmp_path_factory.mktemp("rankfail")
    data = write_chat_data(str(root / "train.jsonl"))
    cfg = train_config(tiny_hf["llama"], data, str(root / "out"), parallel__timeout_s=TIMEOUT_S, train__steps=4,
                       train__global_batch_size=8, train__micro_batch_size=2).to_dict()
    path = str(root / "sft.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


def _launch4(config, fault, output_dir):
    """(the completed launch, its merged output, [(arrival time, line)])"""
    env = {"MEGASWIFT_FORCE_CPU": "1", "PYTHONWARNINGS": "ignore", "MEGASWIFT_TEST_FAULT": fault}
    proc, lines = megaswift_timed("launch", "--nproc-per-node", "4", "--", "train", "sft", "--config", config,
                                  "--train.output_dir", output_dir, env=env, timeout=TIMEOUT_S + SLACK_S)
    return proc, proc.stdout, lines


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_failed_rank_is_named_and_ends_the_job(config, mode, tmp_path):
    start = time.monotonic()
    out = tmp_path / "out"
    proc, log, lines = _launch4(config, f"rank2:2:{mode}", out)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, log
    assert elapsed < TIMEOUT_S + SLACK_S
    if mode == "exit":
        assert proc.returncode == 13, log
        # (what the survivors print races with torchrun stopping them, so only the launcher's line is checked)
        assert "megaswift: error: rank 2 (local rank 2) exited with code 13 first" in log, log
    else:
        assert elapsed > TIMEOUT_S
        assert "rank(s) [2] never finished its forward and backward" in log, log
        # and not before parallel.timeout_s had passed since step 1 ended (its metrics row, the
        # file's last write: step 2 never completes)
        named = min(t for t, line in lines if "never finished its forward and backward" in line)
        assert named - os.path.getmtime(out / "metrics.jsonl") >= TIMEOUT_S, log


def test_a_rank_that_never_starts_is_named(config, tmp_path):
    """Health check: rank 3 hangs before joining; the others name it after parallel.timeout_s."""
    start = time.monotonic()
    proc, log, _ = _launch4(config, "rank3:0:hang", tmp_path / "out")
    assert proc.returncode != 0, log
    assert TIMEOUT_S < time.monotonic() - start < TIMEOUT_S + SLACK_S
    assert f"health check: rank(s) [3] of 4 did not start within parallel.timeout_s={TIMEOUT_S}" in log, log


def test_launch_reads_the_scheduler_environment():
    from argparse import Namespace

    from megaswift.launch.torchrun import fill_from_scheduler_env, torchrun_args

    ns = Namespace(nnodes=None, node_rank=None, rdzv_endpoint=None, nproc_per_node=8, max_restarts=0)
    fill_from_scheduler_env(ns, {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "MASTER_ADDR": "node0", "MASTER_PORT": "6000"})
    assert (ns.nnodes, ns.node_rank, ns.rdzv_endpoint) == (4, 2, "node0:6000")
    assert "--rdzv-endpoint=node0:6000" in torchrun_args(ns, ["verify", "x"])
    given = Namespace(nnodes=2, node_rank=1, rdzv_endpoint="h:1", nproc_per_node=1, max_restarts=0)
    fill_from_scheduler_env(given, {"SLURM_NNODES": "4", "SLURM_NODEID": "3"})
    assert (given.nnodes, given.node_rank, given.rdzv_endpoint) == (2, 1, "h:1")  # the command line wins
    single = Namespace(nnodes=None, node_rank=None, rdzv_endpoint=None, nproc_per_node=1, max_restarts=0)
    fill_from_scheduler_env(single, {})
    assert (single.nnodes, single.node_rank) == (1, 0)

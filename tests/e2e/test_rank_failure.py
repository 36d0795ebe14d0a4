"""A data-parallel job of 4 ranks (no point-to-point traffic): a rank that dies, or hangs inside
a step, ends every rank with a non-zero exit and a message naming it, within parallel.timeout_s.
The hang is caught by the collective timeout; the survivors name the rank that never finished
the step's forward and backward (recorded in the job's store)."""
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from helpers_train import train_config, write_chat_data

TIMEOUT_S = 20
SLACK_S = 60


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


@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_a_failed_rank_is_named_and_ends_the_job(config, mode):
    env = {**os.environ, "MEGASWIFT_FORCE_CPU": "1", "PYTHONWARNINGS": "ignore",
           "MEGASWIFT_TEST_FAULT": f"rank2:2:{mode}"}
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "megaswift", "launch", "--nproc-per-node", "4", "--", "train", "sft",
                             "--config", config], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log = proc.communicate(timeout=TIMEOUT_S + SLACK_S)[0]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, log
    assert elapsed < TIMEOUT_S + SLACK_S
    if mode == "exit":
        assert proc.returncode == 13, log
        assert "megaswift: error: rank 2 (local rank 2) exited with code 13 first" in log, log
        assert "rank(s) [2] never finished its forward and backward" in log, log  # what the survivors say
    else:
        assert elapsed > TIMEOUT_S
        assert "rank(s) [2] never finished its forward and backward" in log, log

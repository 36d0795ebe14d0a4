"""A pipeline stage (or a context-parallel rank) that raises, dies or hangs ends every rank with a
clear message, never a silent hang.

Under `megaswift launch` torchrun's agent stops the other ranks as soon as one fails. Without an
agent (each rank started on its own, as `srun` does) the surviving rank finds out from the
process group: the broken connection, or at the latest parallel.timeout_s. The stage fails in
the middle of step 2 (MEGASWIFT_TEST_FAULT), while its peer waits on it.

parallel.timeout_s is kept short, so that the hang cases spend little time waiting it out:
these layouts run their 4 steps at 2 s on the 2-core machine.
"""
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.helpers.cli import megaswift_timed
from tests.helpers.train import train_config, write_chat_data
from megaswift.testing.dist import free_port

TIMEOUT_S = 10  # parallel.timeout_s of these runs
SLACK_S = 60  # process start-up, tokenizing, step 1


def _config(hf, root, **parallel):
    data = write_chat_data(str(root / "train.jsonl"))
    overrides = {f"parallel__{k}": v for k, v in parallel.items()}
    cfg = train_config(hf, data, str(root / "out"), parallel__timeout_s=TIMEOUT_S, train__steps=4,
                       **overrides).to_dict()
    path = str(root / "sft.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def config(tiny_hf, tmp_path_factory):
    return _config(tiny_hf["llama"], tmp_path_factory.mktemp("ppfail"), pp=2)


def _launch(config, fault, output_dir):
    """(the completed launch, its merged output, [(arrival time, line)])"""
    proc, lines = megaswift_timed("launch", "--nproc-per-node", "2", "--", "train", "sft", "--config", config,
                                  "--train.output_dir", output_dir, env=_env(fault), timeout=TIMEOUT_S + SLACK_S)
    return proc, proc.stdout, lines


def _waited_out_the_timeout(lines, pattern, output_dir) -> bool:
    """The first line matching `pattern` came parallel.timeout_s or more after step 1 ended (its
    metrics row, the file's last write: step 2 never completes)."""
    named = min(t for t, line in lines if re.search(pattern, line))
    return named - os.path.getmtime(os.path.join(output_dir, "metrics.jsonl")) >= TIMEOUT_S


def _env(fault):
    return {**os.environ, "MEGASWIFT_FORCE_CPU": "1", "PYTHONWARNINGS": "ignore", "MEGASWIFT_TEST_FAULT": fault}


@pytest.mark.parametrize("fault", ["stage1:2:raise", "stage1:2:exit", "stage0:2:exit", "stage1:2:hang"])
def test_launch_ends_every_rank(config, fault, tmp_path):
    start = time.monotonic()
    out = str(tmp_path / "out")
    proc, log, lines = _launch(config, fault, out)
    assert proc.returncode != 0, log
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    if fault.endswith("raise"):
        assert "PipelineFailure: pipeline step 2 failed on pp rank 1" in log, log
        assert "injected fault in stage1" in log, log
    elif fault.endswith("hang"):  # the waiting rank's watchdog gives up after parallel.timeout_s
        # whichever watchdog fires first, the hung rank's or its waiting peer's, ends the job
        named = (rf"pipeline step 2 on pp rank [01] \(stages \[[01]\]\) made no progress for "
                 rf"parallel.timeout_s={TIMEOUT_S}")
        assert re.search(named, log), log
        assert time.monotonic() - start > TIMEOUT_S
        assert _waited_out_the_timeout(lines, named, out), log
    else:
        assert proc.returncode == 13, log  # the dead rank's own exit code, not the agent's
        assert "exitcode" in log and "13" in log, log


def test_without_an_agent_the_survivor_ends(config):
    """Rank 0 (stage 0) dies mid step 2; rank 1 waits for its activations and must not hang."""
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {**_env("stage0:2:exit"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(rank),
               "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "megaswift", "train", "sft", "--config", config],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    start = time.monotonic()
    try:
        log = procs[1].communicate(timeout=TIMEOUT_S + SLACK_S)[0]
    finally:
        for p in procs:
            p.kill()
    assert procs[0].wait() == 13
    assert procs[1].returncode != 0, log
    assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    assert "PipelineFailure: pipeline step 2 failed on pp rank 1 (stages [1])" in log, log


def test_hung_context_parallel_rank_ends_the_job(tiny_hf, tmp_path):
    """cp=2: rank 1 stops answering at step 2 while rank 0 waits on ring attention's K/V; a
    watchdog ends one of them after parallel.timeout_s, then torchrun stops the other."""
    config = _config(tiny_hf["llama"], tmp_path, cp=2)
    start = time.monotonic()
    out = str(tmp_path / "out")
    proc, log, lines = _launch(config, "rank1:2:hang", out)
    assert proc.returncode != 0, log
    assert TIMEOUT_S < time.monotonic() - start < TIMEOUT_S + SLACK_S
    named = rf"step 2 on rank [01] \(cp rank [01]\) made no progress for parallel.timeout_s={TIMEOUT_S}"
    assert re.search(named, log), log
    assert _waited_out_the_timeout(lines, named, out), log

"""`megaswift launch --max-restarts 1`: a rank killed after the first checkpoint makes torchrun
restart every rank; the restart resumes from the newest complete checkpoint and the job ends
with the same losses as an uninterrupted run (bitwise on CPU).

The uninterrupted run and the killed one are independent jobs (their own output directories and
ports, one thread per rank), so they run side by side."""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import yaml

from tests.helpers.cli import megaswift
from tests.helpers.train import train_config, write_chat_data


def _run(config, *launch_args, fault=None):
    env = {"MEGASWIFT_TEST_FAULT": fault} if fault else None
    return megaswift("launch", "--nproc-per-node", "2", *launch_args, "--", "train", "sft", "--config", config,
                     env=env, check=False)


def _losses(out_dir):
    """step -> loss, the last row logged for each step (a restart logs the repeated steps again)."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


def test_restart_resumes_from_the_last_checkpoint_with_the_same_losses(tiny_hf, tmp_path):
    data = write_chat_data(str(tmp_path / "train.jsonl"))
    configs = {}
    for name in ("straight", "killed"):
        cfg = train_config(tiny_hf["llama"], data, str(tmp_path / name), train__steps=5, checkpoint__every=2,
                           parallel__timeout_s=60).to_dict()
        configs[name] = str(tmp_path / f"{name}.yaml")
        with open(configs[name], "w") as f:
            yaml.safe_dump(cfg, f)
    with ThreadPoolExecutor(2) as pool:
        straight = pool.submit(_run, configs["straight"])
        # rank 1 dies at the start of step 3 of the first attempt, after the step-2 checkpoint
        killed = pool.submit(_run, configs["killed"], "--max-restarts", "1", fault="rank1:3:exit:0")
        straight, killed = straight.result(), killed.result()
    assert straight.returncode == 0, straight.stderr
    log = killed.stdout + killed.stderr
    assert killed.returncode == 0, log
    assert "restart 1 (launch --max-restarts): resuming from" in log and "step_2" in log, log
    want, got = _losses(str(tmp_path / "straight")), _losses(str(tmp_path / "killed"))
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert got == want  # exact: same batches, same weights, same optimizer state, same random state


def test_without_restarts_the_killed_job_fails(tiny_hf, tmp_path):
    data = write_chat_data(str(tmp_path / "train.jsonl"))
    cfg = train_config(tiny_hf["llama"], data, str(tmp_path / "run"), train__steps=5, checkpoint__every=2,
                       parallel__timeout_s=60).to_dict()
    config = str(tmp_path / "c.yaml")
    with open(config, "w") as f:
        yaml.safe_dump(cfg, f)
    killed = _run(config, fault="rank1:3:exit")
    assert killed.returncode == 13, killed.stdout + killed.stderr

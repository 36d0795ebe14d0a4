"""Training checkpoints: everything a run needs to continue, at any TP/DP/ZeRO layout.

    <output_dir>/checkpoints/step_<N>/
        megaswift.json   as for imported models, plus "train": step, data position, config
        model/           weights (fp32 master), canonical DCP tensors: exported and resharded as usual
        optim/           AdamW exp_avg / exp_avg_sq per parameter, canonical like the weights
        rng/rank_<r>.pt  each rank's random generator states

Saves go through `staged_dir`: written to `step_<N>.tmp` and renamed when complete, so a job
killed mid-save leaves every earlier checkpoint intact and `latest` never picks a partial one.
"""
from __future__ import annotations

import os
import re
import shutil

import torch

from megaswift import device
from megaswift.errors import CheckpointError

from .canonical_shards import CanonicalShards
from .model_state import (META_FILE, _is_rank0, dcp_state, load_dcp, load_model, read_meta, save_dcp, staged_dir,
                          write_meta)
from .safe_load import check_dcp, load_weights_only

STEP_DIR = re.compile(r"step_(\d+)")


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(checkpoints_dir(output_dir), f"step_{step}")


def completed_steps(output_dir: str) -> list[int]:
    """Steps with a complete checkpoint (a `.tmp` directory is an interrupted save)."""
    root = checkpoints_dir(output_dir)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = STEP_DIR.fullmatch(name)
        if m and os.path.isfile(os.path.join(root, name, META_FILE)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def resolve_load(load: str | None, output_dir: str, announce: bool = True) -> str | None:
    """`checkpoint.load`: a directory, or 'latest': the newest intact checkpoint (None when
    output_dir has none yet, so a requeued job that never saved starts from the beginning).

    Runs before any process group, possibly on every rank: it reads only megaswift.json, DCP
    metadata and file sizes, so every rank sees the same files and picks the same checkpoint."""
    if load is None:
        return None
    if load == "latest":
        return _latest_intact(output_dir, announce)
    if not os.path.isfile(os.path.join(load, META_FILE)):
        raise CheckpointError(f"checkpoint.load={load} is not a megaswift checkpoint (no {META_FILE})")
    check_checkpoint(load)
    return load


def check_checkpoint(ckpt_dir: str) -> dict:
    """The cheap integrity check of a checkpoint; its meta. megaswift.json parses, and the DCP
    metadata of model/ (and optim/ for a training checkpoint) passes the allow-list and names files
    that hold its bytes. Tensor bytes and rng files are not read. Raises CheckpointError naming
    the file (a DamagedCheckpoint when a file is damaged or refused)."""
    meta = read_meta(ckpt_dir)
    for part in ("model", "optim") if "train" in meta else ("model",):
        check_dcp(os.path.join(ckpt_dir, part))
    return meta


def _latest_intact(output_dir: str, announce: bool = True) -> str | None:
    """The newest checkpoint that passes `check_checkpoint`. A damaged newer one is skipped with a
    line on rank 0 (`announce` False: `launch`'s own check, whose rank 0 says it again); if none
    passes, an error (a fresh start would bury what might be repaired)."""
    skipped = []
    for step in reversed(completed_steps(output_dir)):
        ckpt = step_dir(output_dir, step)
        try:
            check_checkpoint(ckpt)
        except CheckpointError as e:
            skipped.append((step, getattr(e, "reason", str(e))))
            continue
        if announce and os.environ.get("RANK", "0") == "0":  # no process group yet: torchrun sets RANK
            for bad, reason in skipped:
                print(f"checkpoint step_{bad} is damaged ({reason}); resuming from step_{step}", flush=True)
        return ckpt
    if skipped:
        step, reason = skipped[0]
        raise CheckpointError(f"checkpoint.load=latest: no intact checkpoint in {checkpoints_dir(output_dir)} (newest: "
                              f"step_{step}, {reason}); repair or remove the damaged ones, or set checkpoint.load "
                              "to a good checkpoint")
    return None


def _optim_state(model, opt_state: dict) -> dict[str, CanonicalShards]:
    layouts = model.shard_layouts()
    names = {p: n for n, p in model.named_parameters()}
    return {f"{key}/{names[p]}": CanonicalShards(t, layouts[names[p]])
            for key, per_param in opt_state.items() for p, t in per_param.items()}


def save_training(ckpt_dir: str, model, opt_state: dict, meta: dict, side_files_from: str | None = None) -> None:
    """Collective. `opt_state` is {'exp_avg': {param: full local tensor}, ...}."""
    with staged_dir(ckpt_dir) as tmp:
        save_dcp(dcp_state(model), os.path.join(tmp, "model"))
        save_dcp(_optim_state(model, opt_state), os.path.join(tmp, "optim"))
        rng_dir = os.path.join(tmp, "rng")
        os.makedirs(rng_dir, exist_ok=True)
        torch.save(device.rng_state(), os.path.join(rng_dir, f"rank_{device.rank()}.pt"))
        if _is_rank0():
            write_meta(tmp, meta, side_files_from)
        pause = float(os.environ.get("MEGASWIFT_TEST_PAUSE_BEFORE_COMMIT_S", "0"))
        if pause:  # lets the tests kill a job while a save is incomplete
            open(os.path.join(tmp, "PAUSED"), "w").close()
            import time

            time.sleep(pause)


def load_training(ckpt_dir: str, model, state_keys: tuple[str, ...]) -> tuple[dict, dict]:
    """Load the weights into `model`; return ({key: {param: tensor}} optimizer state, meta)."""
    meta = read_meta(ckpt_dir)
    if "train" not in meta:
        raise CheckpointError(f"{ckpt_dir} holds weights only (no training state) and cannot be resumed")
    load_model(model, ckpt_dir)
    opt_state = {key: {p: torch.zeros_like(p) for p in model.parameters() if p.requires_grad} for key in state_keys}
    load_dcp(_optim_state(model, opt_state), os.path.join(ckpt_dir, "optim"))
    rng_file = os.path.join(ckpt_dir, "rng", f"rank_{device.rank()}.pt")
    if os.path.isfile(rng_file):  # absent when resuming on more ranks than saved: keep the seeded state
        device.set_rng_state(load_weights_only(rng_file))
    return opt_state, meta


def prune(output_dir: str, keep: int | None) -> None:
    """Rank 0: delete all but the newest `keep` complete checkpoints, never the newest one that
    was checked finite when saved (checkpoints of older versions carry no such mark)."""
    if keep is None or not _is_rank0():
        return
    steps = completed_steps(output_dir)
    finite = [s for s in steps if _marked_finite(step_dir(output_dir, s))]
    protected = finite[-1] if finite else None
    for step in steps[:-keep]:
        if step != protected:
            shutil.rmtree(step_dir(output_dir, step), ignore_errors=True)


def _marked_finite(ckpt_dir: str) -> bool:
    try:
        return read_meta(ckpt_dir).get("finite") is True
    except (CheckpointError, OSError, ValueError):
        return False


def clean_interrupted_saves(output_dir: str) -> list[str]:
    """Rank 0, at the start of a run: remove what interrupted saves left (`step_N.tmp`, and the
    `step_N.old` of a swap cut short); returns their names. Complete checkpoints are untouched."""
    root = checkpoints_dir(output_dir)
    if not _is_rank0() or not os.path.isdir(root):
        return []
    left = sorted(n for n in os.listdir(root) if re.fullmatch(r"step_\d+\.(tmp|old)", n))
    for name in left:
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return left

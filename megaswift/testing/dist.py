"""Run a function on N CPU processes joined by a gloo process group, and return each rank's result.

This is what the multi-process tests use (nanotron's `init_distributed`, on gloo). The workers come
from a forkserver that has imported torch, transformers and megaswift's engine once, so each test
pays a fork, not ~3 s of imports per rank. A rank that raises fails the call with that rank's traceback; a rank that hangs
fails it at `timeout_s`, and every worker is killed either way, so a broken test never hangs CI.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback

_CTX = None


def _context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        # what nearly every worker imports; a module missing here is imported by the worker itself
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "transformers", "megaswift.train.engine",
                                     "megaswift.setup", "megaswift.convert.hf_import", "megaswift.convert.verify"])
    return _CTX


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn, rank, world_size, port, args, kwargs, queue, pg_timeout_s):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        result = fn(rank, world_size, *args, **kwargs)
        queue.put((rank, "ok", result))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout_s: float = 240, **kwargs) -> list:
    """Call `fn(rank, world_size, *args, **kwargs)` on `world_size` gloo ranks; return results by rank."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world_size, port, args, kwargs, queue, timeout_s / 2),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: list[str] = []
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed test timed out after {timeout_s}s; ranks done: {sorted(results)}")
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank(s) {dead} died with exit codes {[procs[i].exitcode for i in dead]}")
                continue
            if status == "ok":
                results[rank] = payload
            else:
                errors.append(f"--- rank {rank} ---\n{payload}")
                break  # one rank failed: the others may block on it; stop them
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors or len(results) < world_size else 10)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RuntimeError("a rank failed:\n" + "\n".join(errors))
    return [results[r] for r in range(world_size)]


def _fake_worker(fn, rank, world_size, args, kwargs, queue):
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    try:
        # collectives return at once and move no data; "meta" so models built on the meta
        # device can run their collectives too
        dist.init_process_group("cpu:fake,meta:fake", store=FakeStore(), rank=rank, world_size=world_size)
        queue.put(("ok", fn(rank, world_size, *args, **kwargs)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put(("error", traceback.format_exc()))


def run_as_rank(fn, rank: int, world_size: int, *args, timeout_s: float = 120, **kwargs):
    """Call `fn(rank, world_size, *args, **kwargs)` in one process that stands as `rank` of
    `world_size` on torch's fake process group (shared/torch-on-cpu.md): every group of the rank
    grid exists, collectives return at once without touching data. For what needs only shapes
    and devices (models on the meta device), at any world size, for one process's price."""
    ctx = _context()
    queue = ctx.Queue()
    proc = ctx.Process(target=_fake_worker, args=(fn, rank, world_size, args, kwargs, queue), daemon=True)
    proc.start()
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                status, payload = queue.get(timeout=1.0)
                break
            except queue_mod.Empty:
                if proc.exitcode is not None:
                    raise RuntimeError(f"rank {rank} of {world_size} (fake process group) died with exit code "
                                       f"{proc.exitcode}") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"rank {rank} of {world_size} (fake process group) did not finish in "
                                       f"{timeout_s}s") from None
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if status != "ok":
        raise RuntimeError(f"rank {rank} of {world_size} (fake process group) failed:\n{payload}")
    return payload

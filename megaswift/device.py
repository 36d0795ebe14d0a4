"""The one place that chooses the device and the collective backend.

NCCL on CUDA, gloo on CPU. Nothing else in the project calls `torch.cuda` outside `kernels/`.
"""
from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


def cuda_available() -> bool:
    return torch.cuda.is_available() and os.environ.get("MEGASWIFT_FORCE_CPU", "0") != "1"


def device_type() -> str:
    return "cuda" if cuda_available() else "cpu"


def backend() -> str:
    return "nccl" if cuda_available() else "gloo"


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_device() -> torch.device:
    if cuda_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def process_group_timeout_s(timeout_s: float, backend_name: str) -> float:
    """The collective timeout given to the process group for a job whose parallel.timeout_s is
    `timeout_s`. gloo raises in the waiting rank at its timeout, and megaswift turns that error
    into a message naming the ranks that fell behind. NCCL instead has its own watchdog thread,
    which at its timeout aborts the process with a message of its own; megaswift's watchdog
    (parallel/watchdog.py) must speak first, so NCCL gets twice the time plus a minute."""
    return timeout_s if backend_name != "nccl" else 2 * timeout_s + 60


def init_distributed(timeout_s: float | None = None) -> bool:
    """Start the default process group when launched by torchrun (WORLD_SIZE set).

    Returns True when a process group is active. A single process without torchrun runs with
    no process group at all: every collective in `parallel/` is a no-op for groups of size 1.
    The timeout makes a dead or hung peer end the job with an error instead of a silent hang.
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    timeout_s = timeout_s or float(os.environ.get("MEGASWIFT_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    timeout = datetime.timedelta(seconds=process_group_timeout_s(timeout_s, backend()))
    kwargs = {"timeout": timeout, **_restart_safe_store(datetime.timedelta(seconds=timeout_s))}
    if cuda_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=get_device(), **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)
    return True


def _restart_safe_store(timeout) -> dict:
    """Under torchrun, the store of torchrun's agent with a prefix per restart attempt.

    torch's env:// initialisation keeps no per-attempt prefix on the agent's store, so after a
    `--max-restarts` restart the new ranks read the dead ranks' addresses and never connect
    (measured with torch 2.13 and gloo: "connectFullMesh failed ... Connection refused" on a
    two-line script). A prefix per attempt keeps each attempt's keys apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.PrefixStore(f"megaswift/attempt_{attempt}", store)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    _all_ranks_started(store, rank, world, timeout.total_seconds())
    return {"store": store, "rank": rank, "world_size": world}


def _all_ranks_started(store, rank: int, world: int, timeout_s: float) -> None:
    """Health check before the process group: every rank checks in, and a rank that has not
    within the timeout is named (the process group's own start would only time out)."""
    from megaswift.faults import inject_test_fault

    inject_test_fault(f"rank{rank}", 0)
    store.set(f"started/{rank}", "1")
    deadline = time.monotonic() + timeout_s
    missing = list(range(world))
    while missing:
        missing = [r for r in missing if not store.check([f"started/{r}"])]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"health check: rank(s) {missing} of {world} did not start within "
                               f"parallel.timeout_s={timeout_s:g} s; their nodes' logs have the cause")
        time.sleep(0.2)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rng_state() -> dict:
    """Every random generator a run touches, for checkpoints (loadable with weights_only=True)."""
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [torch.from_numpy(np.asarray(v)) if isinstance(v, np.ndarray) else v for v in np.random.get_state()]}
    if cuda_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["python"]))
    np.random.set_state(tuple(v.numpy() if isinstance(v, torch.Tensor) else v for v in state["numpy"]))
    if "cuda" in state and cuda_available():
        torch.cuda.set_rng_state(state["cuda"])


def accelerator_name() -> str | None:
    return torch.cuda.get_device_name() if cuda_available() else None


def peak_memory_bytes() -> int:
    """Peak accelerator memory allocated by torch on CUDA; peak resident memory of the process on CPU."""
    if cuda_available():
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_memory() -> None:
    """Start `peak_memory_bytes` afresh (CUDA; the CPU's resident peak cannot be reset)."""
    if cuda_available():
        torch.cuda.reset_peak_memory_stats()


def synchronize() -> None:
    """Wait for queued kernels, so wall-clock timings mean what they say."""
    if cuda_available():
        torch.cuda.synchronize()


class _EventMarker:
    def __init__(self):
        self.event = torch.cuda.Event()
        self.event.record()

    def done(self) -> bool:
        return self.event.query()


def progress_marker() -> "_EventMarker | None":
    """A point in the device's queue of work, for the watchdog: None where the work the host
    asked for is done when the call returns (CPU), else an object whose `done()` turns True once
    the device has run everything queued before it. On CUDA kernels and NCCL collectives are
    queued, so the host returning from `work.wait()` or a forward says nothing about progress;
    a recorded event does, without stopping the host."""
    return _EventMarker() if cuda_available() else None


class ComputeTimer:
    """Seconds spent inside `start()`/`stop()` spans, as the device sees them. On CPU a
    perf_counter difference. On CUDA a pair of events per span, read once in `seconds()`:
    synchronizing around every span (the simple way) would stop the host from queuing the next
    kernels and communication while the device works, and take the overlap away."""

    def __init__(self):
        self.cuda = cuda_available()
        self.spans: list[tuple] = []
        self.total = 0.0

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, started) -> None:
        if not self.cuda:
            self.total += time.perf_counter() - started
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self.spans.append((started, end))

    def seconds(self) -> float:
        """The total so far, then zero again (one device sync on CUDA)."""
        if self.spans:
            self.spans[-1][1].synchronize()
            self.total += sum(a.elapsed_time(b) for a, b in self.spans) / 1e3
            self.spans = []
        total, self.total = self.total, 0.0
        return total

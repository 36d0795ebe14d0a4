"""The watchdog and timers on CUDA's terms, checked on the CPU with stand-in device events.

On CUDA the host only queues work: a host that keeps beating says nothing about a device stuck
on a collective, and a timer that synchronizes around every pipeline chunk takes away the
overlap it measures. The watchdog therefore counts progress when the device passes a marker,
and the pipeline's ComputeTimer reads CUDA events once per step.
"""
import subprocess
import sys
import textwrap
import time

import pytest

from megaswift import device

WATCHED = textwrap.dedent("""
    import sys, time
    from megaswift.parallel.watchdog import Watchdog, beat

    class Marker:  # a CUDA event: done once the device gets past it ({delay} s later; None: never)
        def __init__(self):
            self.at = time.monotonic()
        def done(self):
            return {delay} is not None and time.monotonic() - self.at > ({delay} or 0)

    dog = Watchdog(1.0, marker=Marker)
    with dog.armed("step 7 on rank 3 (forward and backward)",
                   lambda: "; rank(s) [5] never finished its forward and backward"):
        for _ in range(60):  # the host keeps queuing work for 3 s
            beat()
            time.sleep(0.05)
    print("the step ended")
""")


def _run(delay):
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", WATCHED.format(delay=delay)], capture_output=True, text=True,
                         timeout=60)
    return out, time.monotonic() - start


def test_a_device_that_never_gets_past_the_queued_work_ends_the_rank():
    out, elapsed = _run(None)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "the step ended" not in out.stdout
    assert ("megaswift: error: step 7 on rank 3 (forward and backward) made no progress for "
            "parallel.timeout_s=1 s") in out.stderr
    assert "rank(s) [5] never finished its forward and backward" in out.stderr
    assert elapsed < 30


def test_a_device_that_keeps_up_is_left_alone():
    out, _ = _run(0.2)  # each marker passed 0.2 s after it was queued
    assert out.returncode == 0 and "the step ended" in out.stdout, out.stderr


def test_nccl_gets_a_longer_timeout_than_the_watchdog():
    """NCCL's own watchdog aborts at the process group's timeout without naming a rank; ours
    fires at parallel.timeout_s and must come first. gloo raises in the waiting rank, which
    megaswift turns into the message naming the ranks behind (so it keeps the timeout)."""
    for t in (20, 600):
        assert device.process_group_timeout_s(t, "gloo") == t
        assert device.process_group_timeout_s(t, "nccl") >= 2 * t + 30


class _StandInEvent:
    """torch.cuda.Event's timing contract: record() marks the stream, elapsed_time() in ms is only
    valid once the later event has completed (synchronize())."""
    syncs = 0

    def __init__(self, enable_timing=False):
        self.at = None
        self.done = False

    def record(self):
        self.at = time.perf_counter()

    def synchronize(self):
        type(self).syncs += 1
        self.done = True

    def elapsed_time(self, end):
        assert end.done or type(self).syncs, "read before the device finished"
        return (end.at - self.at) * 1e3


def test_compute_timer_reads_cuda_events_once_per_step(monkeypatch):
    import torch

    monkeypatch.setattr(device, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", _StandInEvent)
    _StandInEvent.syncs = 0
    timer = device.ComputeTimer()
    for _ in range(3):
        started = timer.start()
        time.sleep(0.02)
        timer.stop(started)
    assert _StandInEvent.syncs == 0  # the host never waited between chunks
    assert timer.seconds() == pytest.approx(0.06, abs=0.03)
    assert _StandInEvent.syncs == 1
    assert timer.seconds() == 0.0  # read and reset


def test_compute_timer_on_cpu():
    timer = device.ComputeTimer()
    started = timer.start()
    time.sleep(0.02)
    timer.stop(started)
    assert timer.seconds() == pytest.approx(0.02, abs=0.015)

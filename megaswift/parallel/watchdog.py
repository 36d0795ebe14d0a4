"""A watchdog for waits that never time out, or time out without saying who is to blame.

gloo: collectives honour the process-group timeout, but a point-to-point wait (the pipeline's
activations, ring attention's K/V blocks) does not: measured, a stage stuck in step 2 kept its
neighbour waiting past 90 s with a 30 s timeout, and a thread cannot interrupt a wait inside C++.

NCCL: every wait is queued on the GPU and the host runs ahead, so the host returning from
`work.wait()` proves nothing; the host finally blocks at some `.item()`, and at its timeout
NCCL's own watchdog aborts the process with a message that names no culprit. megaswift gives
NCCL a longer timeout (device.process_group_timeout_s) so that this watchdog speaks first.

So while a step runs, the code that makes progress (each pipeline compute, each ring hop, each
micro batch) calls `beat()`. On CPU a beat is progress at once; on CUDA it records an event
(device.progress_marker, handed in by the engine), and progress is the moment the device gets
past it. If no progress
comes for `timeout_s` the watchdog prints what this rank was doing (and, through `detail`, the
ranks that never finished their part) and ends the process. Under torchrun the agent then stops
the other ranks; without one, their own watchdogs or broken connections do.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time

_active: "Watchdog | None" = None


def beat() -> None:
    """Progress: called by code that has just computed or received something (or, on CUDA, has
    just queued it)."""
    if _active is not None:
        _active.progress()


class Watchdog:
    def __init__(self, timeout_s: float, marker=None):
        """`marker()` returns None when the work queued so far is done, else an object whose
        `done()` says when it is (the engine passes device.progress_marker; default: the host's
        work is all there is, as on CPU)."""
        self.timeout_s = timeout_s
        self.marker = marker or (lambda: None)
        self.last: float | None = None
        self.pending: collections.deque = collections.deque()  # markers the device has not reached yet
        self.what = ""
        self.detail = None
        threading.Thread(target=self._watch, daemon=True, name="megaswift-watchdog").start()

    def progress(self) -> None:
        m = self.marker()
        if m is None:
            self.last = time.monotonic()
        else:
            self.pending.append(m)

    @contextlib.contextmanager
    def armed(self, what: str, detail=None):
        """Watch the block: `what` names it in the message ("pipeline step 3 on pp rank 1 ...");
        `detail()`, if given, adds what is known about the peers when the watchdog fires."""
        global _active
        self.pending.clear()
        self.what, self.detail, self.last, _active = what, detail, time.monotonic(), self
        try:
            yield
        finally:
            self.last, _active = None, None
            self.pending.clear()

    def _device_caught_up(self) -> None:
        """Progress for every marker the device has passed since the last look."""
        try:
            while self.pending and self.pending[0].done():
                self.pending.popleft()
                if self.last is not None:
                    self.last = time.monotonic()
        except IndexError:  # emptied by the main thread as the block ended
            pass

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout_s / 10))
            self._device_caught_up()
            last = self.last
            if last is not None and time.monotonic() - last > self.timeout_s:
                extra = ""
                try:
                    extra = self.detail() if self.detail else ""
                except Exception:  # noqa: BLE001 - the message goes out either way
                    pass
                print(f"megaswift: error: {self.what} made no progress for parallel.timeout_s={self.timeout_s:g} s: "
                      f"a peer stopped answering or this rank is stuck; ending this rank (the first rank to fail "
                      f"has the cause in its log){extra}", file=sys.stderr, flush=True)
                os._exit(1)

"""Stopping a run on a scheduler's request: finish the step, save, exit 75.

Slurm sends SIGTERM before it kills a job that is preempted or past its time limit (and, with
`--signal=USR1@<seconds>`, SIGUSR1 that long before the limit; `megaswift slurm --requeue`
asks for it). A rank that gets either signal only raises a flag; after each step the ranks
agree on it (one small all-reduce, so they all stop after the same step even when the signal
reached only some of them), write one checkpoint and end with `Stopped` (exit code 75), which
the rendered Slurm script answers with a requeue. The requeued job resumes from that checkpoint.

A second stop signal ends the rank at once, as the signal's default would (torchrun's agent sends
SIGTERM once when it stops the ranks after another one failed; they then end on their own at
the next collective with the failed rank, or at this second signal).

Ctrl-C (SIGINT) is left to Python: it interrupts at once (Interrupted, exit 130).
"""
from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self):
        self.received: str | None = None  # the name of the first stop signal this rank got

    def _on_signal(self, signum, frame) -> None:
        if self.received:  # asked twice: do as the signal's default would, at once
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
        self.received = signal.Signals(signum).name

    @contextlib.contextmanager
    def listening(self):
        """Handle the stop signals inside the block (the main thread only can; elsewhere, e.g.
        a test's worker thread, nothing is installed and the defaults stay)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def agreed(self, world_size: int, device) -> str | None:
        """After a step, on every rank: the signal name if any rank was asked to stop, else None."""
        if world_size == 1:
            return self.received
        flag = torch.tensor(1.0 if self.received else 0.0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (self.received or "a stop signal on another rank") if flag.item() else None

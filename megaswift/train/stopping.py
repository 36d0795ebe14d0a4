"""Stopping a run on a scheduler's request: finish the step, save, exit 75.

Slurm sends SIGTERM before it kills a job that is preempted or past its time limit (and, with
`--signal=USR1@<seconds>`, SIGUSR1 that long before the limit; `megaswift slurm --requeue`
asks for it). A rank that gets either signal only raises a flag; after each step the ranks
agree on it (one small all-reduce, so they all stop after the same step even when the signal
reached only some of them), write one checkpoint and end with `Stopped` (exit code 75), which
the rendered Slurm script answers with a requeue. The requeued job resumes from that checkpoint.

The handlers go in when the train command starts (`listen`), before the model is built and the
data read, which can take minutes: a signal then is kept for the first step boundary instead of
killing the process (both signals' default action).

A signal often comes twice, from the scheduler (which signals every process of the job) and
again from torchrun's agent forwarding it: the flag is simply set again. When the agent stops
the ranks because another one failed, its SIGTERM sets the flag too; they then end at the next
collective with the failed rank, by the watchdog, or by the agent's SIGKILL after the grace time.

Ctrl-C (SIGINT) is left to Python: it interrupts at once (Interrupted, exit 130).
"""
from __future__ import annotations

import signal
import threading

from megaswift.parallel import collectives

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequests:
    def __init__(self):
        self.received: str | None = None  # the name of the first stop signal this process got

    def on_signal(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    def agreed(self, world_size: int, device) -> str | None:
        """After a step, on every rank: the signal name if any rank was asked to stop, else None."""
        if world_size == 1:
            return self.received
        asked = collectives.any_rank(self.received is not None, device)
        return (self.received or "a stop signal on another rank") if asked else None


_REQUESTS = StopRequests()  # the process's: one training run per process


def listen() -> StopRequests:
    """Handle the stop signals from now on in this process (main thread only: signal handlers
    cannot be installed elsewhere, e.g. in a test's worker thread, which keeps the defaults)."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _REQUESTS.on_signal)
    return _REQUESTS


def requests() -> StopRequests:
    return _REQUESTS

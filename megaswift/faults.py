"""Fault injection for the failure tests: a crash, an exception or a hang at a named place and step.

At the bottom of the import graph (it imports nothing of megaswift) so that the device helper,
parallel/ and the engine can all call it.
"""
from __future__ import annotations

import os
import time


def inject_test_fault(where: str, step: int) -> None:
    """MEGASWIFT_TEST_FAULT=WHERE:STEP:raise|exit|hang[:ATTEMPT] (WHERE e.g. stage1 or rank0)
    makes that place raise, exit at once (as a crash would) or stop answering in that step, in
    torchrun's restart ATTEMPT only when given; the failure tests use it. Free when unset."""
    spec = os.environ.get("MEGASWIFT_TEST_FAULT")
    if not spec:
        return
    at, at_step, mode, *attempt = spec.split(":")
    if at != where or int(at_step) != step:
        return
    if attempt and int(attempt[0]) != int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")):
        return
    if mode == "exit":
        os._exit(13)
    if mode == "hang":
        time.sleep(10**6)
    raise RuntimeError(f"injected fault in {where} (MEGASWIFT_TEST_FAULT)")

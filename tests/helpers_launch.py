"""Run `megaswift launch ...` as a user would and always clean up, even when a test times out:
torchrun's workers may sit in sessions of their own, so the launcher's whole process tree is
collected and killed, not only its process group."""
import os
import signal
import subprocess
import sys


def _tree(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(k) for k in out]
    return kids + [d for k in kids for d in _tree(k)]


def run_megaswift(args: list[str], env: dict, timeout_s: float) -> tuple[subprocess.Popen, str]:
    """(finished process, its stdout+stderr). Raises TimeoutExpired after killing everything."""
    proc = subprocess.Popen([sys.executable, "-m", "megaswift", *args], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        return proc, proc.communicate(timeout=timeout_s)[0]
    finally:
        for pid in _tree(proc.pid) + [proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()

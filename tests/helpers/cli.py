"""The one way tests run the CLI: `python -m megaswift ...` as a user would, always cleaned up.

`megaswift(...)` runs the command to its end in a session of its own and returns the completed
process; `megaswift_timed(...)` does the same and also says when each line of output came;
`megaswift_many(...)` runs several independent commands side by side.
Whatever happens (success, failure, a timeout, pytest's own timeout or Ctrl-C), every
process it started is killed afterwards: torchrun's workers may sit in sessions of their own, so
the whole process tree is collected and killed, not only the process group.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

# what every CLI run of the tests gets on top of the caller's environment
CLI_ENV = {"MEGASWIFT_FORCE_CPU": "1", "PYTHONWARNINGS": "ignore"}


def process_tree(pid: int) -> list[int]:
    """Every living descendant of `pid` (children first, then theirs)."""
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    kids = [int(k) for k in out]
    return kids + [d for k in kids for d in process_tree(k)]


def _kill(pid: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its descendants and (if it leads one) its process group; reap `proc`."""
    if proc.returncode is None:  # not reaped yet: its pid and its children's parent pid are still its own
        for pid in process_tree(proc.pid) + [proc.pid]:
            _kill(pid)
    if os.getpgid(0) != proc.pid:  # never our own group
        _kill(proc.pid, group=True)  # what outlived it in its group (reparented, so not in the tree)
    proc.wait()


def megaswift(*args, check: bool = True, timeout: float = 300, env: dict | None = None,
              merge_output: bool = False) -> subprocess.CompletedProcess:
    """Run `python -m megaswift *args` to its end; the completed process (text output).

    env: set on top of os.environ and CLI_ENV (CPU-only, no Python warnings).
    check: a non-zero exit raises AssertionError with the command's output.
    timeout: seconds; past it everything is killed and subprocess.TimeoutExpired raised (with the
        output so far).
    merge_output: stderr goes into stdout, interleaved as written (stderr is then "").
    """
    cmd = [sys.executable, "-m", "megaswift", *map(str, args)]
    proc = subprocess.Popen(cmd, env={**os.environ, **CLI_ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT if merge_output else subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        try:  # the output so far; a straggler outside the tree may still hold the pipe open
            stdout, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            stdout, stderr = None, None
        raise subprocess.TimeoutExpired(cmd, timeout, output=stdout, stderr=stderr) from None
    finally:
        kill_tree(proc)
    done = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr or "")
    if check and done.returncode != 0:
        raise AssertionError(f"megaswift {' '.join(map(str, args))} exited {done.returncode}\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def megaswift_many(*commands, **kw) -> list[subprocess.CompletedProcess]:
    """`megaswift(*args, **kw)` for each tuple of args in `commands`, all at once; the completed
    processes in the same order. For commands that do not depend on each other (error paths,
    exports to separate directories): a CLI process spends seconds importing on one core, so two
    side by side take little longer than one. An error (check=True) is raised once all have ended."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        futures = [pool.submit(megaswift, *args, **kw) for args in commands]
        return [f.result() for f in futures]


def megaswift_timed(*args, timeout: float = 300, env: dict | None = None
                    ) -> tuple[subprocess.CompletedProcess, list[tuple[float, str]]]:
    """Like `megaswift(*args, check=False, merge_output=True)`, and also each output line with the
    wall-clock time (time.time()) it arrived: (the completed process, [(time, line), ...]). For
    the failure tests, which check when a message came, not only that it did."""
    cmd = [sys.executable, "-m", "megaswift", *map(str, args)]
    proc = subprocess.Popen(cmd, env={**os.environ, **CLI_ENV, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read():
        for line in proc.stdout:
            lines.append((time.time(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            reader.join(timeout=10)
            raise subprocess.TimeoutExpired(cmd, timeout, output="".join(t for _, t in lines)) from None
    finally:
        kill_tree(proc)
    reader.join(timeout=10)  # a straggler outside the tree may still hold the pipe open
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(t for _, t in lines), ""), list(lines)


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """The CLI's user-error contract: exit code 2, exactly one `megaswift: error:` line on stderr,
    no traceback, and that line holds every needle."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("megaswift: error:")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]

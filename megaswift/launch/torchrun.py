"""`megaswift launch`: check the layout, then hand over to torch.distributed.run (torchrun).

The check runs here, in the one launching process, so a layout that cannot fit the world size
or the model is one clean line instead of a traceback from every rank. Process spawning,
rendezvous, restarts and signal handling are torchrun's; nothing here re-implements them.
"""
from __future__ import annotations

import os
import signal
import sys

from megaswift.errors import MegaswiftError


def fill_from_scheduler_env(ns, env=os.environ) -> None:
    """Multi-node settings not given on the command line come from what Slurm (SLURM_NNODES,
    SLURM_NODEID) or a generic scheduler (NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT) set."""
    if ns.nnodes is None:
        ns.nnodes = int(env.get("SLURM_NNODES") or env.get("NNODES") or 1)
    if ns.node_rank is None:
        ns.node_rank = int(env.get("SLURM_NODEID") or env.get("NODE_RANK") or 0)
    if ns.rdzv_endpoint is None and ns.nnodes > 1 and env.get("MASTER_ADDR"):
        ns.rdzv_endpoint = f"{env['MASTER_ADDR']}:{env.get('MASTER_PORT', '29500')}"


def torchrun_args(ns, sub_argv: list[str]) -> list[str]:
    args = [f"--nproc-per-node={ns.nproc_per_node}", f"--nnodes={ns.nnodes}", f"--max-restarts={ns.max_restarts}",
            # the time between forwarding a stop signal to the ranks and killing them: they finish
            # their step and save (train/stopping.py); torchrun's default, 30 s, is too short for that
            f"--shutdown-timeout={getattr(ns, 'stop_grace_s', 300)}",
            # the signals torchrun's agent turns into a shutdown that forwards them to the ranks;
            # SIGUSR1 (Slurm's --signal warning before the time limit) is added, else it kills the agent
            "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"]
    if ns.nnodes > 1:
        if not ns.rdzv_endpoint:
            raise MegaswiftError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT of the first node "
                                 "(or MASTER_ADDR and MASTER_PORT in the environment)")
        args += [f"--node-rank={ns.node_rank}", "--rdzv-backend=c10d", f"--rdzv-endpoint={ns.rdzv_endpoint}"]
    else:
        args.append("--standalone")  # a free local port, no endpoint to configure
    return args + ["-m", "megaswift", *sub_argv]


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the platform has one."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def launch(ns, sub_argv: list[str], check) -> int:
    """`check(sub_argv, world_size)`: the subcommand's plan (megaswift/cli.py), run here first."""
    # SIGUSR1 kills a process that does not handle it; torchrun handles it once it starts the ranks
    # (--signals-to-handle), and until then (the plan below, the rendezvous) it is ignored: Slurm's
    # SIGTERM at the time limit still stops the ranks with a checkpoint
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    fill_from_scheduler_env(ns)
    check(sub_argv, ns.nproc_per_node * ns.nnodes)
    # torchrun would force 1 thread per rank (and warn); share out the cores this process may
    # use (under Slurm its task's --cpus-per-task, not the whole node that cpu_count() reports)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cpus() // ns.nproc_per_node)))
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(torchrun_args(ns, sub_argv))
    except SignalException as e:  # the ranks got the signal too and said what they did with it
        return 130 if e.sigval == signal.SIGINT else 75  # as errors.Interrupted / errors.Stopped
    except Exception as e:  # torchrun raises ChildFailedError after printing the failing rank's log
        name = type(e).__name__
        if name == "ChildFailedError":
            return _child_exit_code(e)
        raise
    return 0


def _child_exit_code(err) -> int:
    """Name the rank that failed first, then propagate its own exit code (2 for a user error, 1
    for a failed verify), else the commonest. The first one's: the others may end on their own
    after it (a broken connection, exit 1), because the ranks handle torchrun's SIGTERM as a
    request to stop after the step (train/stopping.py) instead of dying at once."""
    by_rank = getattr(err, "failures", {})  # global rank -> ProcessFailure
    failures = list(by_rank.values())
    if by_rank:
        rank = min(by_rank, key=lambda r: by_rank[r].timestamp)
        first = by_rank[rank]
        how = f"was killed by signal {-first.exitcode}" if first.exitcode < 0 else f"exited with code {first.exitcode}"
        print(f"megaswift: error: rank {rank} (local rank {first.local_rank}) {how} first; torchrun stopped "
              f"the other ranks", file=sys.stderr, flush=True)
        if first.exitcode > 0:
            return first.exitcode
    codes = [f.exitcode for f in failures if f.exitcode and f.exitcode > 0]
    if codes:
        return max(set(codes), key=codes.count)
    print(str(err), file=sys.stderr)
    return 1

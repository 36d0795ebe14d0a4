"""`megaswift slurm`: render an sbatch script for a megaswift job and submit it.

The script asks Slurm for `--nodes` nodes with one task each; `srun` starts one
`megaswift launch` per node (torchrun's agent), which spawns `--nproc-per-node` ranks there and
meets the other nodes at a c10d rendezvous on the first node (the node that runs the batch
script: `hostname` there). The launcher checks the layout before anything spawns, as it does on
one node, and torchrun's agents stop the whole job when one rank fails.

`--dry-run` prints the script; otherwise it is written next to the log and submitted with
`sbatch --parsable`, and the job id and log path are printed. Either way the log directory is
created here: Slurm does not create the directory of `#SBATCH --output`, and a job whose output
file cannot be opened fails at once without a log, so a printed script must find it in place.
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys

from megaswift.errors import MegaswiftError


def add_arguments(p) -> None:
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="0 for a CPU cluster")
    p.add_argument("--nproc-per-node", type=int, help="ranks per node (default: the GPUs per node, or 1 on CPU)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--time", default="01:00:00", help="wall-clock limit, HH:MM:SS")
    p.add_argument("--job-name", default="megaswift")
    p.add_argument("--log-dir", default="slurm_logs",
                   help="where the script and <job-name>-<jobid>.out go; created now, also with --dry-run")
    p.add_argument("--setup", help="shell line run before the job, e.g. 'source /path/venv/bin/activate' "
                   "(default: activate the Python environment running this command)")
    p.add_argument("--container-image", help="run each task in this container (pyxis: srun --container-image)")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs for each node's task (default: 8 per rank with GPUs, 1 per rank on CPU; "
                   "0 leaves it to the cluster's default)")
    p.add_argument("--rdzv-port", type=int, help="the rendezvous port on the first node (default: 20000 + "
                   "the job id modulo 10000, so that jobs sharing a first node do not collide)")
    p.add_argument("--max-restarts", type=int, default=0)
    p.add_argument("--requeue", action="store_true",
                   help="when the job stops with a checkpoint (preemption, or --signal-lead-s before the time limit), "
                   "requeue it; the requeued job resumes from that checkpoint")
    p.add_argument("--signal-lead-s", type=int, default=300,
                   help="with --requeue: SIGUSR1 this long before the time limit, so the ranks can finish their step "
                   "and save (Slurm may send it up to a minute early)")
    p.add_argument("--sbatch", action="append", default=[], metavar="LINE",
                   help="an extra #SBATCH option, e.g. --sbatch=--exclusive (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")


def _default_setup() -> str:
    activate = os.path.join(sys.prefix, "bin", "activate")
    if sys.prefix != sys.base_prefix and os.path.isfile(activate):
        return f"source {shlex.quote(activate)}"
    return f"export PATH={shlex.quote(os.path.dirname(sys.executable))}:$PATH"


def ranks_per_node(ns) -> int:
    """--nproc-per-node, else one rank per GPU, else (a CPU cluster) one."""
    return ns.nproc_per_node or max(1, ns.gpus_per_node)


def cpus_per_task(ns) -> int:
    """--cpus-per-task, else 8 per rank on a GPU cluster (each rank's data loading and host work
    needs cores of its own), else one per rank. Without it most clusters give the one task a
    single CPU, which every rank on the node would then share."""
    if ns.cpus_per_task is not None:
        return ns.cpus_per_task
    return ranks_per_node(ns) * (8 if ns.gpus_per_node else 1)


def render(ns, sub_argv: list[str]) -> str:
    if ns.nodes < 1 or ns.gpus_per_node < 0:
        raise MegaswiftError(f"--nodes must be >= 1 and --gpus-per-node >= 0; got {ns.nodes} and {ns.gpus_per_node}")
    if ns.cpus_per_task is not None and ns.cpus_per_task < 0:
        raise MegaswiftError(f"--cpus-per-task must be >= 0 (0: the cluster's default); got {ns.cpus_per_task}")
    nproc, cpus = ranks_per_node(ns), cpus_per_task(ns)
    log_dir = os.path.abspath(ns.log_dir)
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={ns.job_name}",
             f"#SBATCH --nodes={ns.nodes}",
             "#SBATCH --ntasks-per-node=1",
             f"#SBATCH --time={ns.time}",
             f"#SBATCH --output={log_dir}/{ns.job_name}-%j.out"]
    if ns.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={ns.gpus_per_node}")
    if cpus:
        lines.append(f"#SBATCH --cpus-per-task={cpus}")
    for key in ("partition", "account"):
        if getattr(ns, key):
            lines.append(f"#SBATCH --{key}={getattr(ns, key)}")
    if ns.requeue:  # the same job id, log appended, signal before the limit (train/stopping.py)
        lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append", f"#SBATCH --signal=USR1@{ns.signal_lead_s}"]
    lines += [f"#SBATCH {extra}" for extra in ns.sbatch]
    launch = ["python", "-m", "megaswift", "launch", "--nnodes", "$SLURM_NNODES", "--node-rank", "$SLURM_NODEID",
              "--nproc-per-node", str(nproc), "--rdzv-endpoint", "$MEGASWIFT_RDZV",
              "--max-restarts", str(ns.max_restarts), "--"]
    # $SLURM_* and $MEGASWIFT_RDZV must expand on each node, inside srun's task, not here
    task = " ".join(a if a.startswith("$") else shlex.quote(a) for a in launch)
    task += " " + " ".join(shlex.quote(a) for a in sub_argv)
    srun = ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    if cpus:  # since Slurm 22.05 srun ignores SLURM_CPUS_PER_TASK, so sbatch's value does not reach the step
        srun.append(f"--cpus-per-task={cpus}")
    if ns.container_image:
        srun.append(f"--container-image={shlex.quote(ns.container_image)}")
    # A fixed port collides when two jobs start on the same first node; one derived from the job
    # id does not (unless the ids differ by a multiple of 10000). 20000-29999 stays below Linux's
    # ephemeral range (32768+), where the kernel hands out ports to outgoing connections.
    rdzv_port = ns.rdzv_port if ns.rdzv_port is not None else "$((20000 + SLURM_JOB_ID % 10000))"
    lines += ["set -euo pipefail",
              'cd "$SLURM_SUBMIT_DIR"  # where megaswift slurm ran',
              ns.setup or _default_setup(),
              "# the rendezvous runs on the first node, the one running this script"
              + ("" if ns.rdzv_port is not None else "; its port comes from the job id, so jobs sharing that node do not collide"),
              f'export MEGASWIFT_RDZV="$(hostname):{rdzv_port}"',
              'echo "megaswift: job $SLURM_JOB_ID on $SLURM_NNODES node(s): $SLURM_JOB_NODELIST, '
              'rendezvous $MEGASWIFT_RDZV, run ${SLURM_RESTART_COUNT:-0}"']
    step = " ".join(srun) + " bash -c " + shlex.quote(task)
    if not ns.requeue:
        lines.append(step)
    else:
        # 75: the ranks stopped on a signal after saving a checkpoint (errors.Stopped); requeue,
        # and the next run resumes from it (SLURM_RESTART_COUNT > 0 means checkpoint.load latest)
        lines += [f"{step} || rc=$?",
                  'if [ "${rc:-0}" -eq 75 ]; then',
                  '  echo "megaswift: job $SLURM_JOB_ID stopped with a checkpoint; requeueing it"',
                  '  scontrol requeue "$SLURM_JOB_ID"',
                  "fi",
                  'exit "${rc:-0}"']
    return "\n".join(lines) + "\n"


def slurm_command(ns, sub_argv: list[str], check) -> int:
    """`check(sub_argv, world_size)`: the subcommand's plan (megaswift/cli.py)."""
    check(sub_argv, ranks_per_node(ns) * ns.nodes)  # a bad layout fails here, not after queueing
    script = render(ns, sub_argv)
    try:
        os.makedirs(ns.log_dir, exist_ok=True)
    except OSError as e:
        raise MegaswiftError(f"--log-dir {ns.log_dir} cannot be created ({e.strerror}); "
                             "choose a directory on a file system the nodes share") from None
    if ns.dry_run:
        print(script, end="")
        return 0
    path = os.path.join(ns.log_dir, f"{ns.job_name}.sbatch")
    with open(path, "w") as f:
        f.write(script)
    try:
        out = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise MegaswiftError("sbatch was not found: run this on a Slurm login node, or use --dry-run") from e
    if out.returncode != 0:
        raise MegaswiftError(f"sbatch refused {path}: {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    log = os.path.join(os.path.abspath(ns.log_dir), f"{ns.job_name}-{job_id}.out")
    print(f"submitted job {job_id}: script {path}, log {log}")
    return 0

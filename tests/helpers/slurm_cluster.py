"""A real Slurm on this one machine, for the tests: munged, slurmctld and two slurmd (n1, n2).

Debian's packages (slurmctld slurmd slurm-client munge) are installed when missing and this
process is root; otherwise the caller skips with the reason. No systemd: every daemon is started
here in the foreground, and `stop()` ends exactly the processes it started, by pid. Both nodes
point at 127.0.0.1 on their own slurmd ports, so a 2-node job runs two tasks on this host.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]


class Unavailable(Exception):
    """Slurm cannot run here; the message says why."""


def ensure_installed() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise Unavailable(f"Slurm is not installed and installing it needs root: apt-get install {' '.join(PACKAGES)}")
    if not shutil.which("apt-get"):
        raise Unavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True, timeout=900)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"installing Slurm failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: str):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.conf = os.path.join(root, "slurm.conf")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def start(self) -> None:
        ensure_installed()
        host = socket.gethostname()
        cpus = os.cpu_count() or 1
        ports = [_free_port() for _ in range(3)]
        for d in ("state", "spool-n1", "spool-n2"):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        r = self.root
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=megaswifttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
AuthType=auth/munge
SlurmUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName=n1 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[1]} CPUs={cpus} State=UNKNOWN
NodeName=n2 NodeHostname={host} NodeAddr=127.0.0.1 Port={ports[2]} CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""")
        self._start_munge()
        self._spawn(["slurmctld", "-D"], "slurmctld.out")
        self._spawn(["slurmd", "-D", "-N", "n1"], "slurmd-n1.out")
        self._spawn(["slurmd", "-D", "-N", "n2"], "slurmd-n2.out")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False).stdout.split()  # a line per node
            if out.count("idle") == 2:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the two Slurm nodes did not come up: sinfo says {out}\n{self.logs()}")

    def _start_munge(self) -> None:
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
            return  # one munged per machine serves every cluster
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        self._spawn(["runuser", "-u", "munge", "--", "munged", "-F"], "munged.out")
        deadline = time.monotonic() + 20
        while subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start\n{self.logs()}")
            time.sleep(0.2)

    def _spawn(self, cmd: list[str], log: str) -> None:
        f = open(os.path.join(self.root, log), "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT))

    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}")
        return out

    def wait_job(self, job_id: str, timeout_s: float) -> str:
        """The job's final state (COMPLETED, FAILED, ...), polled from scontrol."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            out = self.run(["scontrol", "show", "job", job_id], check=False).stdout
            state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "UNKNOWN"):
                return state
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        raise TimeoutError(f"job {job_id} did not finish in {timeout_s} s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log", "slurmctld.out"):
            path = os.path.join(self.root, name)
            if os.path.isfile(path):
                with open(path) as f:
                    parts.append(f"--- {name}\n" + "".join(f.readlines()[-20:]))
        return "\n".join(parts)

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

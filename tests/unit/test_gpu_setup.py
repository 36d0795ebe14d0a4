"""What a first GPU run depends on, checked on CPU: the MFU peak for the device's exact name, and
scripts/install.sh choosing the CUDA torch and the [gpu] extra where nvidia-smi finds a GPU.

install.sh runs for real against stand-ins: a `.venv/bin/python` that logs what it is asked and
installs nothing, and an `nvidia-smi` on a PATH that holds nothing else the script could find."""
import os
import shutil
import subprocess

import pytest

from megaswift.train.metrics import peak_flops_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H100 80GB HBM3", 989e12),  # the SXM part
    ("NVIDIA H800 PCIe", 756e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100-PCIE-40GB", 312e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA GeForce GTX 1080", None),
    ("", None),
])
def test_peak_flops_takes_the_most_specific_name(name, peak):
    assert peak_flops_for(name) == peak


# Logs its arguments, one call a line. It answers "no" to install.sh's "is this torch already
# installed?" (the only call that runs sys.exit), so the script goes on to install it.
FAKE_PYTHON = """#!/bin/sh
printf '%s\\n' "$*" >> {log}
case "$*" in
  *sys.exit*) exit 1 ;;
  *"[gpu]"*) exit {gpu_rc} ;;
esac
"""


def run_install(tmp_path, nvidia_smi: str | None, gpu_rc: int = 0):
    """Run a copy of install.sh in a repo-shaped temp dir; return (the process, the logged calls)."""
    repo, bin_dir, log = tmp_path / "repo", tmp_path / "bin", tmp_path / "python.log"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "scripts", "install.sh"), repo / "scripts")
    shutil.copy(os.path.join(REPO, "setup.py"), repo)
    (repo / ".venv" / "bin").mkdir(parents=True)
    executable(repo / ".venv" / "bin" / "python", FAKE_PYTHON.format(log=log, gpu_rc=gpu_rc))
    bin_dir.mkdir()
    os.symlink(shutil.which("dirname"), bin_dir / "dirname")
    if nvidia_smi is not None:
        executable(bin_dir / "nvidia-smi", nvidia_smi)
    # a PATH of only bin_dir keeps a real nvidia-smi (on a GPU machine) out of the CPU case
    out = subprocess.run([shutil.which("bash"), str(repo / "scripts" / "install.sh")], capture_output=True,
                         text=True, env={"PATH": str(bin_dir), "HOME": str(tmp_path)}, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return out, calls


def executable(path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


GPU_SMI = """#!/bin/sh
[ "$1" = -L ] && echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"
"""


def test_install_on_a_gpu_machine_takes_cuda_torch_and_the_gpu_extra(tmp_path):
    out, calls = run_install(tmp_path, GPU_SMI)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "-m pip install --quiet torch==2.13.0" in calls, calls  # PyPI's CUDA build
    assert not any("download.pytorch.org" in c or "--no-index" in c for c in calls), calls
    assert "-m pip install --quiet -e .[test]" in calls, calls
    assert "-m pip install --quiet --no-build-isolation -e .[gpu]" in calls, calls
    assert "could not be installed" not in out.stdout


@pytest.mark.parametrize("nvidia_smi", [None, "#!/bin/sh\nexit 9\n"], ids=["no-nvidia-smi", "no-driver"])
def test_install_on_a_cpu_machine_is_unchanged(tmp_path, nvidia_smi):
    out, calls = run_install(tmp_path, nvidia_smi)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "-m pip install --quiet --no-index --no-deps torch==2.13.0" in calls, calls  # the local CPU wheel
    assert "-m pip install --quiet -e .[test]" in calls, calls
    assert not any("gpu" in c or "flash" in c or "--no-build-isolation" in c for c in calls), calls


def test_a_failed_flash_attn_install_is_a_note_not_a_failure(tmp_path):
    out, calls = run_install(tmp_path, GPU_SMI, gpu_rc=1)
    assert out.returncode == 0, out.stdout + out.stderr
    notes = [line for line in out.stdout.splitlines() if "flash-attn could not be installed" in line]
    assert len(notes) == 1 and "sdpa" in notes[0], out.stdout
    assert calls[-1].startswith("-c import torch, megaswift.parallel"), calls  # the script went on to the end


def test_launch_shares_out_the_cpus_this_task_may_use():
    """Under Slurm a task is bound to its --cpus-per-task; os.cpu_count() reports the whole node."""
    import os

    from megaswift.launch.torchrun import usable_cpus

    mine = os.sched_getaffinity(0)
    assert usable_cpus() == len(mine)
    os.sched_setaffinity(0, {min(mine)})
    try:
        assert usable_cpus() == 1
    finally:
        os.sched_setaffinity(0, mine)

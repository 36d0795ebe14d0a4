#!/usr/bin/env bash
# Create .venv and install megaswift with the torch build that fits this machine:
# the CUDA build from PyPI where an NVIDIA driver answers, the CPU build everywhere else.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip_install() { .venv/bin/python -m pip install --quiet "$@"; }
gpu=false
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then gpu=true; fi

if .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "torch $TORCH_VERSION already installed"
elif $gpu; then
  pip_install "torch==$TORCH_VERSION"
else
  # A bare `torch` from PyPI is the multi-GB CUDA build. Take a local CPU wheel if pip's
  # find-links has one (CI machines do) and its dependencies from the configured indexes,
  # else PyTorch's CPU index.
  if pip_install --no-index --no-deps "torch==$TORCH_VERSION" 2>/dev/null; then
    pip_install "torch==$TORCH_VERSION"  # only the dependencies: the +cpu build already satisfies it
  else
    pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
pip_install -e ".[test]"
if $gpu; then
  # flash-attn's setup.py imports torch (to fetch the prebuilt wheel for this torch and CUDA, else to
  # compile), so it must build in this venv rather than in pip's isolated one, which has no torch;
  # its build tools go in first. With no matching wheel and no nvcc the build fails, and that is
  # no reason to stop: attention falls back to sdpa.
  echo "installing the [gpu] extra (flash-attn compiles when no prebuilt wheel fits: it may take long)"
  { pip_install setuptools wheel packaging psutil ninja && pip_install --no-build-isolation -e ".[gpu]"; } ||
    echo "flash-attn could not be installed (pip's error is above): megaswift will use the sdpa attention backend; to retry: .venv/bin/python -m pip install --no-build-isolation flash-attn"
fi
.venv/bin/python -c "import torch, megaswift.parallel; print('megaswift ready: torch', torch.__version__)"

#!/usr/bin/env bash
# The README's main job: set up, then `megaswift quickstart` (SFT at TP=2 on CPU, export, evaluate).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/megaswift quickstart "$@"

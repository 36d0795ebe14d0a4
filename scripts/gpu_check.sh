#!/usr/bin/env bash
# The first run on a machine with a CUDA GPU, in under 10 minutes: the gpu-marked tests, verify
# in bf16 (flash-attn when it imports), a short single-GPU SFT in bf16, the benchmarks at GPU
# sizes, and the planner's prediction against a real step; then one summary. On a machine without a GPU it says so and exits 0.
#
#   bash scripts/gpu_check.sh            # logs and the summary in outputs/gpu_check (or $OUT)
#
# Every phase runs under its own time limit and the script goes on after a failure, so one run
# shows everything that breaks. It works offline: megaswift is installed without dependencies
# into whichever Python has a CUDA torch (.venv, else python3); packages missing there can be
# carried as wheels in .whl/ (installed to /tmp/site).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOGS=${OUT:-$ROOT/outputs/gpu_check}
WORK=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$LOGS"

cuda_python() {
  for py in "${PYTHON:-}" .venv/bin/python python3; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  return 1
}
if ! PY=$(cuda_python); then
  echo "gpu_check: no CUDA GPU here (no Python whose torch sees one); nothing to check"
  exit 0
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import megaswift.parallel" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >"$LOGS/install.log" 2>&1 ||
    { echo "gpu_check: installing megaswift failed, see $LOGS/install.log"; exit 1; }
fi
export MEGASWIFT_FORCE_CPU=0 PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

SUMMARY=()
phase() {  # phase NAME LIMIT_S COMMAND...: run it, log it, keep a summary line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$LOGS/$name.log"
  local verdict=ok
  [ $rc -eq 124 ] && verdict="TIMED OUT"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="FAILED (rc $rc)"
  SUMMARY+=("$(printf '%-14s %-16s %4ss' "$name" "$verdict" $((SECONDS - t0)))")
}

"$PY" - <<'EOF' | tee "$LOGS/env.log"
import torch, transformers
from megaswift.kernels.attention_cuda import flash_attn_status
ok, why = flash_attn_status()
print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"transformers {transformers.__version__}, flash-attn: {'yes' if ok else 'no (' + why + ')'}")
EOF
BACKEND=$("$PY" -c "from megaswift.kernels.attention_cuda import flash_attn_available as f; print('flash_attn' if f() else 'sdpa')")
export PY WORK BACKEND  # the phases below run in child shells

# 1. the gpu-marked tests (only the files that have them: others may import test-only packages)
mapfile -t GPU_FILES < <(grep -rl "mark.gpu" tests --include='test_*.py')
phase gpu_tests 200 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_FILES[@]}"

# 2. verify in bf16 against transformers: llama's head dim 12 takes the padded-kernel path,
# deepseek_v3's multi-latent attention a value head dim (10) other than q/k's (14); qwen3_next
# and qwen3_5 run Gated DeltaNet through flash-linear-attention's kernels when fla imports,
# gpt_oss its attention sinks through the flash kernels' lse
FAMS="llama qwen3 qwen3_moe deepseek_v3 glm4_moe qwen3_next qwen3_5 gpt_oss"
for fam in $FAMS; do "$PY" -m megaswift tiny-hf "$fam" "$WORK/$fam" >/dev/null 2>&1; done
export FAMS
verify_all() {
  for fam in $FAMS; do
    "$PY" -m megaswift verify "$WORK/$fam" --dtype bfloat16 --model.attention_backend "$BACKEND" || return 1
    "$PY" -m megaswift verify "$WORK/$fam" --dtype float32 || return 1
  done
}
export -f verify_all
phase verify 150 bash -c verify_all

# 3. a short SFT on one GPU under bf16 autocast, packed rows
"$PY" -c "from tests.helpers.train import write_chat_data; write_chat_data('$WORK/train.jsonl', n=256)"
sft() {
  "$PY" -m megaswift train sft --model.hf_path "$WORK/qwen3" --data.path "$WORK/train.jsonl" --data.seq_len 256 \
    --data.packing true --model.dtype bfloat16 --model.attention_backend "$BACKEND" --train.steps 30 \
    --train.micro_batch_size 4 --train.global_batch_size 8 --optim.lr 1e-3 --train.output_dir "$WORK/sft" &&
  "$PY" - "$WORK/sft/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
tps = sorted(r["tokens_per_s"] for r in rows[5:])
print(f"sft: loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} in {len(rows)} steps, median {tps[len(tps) // 2]:,.0f} tokens/s")
assert rows[-1]["loss"] < rows[0]["loss"], "the loss did not fall"
EOF
}
export -f sft
phase sft 90 bash -c sft

# 4. the benchmarks at GPU sizes (ratios against transformers, measured in the same run)
phase train_bench 200 "$PY" benchmarks/train_bench.py --hidden 2048 --layers 8 --heads 16 --kv-heads 8 \
  --ffn 5632 --seq-len 4096 --micro-batch 2 --steps 8 --warmup 3 --repeats 1
phase rollout_bench 60 "$PY" benchmarks/rollout_bench.py --rows 256 --new 64 --hidden 1024 --layers 8 \
  --vocab 32000 --device cuda --tp 1 --repeat 1
phase delta_bench 60 "$PY" benchmarks/gated_delta_bench.py --device cuda --seq-len 4096 --k-heads 16 --v-heads 32
phase moe_bench 60 "$PY" benchmarks/moe_bench.py --world 1 --eps 1 --experts 16 --hidden 1024 --expert-ffn 1024 \
  --seq-len 2048 --layers 4 --steps 4
# 5. the planner's prediction for one GPU against a real step: peak memory and step time
phase plan_check 90 "$PY" benchmarks/plan_gpu_check.py --layers 8 --seq-len 4096 --steps 4

{
  echo "gpu_check summary ($(head -n 1 "$LOGS/env.log"))"
  printf '%s\n' "${SUMMARY[@]}"
  grep -h -E "^verify |^sft: |^ratio |^(transformers|megaswift) |tokens/s|^peak memory|^step time|^layout" \
    "$LOGS"/verify.log "$LOGS"/sft.log "$LOGS"/train_bench.log "$LOGS"/rollout_bench.log "$LOGS"/delta_bench.log "$LOGS"/moe_bench.log \
    "$LOGS"/plan_check.log 2>/dev/null | head -n 44
  tail -n 1 "$LOGS/gpu_tests.log"
} | tee "$LOGS/summary.txt"
rm -rf "$WORK"

#!/usr/bin/env bash
# The conversion path: build a tiny Llama-style checkpoint (random weights, local tokenizer),
# import it under TP=2 on two CPU processes, verify it against transformers under TP=2 with
# sequence parallelism, export it back to HF format and verify the export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
M=.venv/bin/megaswift
OUT=${OUT:-outputs/convert_demo}
rm -rf "$OUT"
$M tiny-hf llama "$OUT/hf"
$M launch --nproc-per-node 2 -- import-hf "$OUT/hf" "$OUT/ckpt" --parallel.tp 2
$M launch --nproc-per-node 2 -- verify "$OUT/hf" --parallel.tp 2 --parallel.sp true
$M export-hf "$OUT/ckpt" "$OUT/export"
$M verify "$OUT/export"
.venv/bin/python - "$OUT/hf" "$OUT/export" <<'PY'
import glob, sys, torch
from safetensors.torch import load_file
def load(d):
    out = {}
    for f in glob.glob(d + "/*.safetensors"):
        out.update(load_file(f))
    return out
a, b = load(sys.argv[1]), load(sys.argv[2])
same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
print(f"round trip: {len(a)} tensors, bitwise identical: {same}")
sys.exit(0 if same else 1)
PY

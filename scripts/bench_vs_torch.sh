#!/usr/bin/env bash
# Issue 19's side-by-side timing: PyTorch eager (bench_torch.py, the Hugging Face OFA port)
# and the engine on the same random OFA weights, one run after the other, full depth.
# Lines: `torch ...` (PyTorch), `mue ...` (the engine), `mue-reference ...` (the engine with
# candle's composed ops, i.e. before issue 19's kernels).
#
# Manual set-up, never part of tests or CI (torch is large):
#   python3 -m venv /tmp/torchref && /tmp/torchref/bin/pip install torch transformers safetensors
# and BENCH pointing at bench_torch.py (the reference script kept beside the repository).
#
#   SIZE=tiny SIDE=256 BATCH=1,8 bash scripts/bench_vs_torch.sh
set -euo pipefail
PY=${PY:-/tmp/torchref/bin/python}
BENCH=${BENCH:-../shared/bench/ofa-torch/bench_torch.py}
SIZE=${SIZE:-tiny}
SIDE=${SIDE:-256}
BATCH=${BATCH:-1,8}
ITERS=${ITERS:-5}
STEPS=${STEPS:-16}
THREADS=${THREADS:-2}
# Reduced precisions timed after f32 (space-separated; e.g. PRECISIONS="" for f32 only).
PRECISIONS=${PRECISIONS:-int8}
OFA=${OFA:-/tmp/ofa-$SIZE}
MUE_DIR=${MUE_DIR:-/tmp/mue-$SIZE}

cargo build --release --quiet
MUE=./target/release/mue
if [ ! -f "$OFA/pytorch_model.bin" ]; then
  # The first run writes the seeded random weights (and times one tiny pass).
  "$PY" "$BENCH" --size "$SIZE" --image-size "$SIDE" --out "$OFA" --batch 1 --iters 1 --steps 1 >/dev/null
fi
[ -f "$MUE_DIR/model.safetensors" ] || "$MUE" convert --ofa "$OFA" --out "$MUE_DIR" --image-size "$SIDE"
lscpu | grep -E "Model name|^CPU\(s\)" || true
uptime
"$PY" "$BENCH" --size "$SIZE" --image-size "$SIDE" --out "$OFA" --batch "$BATCH" \
  --iters "$ITERS" --steps "$STEPS" --threads "$THREADS" 2>/dev/null | grep '^torch '
"$MUE" bench --model "$MUE_DIR" --batch "$BATCH" --iters "$ITERS" --steps "$STEPS" --threads "$THREADS"
for P in $PRECISIONS; do
  "$MUE" bench --model "$MUE_DIR" --batch "$BATCH" --iters "$ITERS" --steps "$STEPS" --threads "$THREADS" \
    --precision "$P"
done
if [ "${REFERENCE:-1}" = 1 ]; then # REFERENCE=0 skips the composed-ops run
  "$MUE" bench --model "$MUE_DIR" --batch "$BATCH" --iters "$ITERS" --steps "$STEPS" \
    --threads "$THREADS" --reference-kernels
fi
uptime

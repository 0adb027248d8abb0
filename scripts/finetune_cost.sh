#!/usr/bin/env bash
# Step time and peak memory of fine-tuning an OFA-Tiny-sized model (random weights:
# d_model 256, 4+4 layers, 4 heads, ffn 1024, OFA's ResNet-50 trunk) at 256 px, batch 8,
# with the image trunk trained and frozen, back to back (the README's figures).
# Usage: bash scripts/finetune_cost.sh [STEPS] (default 4; the first step is warm-up).
# Needs /usr/bin/time (GNU time). Writes to a temporary folder, prints one line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-4}
cargo build --release -q
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
./target/release/mue data generate --out "$work/bench" --train 200 --valid 8 --test 8 \
    --image-size 256 >/dev/null
for mode in trained frozen; do
    flag=""
    [ "$mode" = frozen ] && flag="--freeze-image-trunk"
    /usr/bin/time -v -o "$work/time_$mode.txt" ./target/release/mue train \
        --data "$work/bench" --out "$work/run_$mode" --resnet resnet50 --image-size 256 \
        --d-model 256 --encoder-layers 4 --decoder-layers 4 --heads 4 --ffn-dim 1024 \
        --vocab-size 1000 --batch-size 8 --steps "$steps" --eval-examples 8 --quiet $flag \
        >/dev/null
    # Seconds of every step after the first (warm-up), from the training log.
    secs=$(grep '"secs"' "$work/run_$mode/train_log.jsonl" | tail -n +2 \
        | sed 's/.*"secs":\([0-9.]*\).*/\1/' | tr '\n' ' ')
    mean=$(echo "$secs" | awk '{for (i = 1; i <= NF; i++) s += $i; printf "%.2f", s / NF}')
    rss=$(awk -F': ' '/Maximum resident/ {printf "%.2f", $2 / 1048576}' "$work/time_$mode.txt")
    echo "trunk $mode: mean step ${mean} s (steps 2..$steps: $secs), peak RSS ${rss} GiB"
done

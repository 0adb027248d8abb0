#!/usr/bin/env bash
# Seconds per training step of the v2 runs in scripts/train_v2.sh, back to back with the
# v1 base recipe (whose idle-machine speed is known: 0.29 s/step, models/default/MODEL_CARD.md),
# so that the ratio carries over to an idle machine. Two rounds, interleaved; median of
# steps 2..N of each run from train_log.jsonl.
#   MUE=target/release/mue V1=data/bench V2=data/bench2 bash scripts/time_v2_steps.sh
set -euo pipefail
MUE=${MUE:-target/release/mue}
V1=${V1:-data/bench}
V2=${V2:-data/bench2}
STEPS=${STEPS:-12}
OUT=${OUT:-$(mktemp -d)}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
common="--steps $STEPS --batch-size 32 --lr 5e-4 --dropout 0 --seed 0 --captions-per-image 2 \
  --patch 16 --branch-init zero-encoder --max-train-images 1500 --eval-examples 20 --quiet"
run() { # name data extra...
  local name=$1 data=$2; shift 2
  rm -rf "$OUT/$name"
  "$MUE" train --data "$data" --out "$OUT/$name" $common "$@" >/dev/null 2>&1
  python3 - "$OUT/$name/train_log.jsonl" "$name" <<'PY'
import json, statistics, sys
s = [json.loads(l) for l in open(sys.argv[1])]
s = [x["secs"] for x in s if "secs" in x and "eval" not in x][1:]
print(f"{sys.argv[2]}\t{statistics.median(s):.3f}\t{len(s)}")
PY
}
uptime
for round in 1 2; do
  run v1_base "$V1" --loss layer-wise --image-size 64
  run v2_base "$V2" --loss layer-wise --image-size 128
  run v2_final_only "$V2" --loss final-only --image-size 128
  run v2_sampling "$V2" --loss layer-wise --image-size 128 --image-exit-sampling 0.5
  run v2_small_3x3 "$V2" --loss layer-wise --image-size 128 --encoder-layers 3 --decoder-layers 3
done
uptime

#!/usr/bin/env bash
# docs/results.md on benchmark v2 (issue 23): `mue report` on the shipped recipe (exit
# sampling of both encoder streams on top of the paper's) with every other run of
# scripts/train_v2.sh as a row of its own. The v1 page moves to docs/results-v1.md (the
# appendix) the first time.
#
#   bash scripts/report_v2.sh                 # every finished run under runs/v2
#   LIMIT=300 CAPTION_LIMIT=100 bash scripts/report_v2.sh    # fewer examples per split
#
# Runs that have not finished are left out (their rows are absent; the ablation row says
# "not run"). Several hours on the 2-core machine with all six models: each is calibrated
# on valid and evaluated on test.
set -euo pipefail
cd "$(dirname "$0")/.."
MUE=${MUE:-target/release/mue}
DATA=${DATA:-data/bench2}
RUNS=${RUNS:-runs/v2}
RESULTS=${RESULTS:-results/v2/report}
OUT=${OUT:-docs/results.md}
LIMIT=${LIMIT:-1000}
CAPTION_LIMIT=${CAPTION_LIMIT:-200}

# A run counts once it has finished its steps (train_state.json), not at a checkpoint.
have() {
  [ -f "$RUNS/$1/model.safetensors" ] && [ -f "$RUNS/$1/train_state.json" ] &&
    python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); sys.exit(s["step"] < s["total_steps"])' \
      "$RUNS/$1/train_state.json"
}
MAIN=sampling
have "$MAIN" || MAIN=sampling_stage2
have "$MAIN" || { echo "report_v2: no exit-sampling run under $RUNS" >&2; exit 2; }

args=(report --model "$RUNS/$MAIN" --data "$DATA" --results "$RESULTS" --out "$OUT"
  --limit "$LIMIT" --caption-limit "$CAPTION_LIMIT" --caption-target 0.97
  --entail-grid scripts/grid_v2w_entail_mue.json --caption-grid scripts/grid_v2w_caption_mue.json)
if have sampling_final_only; then args+=(--ablation-model "$RUNS/sampling_final_only"); fi
for v in "MuE (paper recipe)=base" "MuE (paper recipe) w/o layer-wise loss=base_final_only" \
  "MuE w/o modality decomposition (joint encoder)=joint" "Smaller model, trained (3+3 layers)=small_3x3"; do
  run=${v#*=}
  if have "$run"; then args+=(--variant "${v%%=*}=$RUNS/$run"); fi
done

if [ "$OUT" = docs/results.md ] && [ ! -f docs/results-v1.md ] && grep -q "benchmark \`data/bench\`" docs/results.md; then
  git mv docs/results.md docs/results-v1.md 2>/dev/null || mv docs/results.md docs/results-v1.md
fi
"$MUE" "${args[@]}"

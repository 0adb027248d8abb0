#!/usr/bin/env bash
# Reproduces the figures of README "Results" and of models/default/MODEL_CARD.md on the
# shipped model: full-depth quality, the one-layer check, thresholds calibrated on the
# validation split and evaluated on the test split, and the baseline sweep with plots.
# About 45 minutes on a 2-core machine without AVX-512 (mostly the two validation sweeps).
# Outputs go to results/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q
mue=./target/release/mue
M=${MODEL:-models/default}
D=${DATA:-data/bench}
R=${RESULTS:-results}
[ -f "$D/snli_ve_test.tsv" ] || $mue data generate --out "$D" --seed 0 --train 8000 --valid 1000 --test 200 >/dev/null
mkdir -p "$R"
q="--quiet"

# Full depth, and every stream / token leaving after its first layer.
$mue eval --model "$M" --data "$D/snli_ve_test.tsv" --task entail --policy full $q > "$R/entail_test_full.json"
$mue eval --model "$M" --data "$D/snli_ve_test.tsv" --task entail --policy static --depth 1 $q > "$R/entail_test_depth1.json"
$mue eval --model "$M" --data "$D/caption_test.tsv" --task caption --policy full $q > "$R/caption_test_full.json"

# Thresholds chosen on the validation split, reported on the test split.
$mue calibrate --model "$M" --data "$D/snli_ve_valid.tsv" --task entail --target 0.99 \
    --grid scripts/grid_entail_mue.json --sweep-out "$R/calibrate_entail" $q
# Captions: the lower end of the bootstrap interval must reach the target (CIDEr-D has no
# binomial guarantee, and the estimate alone picked a point at the edge that missed on test).
# The caption grid has constant decoder thresholds and the paper's schedule (no exit in the
# first third of the tokens, then decaying); calibration picks either.
$mue calibrate --model "$M" --data "$D/caption_valid.tsv" --task caption --target 0.96 --lower-bound \
    --grid scripts/grid_caption_mue.json --sweep-out "$R/calibrate_caption" $q
$mue eval --model "$M" --data "$D/snli_ve_test.tsv" --task entail --policy mue $q > "$R/entail_test_mue.json"

# The same sweep with a Learn-then-Test guarantee (target 0.95, delta 0.1), on a scratch copy
# of the model so the shipped exits.json keeps the plain calibration.
G=$(mktemp -d)
cp "$M"/config.json "$M"/model.safetensors "$M"/tokenizer.json "$M"/exits.json "$G"/
$mue calibrate --model "$G" --data "$D/snli_ve_valid.tsv" --task entail --target 0.95 --delta 0.1 \
    --sweep "$R/calibrate_entail/sweep_entail.json" | tee "$R/calibrate_entail_guarantee.txt"
$mue eval --model "$G" --data "$D/snli_ve_test.tsv" --task entail --policy mue $q > "$R/entail_test_mue_guarantee.json"
rm -r "$G"
$mue eval --model "$M" --data "$D/caption_test.tsv" --task caption --policy mue $q > "$R/caption_test_mue.json"

# The final-only ablation (train it with the model card's command plus --loss final-only
# and pass its folder as ABLATION=...): calibrated on valid the same way, evaluated on test.
if [ -n "${ABLATION:-}" ]; then
  $mue calibrate --model "$ABLATION" --data "$D/snli_ve_valid.tsv" --task entail --target 0.99 \
      --grid scripts/grid_entail_mue.json --sweep-out "$R/calibrate_entail_ablation" $q
  $mue eval --model "$ABLATION" --data "$D/snli_ve_test.tsv" --task entail --policy full $q > "$R/entail_test_full_ablation.json"
  $mue eval --model "$ABLATION" --data "$D/snli_ve_test.tsv" --task entail --policy static --depth 1 $q > "$R/entail_test_depth1_ablation.json"
  $mue eval --model "$ABLATION" --data "$D/snli_ve_test.tsv" --task entail --policy mue $q > "$R/entail_test_mue_ablation.json"
  $mue eval --model "$ABLATION" --data "$D/caption_test.tsv" --task caption --policy full $q > "$R/caption_test_full_ablation.json"
fi

# MuE beside the baselines on the test split (CSV, JSON, Pareto frontier, PNG/SVG plot): an
# illustration of the frontiers. The table that picks every method's point on valid and
# evaluates it once on test is `mue report` (docs/results.md).
$mue sweep --model "$M" --data "$D/snli_ve_test.tsv" --task entail --grid scripts/grid_baselines.json \
    --out-dir "$R/sweep" $q > /dev/null
echo "results in $R/"

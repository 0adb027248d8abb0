#!/usr/bin/env bash
# Keeps the training runs of benchmark v2 (issue 23) across sessions: each run takes longer
# than one working session, and only main outlives a session (a side branch did not: the
# runs it held were lost on 2026-12-03). `save` commits every complete checkpoint under
# runs/v2 to the current branch, and nothing else: weights, config, tokenizer, state and
# log, plus the AdamW moments only while a run is unfinished (a finished run is only ever
# read, or used as an --init, so its 25 MB of moments would be dead weight in the history).
# A clone then has the checkpoints in place, and `scripts/train_v2.sh` continues each run
# with --resume.
#
#   pkill -STOP -f 'train --data data/bench2'   # pause training: a checkpoint being
#   bash scripts/keep_runs.sh save              # written is skipped only if its state
#   pkill -CONT -f 'train --data data/bench2'   # file is gone
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/v2}
[ "${1:-}" = save ] || { echo "usage: $0 save"; exit 2; }

files=()
summary=""
for d in "$RUNS"/*/; do
  d=${d%/}
  [ -f "$d/train_state.json" ] || { echo "keep_runs: skipping $d (no complete checkpoint)"; continue; }
  read -r step total < <(python3 -c 'import json,sys; s=json.load(open(sys.argv[1])); print(s["step"], s["total_steps"])' "$d/train_state.json")
  keep=(config.json model.safetensors tokenizer.json train_state.json train_log.jsonl)
  [ "$step" -lt "$total" ] && keep+=(optimizer.safetensors)
  for f in "${keep[@]}"; do [ -f "$d/$f" ] && files+=("$d/$f"); done
  summary+="$(basename "$d") step $step of $total; "
done
[ ${#files[@]} -gt 0 ] || { echo "keep_runs: nothing to save under $RUNS"; exit 1; }

# Build the commit in a scratch index from HEAD, so work staged elsewhere stays out of it.
idx=$(mktemp -u)
trap 'rm -f "$idx"' EXIT
export GIT_INDEX_FILE=$idx
git read-tree HEAD
git rm -r -q --cached --ignore-unmatch -- "$RUNS"
git add -f -- "${files[@]}"
tree=$(git write-tree)
unset GIT_INDEX_FILE
if [ "$tree" = "$(git rev-parse HEAD^{tree})" ]; then echo "keep_runs: nothing changed"; exit 0; fi
commit=$(git commit-tree "$tree" -p HEAD -m "v2 runs: ${summary%; }")
git update-ref -m "keep_runs save" HEAD "$commit"
git reset -q -- "$RUNS"  # the real index follows the new HEAD for these paths only
echo "keep_runs: $(git log -1 --format='%h %s')"

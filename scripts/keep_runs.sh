#!/usr/bin/env bash
# Keeps the training runs of benchmark v2 (issue 23) across machines: each run takes longer
# than one working session, and a session's machine may start bare. `save` stores every
# complete checkpoint under runs/v2 (weights, AdamW state, train_state.json, log) as the one
# commit of branch `v2-runs` (no parent, replaced on each save, so only the latest copy stays
# reachable); `restore` puts them back so `scripts/train_v2.sh` continues with --resume.
#
#   bash scripts/keep_runs.sh save       # pause `mue train` first: a checkpoint being
#   bash scripts/keep_runs.sh restore    # written is skipped only if its state file is gone
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/v2}
BRANCH=${BRANCH:-v2-runs}
case "${1:-}" in
save)
  idx=$(mktemp -u)
  files=()
  for d in "$RUNS"/*/; do
    [ -f "$d/train_state.json" ] || { echo "keep_runs: skipping $d (no complete checkpoint)"; continue; }
    for f in config.json model.safetensors optimizer.safetensors tokenizer.json train_state.json train_log.jsonl; do
      [ -f "$d/$f" ] && files+=("$d$f")
    done
  done
  [ ${#files[@]} -gt 0 ] || { echo "keep_runs: nothing to save under $RUNS"; exit 1; }
  GIT_INDEX_FILE=$idx git add -f -- "${files[@]}"
  tree=$(GIT_INDEX_FILE=$idx git write-tree)
  rm -f "$idx"
  msg="v2 runs: $(for d in "$RUNS"/*/; do if [ -f "$d/train_state.json" ]; then printf '%s step %s; ' "$(basename "$d")" "$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["step"])' "$d/train_state.json")"; fi; done)"
  commit=$(git commit-tree "$tree" -m "$msg")
  git update-ref "refs/heads/$BRANCH" "$commit"
  echo "keep_runs: $BRANCH = ${commit:0:10} ($msg)"
  ;;
restore)
  # A clone has the branch as origin/v2-runs.
  ref=""
  for r in "refs/heads/$BRANCH" "refs/remotes/origin/$BRANCH"; do
    git rev-parse --verify -q "$r" >/dev/null && { ref=$r; break; }
  done
  [ -n "$ref" ] || { echo "keep_runs: no branch $BRANCH (git fetch origin $BRANCH?)"; exit 1; }
  git archive "$ref" "$RUNS" | tar -x
  git log -1 --format='keep_runs: restored %s' "$ref"
  ;;
*) echo "usage: $0 save|restore"; exit 2 ;;
esac

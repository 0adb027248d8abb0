#!/usr/bin/env bash
# Issue 19: do exits pay off in wall time? For each task and batch size, `mue eval`'s wall
# reduction against its MAC reduction (both against the full-depth run in the same
# process), and the same from CPU time (perf stat task-clock; user + sys), which a shared
# machine disturbs less than wall time:
#   E_full = S + 2F (eval --policy full runs full depth twice), E_mue = S + F + M,
#   S = start-up (the same eval on one batch), so cpu_reduction = 1 - M / F.
# One worker thread by default (THREADS): with two on a busy machine, threads spinning and
# yielding while they wait for each other add CPU time that has nothing to do with the work.
#
#   MUE=target/release/mue ENTAIL=snli_ve_test.tsv CAPTION=caption_test.tsv bash scripts/wall_vs_macs.sh
set -euo pipefail
MUE=${MUE:-target/release/mue}
MODEL=${MODEL:-models/default}
ENTAIL=${ENTAIL:?set ENTAIL to an snli_ve TSV split}
CAPTION=${CAPTION:?set CAPTION to a caption TSV split}
ENTAIL_LIMIT=${ENTAIL_LIMIT:-400}
CAPTION_LIMIT=${CAPTION_LIMIT:-100}
BATCH=${BATCH:-1 8}
export RAYON_NUM_THREADS=${THREADS:-1}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cpu_ms() { # task-clock ms of one command
  perf stat -x, -e task-clock -o "$TMP/perf" "$@" >/dev/null 2>&1
  awk -F, '/task-clock/ {print $1}' "$TMP/perf"
}
uptime
echo "threads=$RAYON_NUM_THREADS"
for task in entail caption; do
  if [ "$task" = entail ]; then data=$ENTAIL; limit=$ENTAIL_LIMIT; else data=$CAPTION; limit=$CAPTION_LIMIT; fi
  for b in $BATCH; do
    args=(eval --model "$MODEL" --data "$data" --task "$task" --batch "$b" --quiet)
    e_mue=$(cpu_ms "$MUE" "${args[@]}" --limit "$limit" --policy mue --out "$TMP/mue.json")
    e_full=$(cpu_ms "$MUE" "${args[@]}" --limit "$limit" --policy full)
    s=$(cpu_ms "$MUE" "${args[@]}" --limit "$b" --policy full)
    python3 - "$TMP/mue.json" "$task" "$b" "$e_mue" "$e_full" "$s" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
task, b, e_mue, e_full, s = sys.argv[2], sys.argv[3], *map(float, sys.argv[4:])
red = r["reduction"]
f = (e_full - s) / 2
m = e_mue - s - f
cpu = 1 - m / f
print(f"{task} batch={b} n={r['examples']} mac_red={red['macs']:.3f} wall_red={red['wall']:.3f} "
      f"wall/mac={red['wall'] / red['macs']:.2f} wall_ms={r['wall_ms']:.0f}/{r['wall_ms_full']:.0f} "
      f"cpu_red={cpu:.3f} cpu/mac={cpu / red['macs']:.2f} cpu_ms={m:.0f}/{f:.0f}")
PY
  done
done
uptime

#!/usr/bin/env bash
# Issue 19: do exits pay off in wall time? For each task and batch size, `mue eval`'s wall
# and CPU-time reductions beside its MAC reduction, each against the full-depth run of the
# same examples in the same process (the eval JSON's wall_ms / wall_ms_full and cpu_ms /
# cpu_ms_full). CPU time (every thread of the process, /proc/self/task/*/schedstat) is what
# a busy shared machine disturbs least: with one worker thread it is the wall time the work
# would take alone. ROUNDS repeats the whole table.
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
ROUNDS=${ROUNDS:-1}
export RAYON_NUM_THREADS=${THREADS:-1}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
uptime
echo "threads=$RAYON_NUM_THREADS"
for round in $(seq "$ROUNDS"); do
  for task in entail caption; do
    if [ "$task" = entail ]; then data=$ENTAIL; limit=$ENTAIL_LIMIT; else data=$CAPTION; limit=$CAPTION_LIMIT; fi
    for b in $BATCH; do
      "$MUE" eval --model "$MODEL" --data "$data" --task "$task" --batch "$b" --quiet \
        --limit "$limit" --policy mue --out "$TMP/mue.json" >/dev/null 2>&1
      python3 - "$TMP/mue.json" "$task" "$b" "$round" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
task, b, round_ = sys.argv[2:5]
mac = r["reduction"]["macs"]
wall = r["reduction"]["wall"]
cpu = 1 - r["cpu_ms"] / r["cpu_ms_full"]
print(f"round={round_} {task} batch={b} n={r['examples']} mac_red={mac:.3f} "
      f"wall_red={wall:.3f} wall/mac={wall / mac:.2f} wall_ms={r['wall_ms']:.0f}/{r['wall_ms_full']:.0f} "
      f"cpu_red={cpu:.3f} cpu/mac={cpu / mac:.2f} cpu_ms={r['cpu_ms']:.0f}/{r['cpu_ms_full']:.0f}")
PY
    done
  done
done
uptime

#!/usr/bin/env bash
# CPU time of one greedy decoding step (issue 19, item 3), full depth: `mue bench`'s caption
# workload run with SHORT and LONG decoder steps; (CPU seconds of the long run - the short
# one) / (extra steps x runs) is one step's CPU time, without the encoder. CPU time (user +
# sys) rather than wall time, so that a machine shared with other work still gives
# comparable figures; run the binaries to compare one after the other.
#
#   MODEL=/tmp/mue-tiny MUES="old/mue target/release/mue" bash scripts/bench_decode.sh
# PRECISION=int8 times `--precision int8` (default f32).
set -euo pipefail
MODEL=${MODEL:?set MODEL to a model directory}
MUES=${MUES:-target/release/mue}
BATCH=${BATCH:-1 8}
SHORT=${SHORT:-2}
LONG=${LONG:-30}
ITERS=${ITERS:-3}
THREADS=${THREADS:-1}
PRECISION=${PRECISION:-f32}
cpu_s() { # CPU seconds (user + sys) of one `mue bench` run
  ( TIMEFORMAT='%U %S'; { time "$@" >/dev/null 2>&1; } 2>&1 ) | awk '{print $1 + $2}'
}
uptime
for b in $BATCH; do
  for m in $MUES; do
    args=(bench --model "$MODEL" --batch "$b" --iters "$ITERS" --threads "$THREADS" --workloads caption
      --precision "$PRECISION")
    s=$(cpu_s "$m" "${args[@]}" --steps "$SHORT")
    l=$(cpu_s "$m" "${args[@]}" --steps "$LONG")
    # one warm-up run besides the timed ones
    awk -v s="$s" -v l="$l" -v n=$((ITERS + 1)) -v d=$((LONG - SHORT)) -v m="$m" -v b="$b" \
      'BEGIN { printf "%s '$PRECISION' batch=%s decode_cpu_ms_per_step=%.2f (cpu_s %.2f at %d steps, %.2f at %d)\n", m, b, (l - s) * 1000 / (n * d), l, '"$LONG"', s, '"$SHORT"' }'
  done
done
uptime

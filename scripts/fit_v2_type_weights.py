#!/usr/bin/env python3
"""Refit benchmark v2's TYPE_WEIGHTS (src/data/benchmark/v2/weights.rs) so that every
hypothesis type carries each label about equally often. One step of a multiplicative
update from a generated split's label_by_type counts; run a few times:

    for i in 1 2 3; do
      cargo build --release && rm -rf /tmp/fit && \
      target/release/mue data generate --version 2 --out /tmp/fit --train 4000 --valid 10 --test 10 >/dev/null && \
      python3 scripts/fit_v2_type_weights.py /tmp/fit/stats.json
    done
"""
import json, os, re, sys

TYPES = ["presence", "counting", "attribute", "relation", "nth", "comparison", "negation"]
LABELS = ["entailment", "neutral", "contradiction"]
PATH = os.path.join(os.path.dirname(__file__), "..", "src/data/benchmark/v2/weights.rs")

m = json.load(open(sys.argv[1]))["stats"]["train"]["label_by_type"]
src = open(PATH).read()
table = src[src.rindex("= [") + 2:]
nums = [float(x) for x in re.findall(r"\d+\.\d+", table)]
W = [nums[i * 7:(i + 1) * 7] for i in range(3)] if len(nums) == 21 else [[1.0] * 7 for _ in range(3)]
for li, l in enumerate(LABELS):
    tot = sum(m[t].get(l, 0) for t in TYPES)
    for ti, t in enumerate(TYPES):
        W[li][ti] *= (tot / 7 / max(m[t].get(l, 0), 1)) ** 0.8
    s = sum(W[li])
    W[li] = [7 * x / s for x in W[li]]
for t in TYPES:
    n = sum(m[t].values())
    print(t, {l: round(m[t].get(l, 0) / n, 3) for l in LABELS}, n)
rows = "".join("    [" + ", ".join(f"{x:.3}" for x in r) + "],\n" for r in W)
open(PATH, "w").write(src[:src.rindex("= [") + 2] + "[\n" + rows + "];\n")

#!/usr/bin/env python3
"""Generate tests/data/metrics_fixture.json with reference scores from pycocoevalcap.

The Rust captioning metrics in src/eval/metrics.rs must agree with the
COCO caption evaluation toolkit (pycocoevalcap) on BLEU-1..4, CIDEr(-D) and
ROUGE-L. This script builds a deterministic set of candidate/reference groups,
scores them with pycocoevalcap's Bleu(4), Cider() and Rouge() scorers and writes
inputs plus outputs to JSON.

PTBTokenizer (Java) is deliberately NOT used: every caption below is already
lower-cased, punctuation-free and single-space-joined, which is exactly the
form the scorers receive after tokenization. The script asserts this.

Usage: python3 scripts/metrics_fixture.py   (installs pycocoevalcap via pip if missing)
"""
import json
import os
import re
import subprocess
import sys

try:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
except ImportError:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "pycocoevalcap"])
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

# (candidate, [references]) groups. Varied lengths, exact matches, no overlap,
# candidates shorter/longer than refs, 1-5 refs each, an empty candidate,
# one-word captions, repeated words (clipping) and closest-ref-length ties.
MAIN = [
    ("a red circle and a blue square",
     ["a red circle and a blue square",
      "a blue square next to a red circle",
      "two shapes a red circle and a blue square"]),
    ("a dog running on the grass",
     ["a brown dog runs across the green grass",
      "a dog is running on a lawn",
      "the dog plays in the park"]),
    ("purple elephants sing loudly",
     ["a man riding a bicycle down the street",
      "a cyclist on a city road"]),
    ("a cat",
     ["a cat sitting on a windowsill in the sun",
      "a small cat rests by the window"]),
    ("a man in a black jacket is standing next to a white car parked on the side of a busy city street at night",
     ["a man standing next to a white car",
      "a person beside a parked car at night"]),
    ("pizza",
     ["a large pizza on a wooden table",
      "pizza"]),
    ("",
     ["a train pulling into a station",
      "a red train at the platform"]),
    ("a a a a a a",
     ["a cat and a dog",
      "a bird on a branch"]),
    # testlen 5, ref lengths 4 and 6: closest tie -> shorter (4)
    ("a green triangle above circles",
     ["green triangle over circles",
      "a green triangle above two circles"]),
    ("two people playing frisbee in a park",
     ["two people playing frisbee in a park"]),
    ("a plate of food with broccoli and rice",
     ["a plate with rice and broccoli",
      "a white plate of food with vegetables",
      "broccoli and rice on a plate",
      "a healthy meal of rice and steamed broccoli on a plate",
      "food on a plate"]),
    ("a yellow star and a red circle",
     ["a red circle and a yellow star",
      "a yellow star beside a red circle"]),
    ("a blue square",
     ["a blue square and a green square",
      "two squares one blue and one green",
      "a blue square to the left of a green square",
      "blue and green squares"]),
    ("a group of people standing around a table",
     ["several people gather around a table",
      "a group of friends standing near a wooden table",
      "people standing by a table with food"]),
    ("a giraffe standing in a field",
     ["a giraffe standing in a field",
      "a tall giraffe in a grassy field",
      "a giraffe eating leaves from a tree",
      "an animal standing in the savanna",
      "a giraffe in the wild"]),
    ("the",
     ["the sun sets over the ocean"]),
    ("a boat on the water",
     ["a small boat floating on a calm lake",
      "a sailboat on the water"]),
    ("a woman holding an umbrella in the rain",
     ["a woman with an umbrella walks in the rain",
      "a lady holding a red umbrella",
      "a person under an umbrella on a rainy day"]),
    ("a kitchen with a stove and a refrigerator",
     ["a kitchen with a stove a sink and a refrigerator",
      "a small kitchen with white appliances"]),
    ("a bus",
     ["a red double decker bus driving down the street",
      "a bus on a road",
      "a large bus"]),
    ("a black and white photo of a clock tower",
     ["a black and white photo of a clock tower",
      "an old clock tower in black and white"]),
    ("zebras zebras zebras",
     ["two zebras grazing in a field",
      "zebras standing together on the grass"]),
    ("a man riding a wave on top of a surfboard",
     ["a surfer rides a large wave",
      "a man riding a wave on top of a surfboard",
      "a person surfing in the ocean",
      "a surfer on a wave"]),
    ("a circle",
     ["a red circle",
      "one circle",
      "a small red circle on a white background"]),
    ("a red circle and a blue square",
     ["a blue square and a red circle",
      "a red circle to the left of a blue square"]),
    ("a laptop computer sitting on top of a wooden desk next to a cup of coffee",
     ["a laptop on a desk",
      "a computer and a coffee mug on a desk"]),
    ("an orange cat sleeping on a couch",
     ["a cat asleep on the sofa",
      "an orange cat sleeping on a couch",
      "a ginger cat curled up on a couch"]),
    ("three green triangles",
     ["three green triangles in a row",
      "green triangles",
      "three triangles that are green"]),
    ("a person skiing down a snowy hill",
     ["a skier going down a slope",
      "a person skiing down a snowy hill",
      "someone skiing in the snow",
      "a skier on a mountain",
      "a man skiing downhill"]),
    ("quantum flux capacitor",
     ["a bowl of fruit on a table"]),
    ("a table",
     ["a dining table with chairs",
      "a table"]),
]

# A second, small corpus: CIDEr's document frequencies and log(#images)
# depend on the whole corpus, so scores differ from the same pairs in MAIN.
SMALL = [
    ("a red circle and a blue square",
     ["a red circle and a blue square",
      "a blue square next to a red circle"]),
    ("a dog running on the grass",
     ["a dog is running on a lawn"]),
    ("a cat",
     ["a cat sitting on a windowsill",
      "a cat"]),
]

NORMALISED = re.compile(r"^([a-z0-9]+( [a-z0-9]+)*)?$")


def score(groups):
    for cand, refs in groups:
        assert 1 <= len(refs) <= 5
        for s in [cand] + refs:
            assert NORMALISED.match(s), f"caption not pre-tokenized: {s!r}"
    gts = {i: list(refs) for i, (_, refs) in enumerate(groups)}
    res = {i: [cand] for i, (cand, _) in enumerate(groups)}

    bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_per = Cider().compute_score(gts, res)
    rouge, rouge_per = Rouge().compute_score(gts, res)
    n = len(groups)
    return {
        "refs": [refs for _, refs in groups],
        "cands": [cand for cand, _ in groups],
        "bleu": [float(b) for b in bleu],
        # bleu_per is [4][n]; store as [n][4]
        "bleu_per_sentence": [[float(bleu_per[k][i]) for k in range(4)] for i in range(n)],
        "cider": float(cider),
        "cider_per_sentence": [float(x) for x in cider_per],
        "rouge_l": float(rouge),
        "rouge_l_per_sentence": [float(x) for x in rouge_per],
    }


def main():
    import pycocoevalcap  # noqa: F401
    try:
        from importlib.metadata import version
        ver = version("pycocoevalcap")
    except Exception:  # pragma: no cover
        ver = "unknown"
    out = {
        "generator": "scripts/metrics_fixture.py",
        "pycocoevalcap_version": ver,
        "corpora": {"main": score(MAIN), "small": score(SMALL)},
    }
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "data", "metrics_fixture.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    for name, c in out["corpora"].items():
        print(name, "n=%d" % len(c["cands"]), "BLEU", c["bleu"], "CIDEr", c["cider"], "ROUGE-L", c["rouge_l"])
    print("wrote", path)


if __name__ == "__main__":
    main()

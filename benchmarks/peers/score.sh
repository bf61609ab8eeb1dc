#!/usr/bin/env bash
# Score a peer's label maps against the split's test ground truth with nuclei-d2's own tools/evaluate.py.
#   bash benchmarks/peers/score.sh PEER_OUTPUT_DIR [--partial]
# Reads PEER_OUTPUT_DIR/labels/<id>.png (or .npy); writes PEER_OUTPUT_DIR/score/: per_image.csv, results.json (every metric,
# per organ and seen/unseen organ: the organs of the split's training tiles are the seen ones) and summary.csv
# (mean +- standard error of AJI, PQ, Dice1, F1 overall and per organ group).
# Ground truth is every test tile of the split; a missing prediction is an error, unless --partial (smoke runs)
# limits the ground truth to the test tiles that have a prediction.
# Environment: DATA (default: ../shared/data/monuseg2018 beside the clone), SPLIT (kumar2017),
# NUCLEI_D2_PY (nuclei-d2's venv python; default: the one scripts/setup_env.sh gives).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
run=${1:?usage: score.sh PEER_OUTPUT_DIR [--partial]}
run=$(cd "$run" && pwd)
partial=${2:-}
data=$(cd "${DATA:-$repo/../shared/data/monuseg2018}" && pwd)
split=${SPLIT:-kumar2017}
py=${NUCLEI_D2_PY:-$(bash "$repo/scripts/setup_env.sh" | tail -n 1)/bin/python}

gt=$(mktemp -d)
trap 'rm -rf "$gt"' EXIT
# The split's test tiles (every test* list) and the organs of its training tiles, from splits.json / metadata.json.
train_organs=$("$py" - "$data" "$split" "$run" "$gt" "$partial" <<'PY'
import json, os, sys
from pathlib import Path
data, split, run, gt, partial = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
splits = json.loads((data / "splits.json").read_text())[split]
meta = json.loads((data / "metadata.json").read_text())
test = [i for k, ids in splits.items() if k.startswith("test") for i in ids]
if partial == "--partial":
    test = [i for i in test if any((run / "labels" / f"{i}.{e}").exists() for e in ("png", "npy"))]
elif partial:
    sys.exit(f"unknown option {partial!r} (only --partial)")
for i in test:
    os.symlink(data / "train" / "labels" / f"{i}.png", gt / f"{i}.png")
print(",".join(sorted({meta[i]["organ"] for i in splits["train"]})))
PY
)
out=$run/score
rm -rf "$out"
cd "$repo"
"$py" tools/evaluate.py --gt "$gt" --pred "$run/labels" --organs "$data/metadata.json" \
    --train-organs "$train_organs" --output-dir "$out" --quiet
"$py" tools/evaluate.py --summary "$out/per_image.csv" --output-dir "$out"

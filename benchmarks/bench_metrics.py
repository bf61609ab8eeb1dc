#!/usr/bin/env python
"""Time ``nuclei_d2.evaluation.compute_metrics`` on a real 1000x1000 MoNuSeg label map (~600 nuclei).

    python benchmarks/bench_metrics.py [--repeat 20] [--tile TCGA-49-4488-01Z-00-DX1] [--skip-plain]

The prediction is the ground truth perturbed like a real model's output (shifted by a few pixels, ~10 % of the
nuclei merged, split, missed, plus false positives: ``perturb`` of ``tests/test_metrics.py``). Every metric is
computed together (AJI, AJI+, PQ/DQ/SQ, F1, Dice1/2, object Dice and Hausdorff, MDR/FDR/USR/OSR); the table shows
the median and best of ``--repeat`` warm runs, the first (cold) run, a breakdown by stage, and a harder case
(nuclei merged with distant ones, so labels come in far-apart pieces). The same run times
the plain per-instance implementation of ``tests/test_metrics.py`` once, checks both agree, and prints the speed-up.
Needs the shared data (``../shared/data`` next to the repository, or ``NUCLEI_D2_SHARED_DATA``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed


def _shared_data() -> Path:
    env = os.environ.get("NUCLEI_D2_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def _load_test_module():
    spec = importlib.util.spec_from_file_location("_nuclei_d2_test_metrics", REPO / "tests" / "test_metrics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _timed(fn, repeat: int) -> tuple[float, float, float]:
    """(first run, median, best) in seconds."""
    t = time.perf_counter()
    fn()
    first = time.perf_counter() - t
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), min(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tile", help="MoNuSeg tile id (default: the one with the count closest to 600)")
    ap.add_argument("--skip-plain", action="store_true", help="do not run the (slow) plain implementation")
    args = ap.parse_args()

    data = _shared_data() / "monuseg2018"
    if not (data / "metadata.json").is_file():
        print(f"MoNuSeg data not found in {data}; set NUCLEI_D2_SHARED_DATA", file=sys.stderr)
        return 2
    meta = json.loads((data / "metadata.json").read_text())
    tile = args.tile or min(meta, key=lambda k: abs(meta[k]["n_nuclei_label"] - 600))
    from PIL import Image

    from nuclei_d2.evaluation.metrics import compute_metrics, contingency_table, metric_counts

    tests = _load_test_module()
    gt = np.array(Image.open(data / "train" / "labels" / f"{tile}.png"))
    pred = tests.perturb(gt.astype(np.int32), np.random.default_rng(0), merge="adjacent").astype(np.uint16)
    table = contingency_table(gt, pred)
    print(f"tile {tile} ({meta[tile]['organ']}): {gt.shape[0]}x{gt.shape[1]} {gt.dtype}, {table.n_gt} ground-truth "
          f"and {table.n_pred} predicted nuclei, {table.pair_gt.size} overlapping pairs; "
          f"{os.cpu_count()} CPUs, {args.repeat} warm runs\n")

    rows = []
    stages = [
        ("contingency table", lambda: contingency_table(gt, pred)),
        ("+ all metrics but Hausdorff", lambda: metric_counts(contingency_table(gt, pred), hausdorff=False)),
        ("compute_metrics (all metrics)", lambda: compute_metrics(gt, pred)),
    ]
    for name, fn in stages:
        rows.append((name, *_timed(fn, args.repeat)))
    ours = rows[-1][2]
    # Robustness, not the headline: labels merged with *distant* nuclei (one label in two far pieces).
    odd = tests.perturb(gt.astype(np.int32), np.random.default_rng(0), merge="any")
    rows.append(("compute_metrics, distant merges", *_timed(lambda: compute_metrics(gt, odd), max(args.repeat // 4,
                                                                                                  1))))
    # The most crowded tile of the set.
    big_tile = max(meta, key=lambda k: meta[k]["n_nuclei_label"])
    big = np.array(Image.open(data / "train" / "labels" / f"{big_tile}.png"))
    big_pred = tests.perturb(big.astype(np.int32), np.random.default_rng(1), merge="adjacent").astype(np.uint16)
    rows.append((f"compute_metrics, {meta[big_tile]['n_nuclei_label']}-nucleus tile",
                 *_timed(lambda: compute_metrics(big, big_pred), max(args.repeat // 4, 1))))

    from tabulate import tabulate

    print(tabulate([(n, f"{f * 1e3:.1f}", f"{m * 1e3:.1f}", f"{b * 1e3:.1f}") for n, f, m, b in rows],
                   headers=["stage", "first run (ms)", "median (ms)", "best (ms)"], tablefmt="pipe"))

    if not args.skip_plain:
        t = time.perf_counter()
        want = tests.plain_metrics(gt, pred)
        plain = time.perf_counter() - t
        got = compute_metrics(gt, pred)
        worst = max(abs(got[k] - want[k]) for k in want)
        print(f"\nplain per-instance implementation (tests/test_metrics.py): {plain:.2f} s; largest difference over "
              f"all metrics {worst:.2e}")
        print(f"speed-up of compute_metrics (median) over the plain implementation: {plain / ours:.0f}x")
    m = compute_metrics(gt, pred)
    print("\nvalues: " + ", ".join(f"{k}={m[k]:.4f}" for k in ("AJI", "AJI+", "PQ", "F1", "Dice1", "Dice2",
                                                                 "Dice_obj", "Hausdorff_obj", "MDR", "FDR", "USR",
                                                                 "OSR")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

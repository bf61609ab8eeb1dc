#!/usr/bin/env python
"""CPU inference time of the panoptic-fusion model (Liu et al., IJCAI 2019) vs the baseline Mask R-CNN.

Run by hand (not a test):  python benchmarks/bench_panoptic_fusion.py [--repeats 3] [--threads 2]

One synthetic 1000x1000 tile; every model is measured in the same run, interleaved (round-robin over the models at
each repeat, so a change in machine load hits all of them), and reported as the median time and the ratio to
configs/maskrcnn_baseline.yaml (R50-FPN). Rows:

* ``panoptic_fusion.yaml``: the paper's model as configured (ResNet-101, dual-modal mask generator);
* the same with ResNet-50: the baseline's backbone, so the difference is the mask generator alone;
* ``panoptic_fusion-ablation-ab2.yaml`` with ResNet-50: semantic branch + feature fusion with the standard mask head.
  Both are training-only, so this row should cost what the baseline costs (ratio ~1).

The models have random weights, so the score threshold is 0 and every model keeps the same number of detections
(``--detections``, default: the tile's nucleus count): all mask heads run on the same number of RoIs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog  # noqa: F401  (import order: detectron2.data before nuclei_d2)
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's nuclei_d2, whatever the venv has installed

import nuclei_d2  # noqa: F401
from nuclei_d2.data.synthetic import make_synthetic_tile
from nuclei_d2.engine import setup_cfg
from nuclei_d2.inference import NucleiPredictor

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

MODELS: list[tuple[str, str, list[str]]] = [  # (label, config, overrides)
    ("maskrcnn_baseline (R50)", "maskrcnn_baseline.yaml", []),
    ("panoptic_fusion (R101, paper)", "panoptic_fusion.yaml", []),
    ("panoptic_fusion, R50", "panoptic_fusion.yaml", ["MODEL.RESNETS.DEPTH", "50"]),
    ("ablation Ab2 (std mask head), R50", "panoptic_fusion-ablation-ab2.yaml", ["MODEL.RESNETS.DEPTH", "50"]),
]


def build_predictor(config: str, overrides: list[str], detections: int) -> NucleiPredictor:
    cfg = setup_cfg(str(CONFIGS / config), ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                            "TEST.DETECTIONS_PER_IMAGE", str(detections), *overrides])
    torch.manual_seed(0)
    return NucleiPredictor(cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed inference runs per model (interleaved)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--detections", type=int, default=0, help="detections per model (0 = the tile's nucleus count)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    image, label = make_synthetic_tile(1000, 123)
    n_nuclei = int(len(np.unique(label)) - 1)
    detections = args.detections or n_nuclei
    predictors = [(name, build_predictor(cfg, ovr, detections)) for name, cfg, ovr in MODELS]
    counts = {}
    for name, pred in predictors:  # warm-up (also records the detection count)
        counts[name] = len(pred(image))
    times: dict[str, list[float]] = {name: [] for name, _ in predictors}
    for _ in range(args.repeats):
        for name, pred in predictors:
            t = time.perf_counter()
            pred(image)
            times[name].append(time.perf_counter() - t)
    base = float(np.median(times[predictors[0][0]]))
    rows = []
    for name, _ in predictors:
        med = float(np.median(times[name]))
        rows.append([name, f"{med:.2f}", f"{med / base:.2f}", counts[name]])
    print(f"\nCPU threads: {args.threads}; torch {torch.__version__}; 1000x1000 synthetic tile with {n_nuclei} nuclei; "
          f"{args.repeats} interleaved runs per model, median; random weights, score threshold 0, "
          f"{detections} detections kept\n")
    print(tabulate(rows, headers=["model", "s / 1000² inference", "time vs baseline", "detections"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()

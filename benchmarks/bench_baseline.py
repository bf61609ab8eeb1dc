#!/usr/bin/env python
"""CPU throughput: seconds per training iteration and per 1000x1000 inference, as ratios against stock R50-FPN.

Run by hand (not a test):

    python benchmarks/bench_baseline.py [--iters 5] [--threads 2]
    python benchmarks/bench_baseline.py --configs maskrcnn_baseline.yaml nb_unet-tiny.yaml maskrcnn_plus-tiny.yaml

Prints a table; every config is measured in the same run as the first one (stock Mask R-CNN R50-FPN by default) and
reported as a ratio to it, since machines are noisy. Every config trains on the same data: 2 crops of 256x256 per
iteration from 512x512 synthetic tiles (``SOLVER.IMS_PER_BATCH 2``, ``INPUT.CROP.SIZE`` and
``INPUT.NUCLEI.CROP_SIZE`` 256), so the ratio compares models, not batch sizes; inference runs on a synthetic
1000x1000 tile with ~750 nuclei through :class:`~nuclei_d2.inference.NucleiPredictor` (tiling as configured).
Models that need a trained companion network (Mask R-CNN+'s distance U-Net, BRP-Net stage 2's TAFE) run with it
untrained (same cost).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from detectron2.data import DatasetCatalog
from detectron2.utils.events import EventStorage
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's nuclei_d2, whatever the venv has installed

import nuclei_d2  # noqa: F401
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.data.synthetic import make_synthetic_tile
from nuclei_d2.engine import RANDOM_INIT_OPTS, build_optimizer, setup_cfg
from nuclei_d2.inference import NucleiPredictor
from nuclei_d2.modeling import build_nuclei_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def time_training(cfg, iters: int) -> float:
    torch.manual_seed(0)
    model = build_nuclei_model(cfg)
    model.train()
    opt = build_optimizer(cfg, model)
    mapper = NucleiDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    rng = np.random.default_rng(0)
    times = []
    with EventStorage(0):
        for i in range(iters + 1):  # the first iteration warms up and is not counted
            batch = []
            while len(batch) < cfg.SOLVER.IMS_PER_BATCH:
                b = mapper(records[rng.integers(len(records))])
                if b is not None:
                    batch.append(b)
            t = time.perf_counter()
            loss = sum(model(batch).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i:
                times.append(time.perf_counter() - t)
    return float(np.median(times))


def time_inference(cfg, image: np.ndarray, repeats: int) -> tuple[float, int]:
    predictor = NucleiPredictor(cfg)
    predictor(image)  # warm-up
    times, n = [], 0
    for _ in range(repeats):
        t = time.perf_counter()
        n = len(predictor(image))
        times.append(time.perf_counter() - t)
    return float(np.median(times)), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=5, help="timed training iterations per config")
    p.add_argument("--repeats", type=int, default=3, help="timed inference runs per config")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--configs", nargs="+", default=["maskrcnn_baseline.yaml", "maskrcnn_baseline-tiny.yaml"],
                   help="config files (in configs/ or paths); the first is the baseline of the ratios")
    p.add_argument("--detections", type=int, default=750,
                   help="TEST.DETECTIONS_PER_IMAGE: random-init models fill any cap, so set it to a realistic count")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    image, label = make_synthetic_tile(1000, 123)
    rows = []
    base = None
    for name in args.configs:
        # Same data for all: 2 crops of 256x256 from 512x512 synthetic tiles.
        path = name if os.path.isfile(name) else str(CONFIGS / name)
        opts = ["MODEL.DEVICE", "cpu", "INPUT.CROP.SIZE", "[256, 256]", "INPUT.NUCLEI.CROP_SIZE", "256",
                "SOLVER.IMS_PER_BATCH", "2", "DATASETS.TRAIN", "('nuclei_synth_train',)",
                "DATASETS.TEST", "('nuclei_synth_test',)", "DATASETS.SYNTHETIC.IMAGE_SIZE", "512",
                "DATASETS.SYNTHETIC.NUM_TRAIN", "4", "TEST.DETECTIONS_PER_IMAGE", str(args.detections),
                *RANDOM_INIT_OPTS,  # untrained companions (distance U-Net, stage-1 nets) cost the same
                # Random-init scores sit near 0.5: with each config's own threshold (0.7 in the CPU configs, 0.5 in
                # R50's) some models would keep no detection and skip the mask head. At 0 all fill the same cap.
                "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"]
        if Path(path).name.startswith("nb_unet"):
            # A random-init net's "inside" map above the CPU config's 0.8 is speckle (~90,000 specks on the tile,
            # more pred_masks than memory allows); at the paper's 0.5 it gives blobs, as a trained net would.
            opts += ["MODEL.NB.THRESHOLD", "0.5"]
        if Path(path).name.startswith("two_stage_unet_stage2"):
            # Likewise: markers from a random distance map smoothed as little as the CPU config's 0.25 are ~12,000.
            opts += ["MODEL.TWO_STAGE.SIGMA_FACTOR", "0.5"]
        cfg = setup_cfg(path, opts)
        train_s = time_training(cfg, args.iters)
        infer_s, n = time_inference(cfg, image, args.repeats)
        if base is None:
            base = (train_s, infer_s)
        rows.append([Path(name).name, f"{train_s:.2f}", f"{base[0] / train_s:.2f}x", f"{infer_s:.2f}",
                     f"{base[1] / infer_s:.2f}x", n])
    load = os.getloadavg()[0]
    print(f"\nCPU threads: {args.threads}; torch {torch.__version__}; load average {load:.1f}; 1000x1000 tile with "
          f"{label.max()} nuclei; detections capped at {args.detections} (random-init models fill the cap)\n")
    print(tabulate(rows, headers=["config", "s / train iter (2x256²)", "speed vs R50", "s / 1000² inference",
                                  "speed vs R50", "detections"], tablefmt="github"))


if __name__ == "__main__":
    main()

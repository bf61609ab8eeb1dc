#!/usr/bin/env python
"""CPU inference cost of Mask R-CNN+ against the baseline Mask R-CNN on a 1000x1000 tile, and of its test-time
augmentation and ensembling.

Run by hand (not a test):

    python benchmarks/bench_maskrcnn_plus.py [--tiny] [--detections 500] [--repeats 2] [--threads 2] [--image T.tif]

Rows, each timed end to end from the RGB tile (the nuclei mapper -- hematoxylin deconvolution included -- plus the
model), median of ``--repeats`` runs after a warm-up, reported as a ratio to the baseline measured in the same run:

* baseline: ``configs/maskrcnn_baseline.yaml`` (RGB Mask R-CNN R50-FPN);
* Mask R-CNN+: ``configs/maskrcnn_plus.yaml`` without TTA (5 channels, 1x1 projection, the distance U-Net -- 5
  poolings, tiled over 256 px patches -- predicting the distance channel); the distance U-Net alone is also timed;
* + TTA: the four test-time copies (identity, flips, hue) merged per nucleus;
* + ensemble: ``--members`` Mask R-CNN+ models on one copy each, merged;
* + TTA + ensemble: both.

Random-init models detect noise, so every model is made to return exactly ``--detections`` nuclei
(``SCORE_THRESH_TEST 0``, ``TEST.DETECTIONS_PER_IMAGE``): the cost then reflects a tile with that many nuclei, the
same for every row. ``--tiny`` uses the tiny test configs instead (fast check of the script).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this clone's nuclei_d2, whatever the venv has installed

import nuclei_d2  # noqa: F401
from nuclei_d2.data.mapper import NucleiDatasetMapper
from nuclei_d2.data.synthetic import make_synthetic_tile
from nuclei_d2.engine import setup_cfg
from nuclei_d2.inference.test_time import TestTimeWrapper
from nuclei_d2.inference.tta import parse_tta_transforms
from nuclei_d2.modeling import build_nuclei_model
from nuclei_d2.utils.io import read_image_rgb

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def build(config: str, detections: int, seed: int):
    cfg = setup_cfg(str(CONFIGS / config), ["MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
                                            "TEST.DETECTIONS_PER_IMAGE", str(detections), "TEST.AUG.ENABLED", "False"]
                    + (["MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS", "", "MODEL.MASKRCNN_PLUS.ALLOW_UNTRAINED_DISTANCE",
                        "True"] if "plus" in config else []))
    torch.manual_seed(seed)
    model = build_nuclei_model(cfg).eval()
    return cfg, model, NucleiDatasetMapper(cfg, is_train=False)


def timed(fn, repeats: int) -> tuple[float, int]:
    n = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny test configs instead of the full ones")
    p.add_argument("--detections", type=int, default=500, help="nuclei every model returns")
    p.add_argument("--members", type=int, default=2, help="models in the ensemble rows")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per row (after one warm-up)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--image", help="an RGB tile to use instead of a synthetic 1000x1000 one")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    suffix = "-tiny" if args.tiny else ""

    image = read_image_rgb(args.image) if args.image else make_synthetic_tile(1000, 123)[0]
    h, w = image.shape[:2]
    record = {"file_name": args.image or "synthetic", "image": image, "height": h, "width": w}

    _, base, base_mapper = build(f"maskrcnn_baseline{suffix}.yaml", args.detections, 0)
    cfg, plus, plus_mapper = build(f"maskrcnn_plus{suffix}.yaml", args.detections, 0)
    members = [plus] + [build(f"maskrcnn_plus{suffix}.yaml", args.detections, s)[1] for s in range(1, args.members)]
    tta = parse_tta_transforms(list(cfg.TEST.AUG.TRANSFORMS), cfg.TEST.AUG.HUE_DELTA)
    extra = list(cfg.INPUT.EXTRA_CHANNELS)

    def run_model(model, mapper):
        def fn():
            with torch.no_grad():
                return len(model([mapper(record)])[0]["instances"])
        return fn

    def run_wrapper(models, transforms):
        wrapper = TestTimeWrapper(models, transforms, min_votes=2, extra_channels=extra).eval()
        return run_model(wrapper, plus_mapper)

    def run_distance():
        inp = plus_mapper(record)
        plus.distance_unet.predict_distance(inp["image"][:3])
        return 0

    rows = []
    base_s, n = timed(run_model(base, base_mapper), args.repeats)
    rows.append(["baseline Mask R-CNN (RGB)", 1, f"{base_s:.2f}", "1.00x", n])
    cases = [
        ("distance U-Net alone (incl. mapper)", 1, run_distance),
        ("Mask R-CNN+ (5 channels + distance U-Net)", 1, run_model(plus, plus_mapper)),
        (f"Mask R-CNN+ + TTA ({len(tta)} copies)", len(tta), run_wrapper([plus], tta)),
        (f"Mask R-CNN+ ensemble ({args.members} models)", args.members, run_wrapper(members, None)),
        (f"Mask R-CNN+ TTA + ensemble ({args.members} x {len(tta)})", args.members * len(tta),
         run_wrapper(members, tta)),
    ]
    plus_s = None
    for name, k, fn in cases:
        s, n = timed(fn, args.repeats)
        if name.startswith("Mask R-CNN+ (5"):
            plus_s = s
        rel = "" if plus_s is None or name.startswith("Mask R-CNN+ (5") else f" ({s / plus_s:.2f}x Mask R-CNN+)"
        rows.append([name, k, f"{s:.2f}", f"{s / base_s:.2f}x{rel}", n if name[0] != "d" else "-"])
    print(f"\nCPU threads: {args.threads}; torch {torch.__version__}; {h}x{w} tile; configs "
          f"maskrcnn_baseline{suffix}.yaml / maskrcnn_plus{suffix}.yaml; {args.detections} detections per "
          "prediction (random-init models)\n")
    print(tabulate(rows, headers=["inference", "predictions / tile", "s / tile", "vs baseline", "nuclei out"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()

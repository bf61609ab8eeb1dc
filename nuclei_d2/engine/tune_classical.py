"""Grid search of the classical floor's three parameters on a training split (``tools/tune_classical.py``).

The classical pipeline (:mod:`nuclei_d2.modeling.classical_watershed`) has no weights, but its threshold, marker
smoothing and minimum size matter (AJI moves by 0.1 or more between neighbouring grid points on Kumar). This module
scores every combination of a small grid on the images of a registered dataset with the project's metrics and writes
the best one as a config file that inherits from the one tuned::

    python tools/tune_classical.py --config-file configs/classical_watershed.yaml --dataset kumar_train
    python tools/train_net.py --config-file output/classical_watershed/tuned.yaml --eval-only

The haematoxylin foreground is computed once per (image, threshold) and reused for the other parameters.
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..evaluation.metrics import compute_metrics
from ..modeling.classical_watershed import ClassicalParams, classical_watershed, hematoxylin_foreground
from ..utils.io import read_image_rgb

__all__ = ["DEFAULT_GRID", "run", "tune_classical", "write_tuned_config"]

logger = logging.getLogger(__name__)

#: Values tried by default (6 x 3 x 3 = 54 combinations; about 0.4 s per 1000x1000 tile and combination).
DEFAULT_GRID: dict[str, tuple[float, ...]] = {
    "threshold_scale": (0.8, 0.9, 1.0, 1.1, 1.2, 1.3),
    "sigma_factor": (0.25, 0.5, 0.75),
    "min_size": (10, 30, 60),
}


def tune_classical(images: Sequence[np.ndarray], ground_truths: Sequence[np.ndarray],
                   grid: dict[str, Sequence[float]] | None = None, base: ClassicalParams | None = None,
                   metric: str = "AJI", progress: bool = True,
                   on_row: Callable[[dict[str, Any]], None] | None = None) -> tuple[ClassicalParams, list[dict]]:
    """Score every grid point on ``images`` and return ``(best parameters, rows sorted best first)``.

    Args:
        images: ``H x W x 3`` uint8 RGB images.
        ground_truths: their instance label maps.
        grid: values per parameter (``threshold_scale``, ``sigma_factor``, ``min_size``); missing ones keep ``base``'s.
        base: parameters not in the grid (smoothing, min_distance, connectivity).
        metric: the per-image mean to maximise (``AJI``, ``PQ``, ``Dice1``, ``F1``, ...).
        on_row: called with each scored row (e.g. to log it).

    Each row has the parameters, the mean of ``AJI``, ``PQ``, ``Dice1``, ``F1`` and ``metric`` over the images.
    """
    if len(images) != len(ground_truths):
        raise ValueError(f"{len(images)} images but {len(ground_truths)} ground truths")
    if not images:
        raise ValueError("no images to tune on")
    base = base or ClassicalParams()
    grid = {k: tuple(v) for k, v in (grid or DEFAULT_GRID).items()}
    unknown = set(grid) - {"threshold_scale", "sigma_factor", "min_size"}
    if unknown or any(len(v) == 0 for v in grid.values()):
        raise ValueError(f"the grid must give values for threshold_scale / sigma_factor / min_size, got {grid}")
    thresholds = grid.get("threshold_scale", (base.threshold_scale,))
    others = list(itertools.product(grid.get("sigma_factor", (base.sigma_factor,)),
                                    grid.get("min_size", (base.min_size,))))
    keys = sorted({"AJI", "PQ", "Dice1", "F1", metric})
    total = len(thresholds) * len(others) * len(images)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="tuning the classical floor", unit="run", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    try:
        for ts in thresholds:
            sums = {o: dict.fromkeys(keys, 0.0) for o in others}
            for image, gt in zip(images, ground_truths):
                fg = hematoxylin_foreground(image, float(ts), base.smoothing)
                for sf, ms in others:
                    p = replace(base, threshold_scale=float(ts), sigma_factor=float(sf), min_size=int(ms))
                    m = compute_metrics(gt, classical_watershed(image, p, foreground=fg), hausdorff=False)
                    for k in keys:
                        sums[(sf, ms)][k] += float(m[k])
                    if bar is not None:
                        bar.update(1)
            for (sf, ms), s in sums.items():
                row = {"threshold_scale": float(ts), "sigma_factor": float(sf), "min_size": int(ms),
                       **{k: v / len(images) for k, v in s.items()}}
                rows.append(row)
                if on_row is not None:
                    on_row(row)
    finally:
        if bar is not None:
            bar.close()
    rows.sort(key=lambda r: -r[metric])
    best = rows[0]
    return replace(base, threshold_scale=best["threshold_scale"], sigma_factor=best["sigma_factor"],
                   min_size=best["min_size"]), rows


def write_tuned_config(path: str | os.PathLike, base_config: str | os.PathLike, params: ClassicalParams,
                       comment: str = "") -> Path:
    """A config file that inherits from ``base_config`` and sets the tuned parameters (written atomically)."""
    from .defaults import write_override_config

    return write_override_config(path, base_config, params.to_config_opts(), comment)


def run(args: argparse.Namespace) -> int:
    """``tools/tune_classical.py``, after parsing (its parser lives in the tool, so --help needs no torch): tune on
    ``args.dataset``, print the table, write the tuned config. Returns the exit status (2 for bad input)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from detectron2.data import DatasetCatalog
    from tabulate import tabulate

    from ..data.datasets import DatasetLoadError
    from ..evaluation.evaluator import load_ground_truth
    from .defaults import ConfigError, check_datasets, setup_cfg

    try:
        cfg = setup_cfg(args.config_file, args.opts, eval_only=True)
        if cfg.MODEL.META_ARCHITECTURE != "ClassicalWatershed":
            raise ConfigError(f"{args.config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}; "
                              "tune_classical.py tunes ClassicalWatershed configs")
        check_datasets([args.dataset], "--dataset")
        records = DatasetCatalog.get(args.dataset)
    except (ConfigError, DatasetLoadError) as e:  # DatasetLoadError: the JSON's images moved, a bad JSON, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.max_images > 0:
        records = records[: args.max_images]
    if not records:
        print(f"error: dataset {args.dataset!r} has no images", file=sys.stderr)
        return 2
    images, gts = [], []
    for r in records:
        image = read_image_rgb(r["file_name"])
        images.append(image)
        gts.append(load_ground_truth(r, image.shape[:2]))
    grid = {"threshold_scale": args.threshold_scale, "sigma_factor": args.sigma_factor, "min_size": args.min_size}
    try:
        best, rows = tune_classical(images, gts, grid, ClassicalParams.from_config(cfg), args.metric,
                                    progress=not args.no_progress)
    except (KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cols = ["threshold_scale", "sigma_factor", "min_size", *sorted({"AJI", "PQ", "Dice1", "F1", args.metric})]
    print(f"\n{len(rows)} parameter sets on {len(images)} images of {args.dataset}, best by mean {args.metric}:")
    print(tabulate([[r[c] for c in cols] for r in rows[: args.top]], headers=cols, floatfmt=".3f"))
    out = args.output or os.path.join(cfg.OUTPUT_DIR, "tuned.yaml")
    comment = (f"Tuned by tools/tune_classical.py on {args.dataset} ({len(images)} images): mean {args.metric} "
               f"{rows[0][args.metric]:.4f}")
    write_tuned_config(out, args.config_file, best, comment)
    print(f"\nbest: {' '.join(best.to_config_opts())}\nwrote {out}")
    return 0

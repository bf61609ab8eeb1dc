#!/usr/bin/env python
"""An R-CNN's nuclei painted into label maps by other rules than the library's, scored on one dataset (issue 24).

    python benchmarks/overlap_rules.py --run runs/mr_ref/train --dataset kumar_train
    python benchmarks/overlap_rules.py --config-file A.yaml --weights a.pth --dataset kumar_test --min-areas 30 60 \\
        --output-csv out/overlap_rules.csv

Mask R-CNN's masks overlap where nuclei touch. The library gives a contested pixel to the best-*scored* nucleus
(:data:`nuclei_d2.structures.OVERLAP_RULE`, one rule everywhere). A per-pixel rule could be better at the contact
lines: the box score says how sure the detector is that a nucleus is there, not whose the pixel is. Rows, all from the
same predictions (one model pass per image, the model's own ``TEST.MASK_THRESHOLD``, score threshold and
``TEST.MIN_VISIBLE_FRACTION``):

* ``score``: the library's rule; its numbers are the evaluator's (``tools/train_net.py --eval-only``, no TTA);
* ``probability``: each pixel to the nucleus whose mask probability there is highest (among masks over the threshold);
* ``probability x score``: the same with each probability weighted by its nucleus's score;
* ``holes filled``: the library's rule on masks with their holes filled;
* ``min area N`` (``--min-areas``): the library's rule, then nuclei left with fewer than N pixels removed.

Columns: AJI, PQ, Dice1, F1 (means over images) and, against ``score``, the mean AJI difference, its standard error
over images, the images where the row is better, and the two-sided Wilcoxon p-value of AJI and PQ
(:func:`nuclei_d2.evaluation.offline.compare_predictions`). Test-time augmentation is not applied.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

from nuclei_d2.structures import CropMasks  # noqa: E402

logger = logging.getLogger("benchmarks.overlap_rules")
METRICS = ("AJI", "PQ", "Dice1", "F1")
COLUMNS = ["row", *METRICS, "AJI_diff", "AJI_diff_se", "images_better", "p_AJI", "p_PQ"]


def paint_by_probability(nuclei: CropMasks, threshold: float, weighted: bool = False) -> np.ndarray:
    """int32 label map, nucleus ``i`` painted ``i + 1``: each pixel goes to the nucleus with the highest mask
    probability there (times its score when ``weighted``) among those whose mask is ``>= threshold`` there; ties to
    the nucleus listed first."""
    best = np.full(nuclei.image_size, -1.0, np.float32)
    out = np.zeros(nuclei.image_size, np.int32)
    for i in range(len(nuclei)):
        x0, y0, x1, y1 = (int(v) for v in nuclei.boxes[i])
        prob = nuclei.masks[i]
        value = prob * float(nuclei.scores[i]) if weighted else prob
        region = best[y0:y1, x0:x1]
        take = (prob >= threshold) & (value > region)
        region[take] = value[take]
        out[y0:y1, x0:x1][take] = i + 1
    return out


def paint_holes_filled(nuclei: CropMasks, threshold: float) -> np.ndarray:
    """The library's rule on masks with their holes filled."""
    from scipy import ndimage

    filled = [ndimage.binary_fill_holes(m >= threshold).astype(np.float32) for m in nuclei.masks]
    return CropMasks(nuclei.image_size, nuclei.boxes, filled, nuclei.scores, nuclei.classes).to_label_map(0.5)


def drop_small(label: np.ndarray, min_area: int) -> np.ndarray:
    """``label`` without the nuclei of fewer than ``min_area`` pixels."""
    area = np.bincount(label.ravel())
    small = np.flatnonzero(area < min_area)
    out = label.copy()
    out[np.isin(out, small[small > 0])] = 0
    return out


def rules(threshold: float, min_areas: Sequence[int]) -> dict[str, Callable[[CropMasks], np.ndarray]]:
    """Row name -> the function painting one image's nuclei (soft masks) into a label map."""
    out: dict[str, Callable[[CropMasks], np.ndarray]] = {
        "score": lambda c: c.to_label_map(threshold),
        "probability": lambda c: paint_by_probability(c, threshold),
        "probability x score": lambda c: paint_by_probability(c, threshold, weighted=True),
        "holes filled": lambda c: paint_holes_filled(c, threshold),
    }
    for a in min_areas:
        out[f"min area {a}"] = lambda c, a=a: drop_small(c.to_label_map(threshold), a)
    return out


def model_nuclei(model, inp: dict, mask_threshold: float, min_visible: float, score_threshold: float) -> CropMasks:
    """The R-CNN's nuclei of one mapped input with soft masks, after the filters of its post-processing
    (``TEST.MIN_VISIBLE_FRACTION`` at ``TEST.MASK_THRESHOLD``) and of the evaluator
    (``TEST.NUCLEI_EVAL.SCORE_THRESHOLD``): the nuclei ``tools/train_net.py --eval-only`` scores."""
    from nuclei_d2.inference.test_time import predict_crops

    nuclei = predict_crops(model, inp, soft_masks=True)
    nuclei = nuclei.select(np.flatnonzero(~nuclei.hidden(min_visible, mask_threshold)))
    if score_threshold > 0:
        nuclei = nuclei.select(np.flatnonzero(nuclei.scores >= score_threshold))
    return nuclei


def score_rules(cfg, dataset: str, min_areas: Sequence[int]) -> dict[str, list[dict]]:
    """Per-image metric records of every rule on ``dataset`` (one model pass per image)."""
    from detectron2.data import DatasetCatalog
    from tqdm import tqdm

    from nuclei_d2.evaluation.evaluator import _image_name, load_ground_truth
    from nuclei_d2.evaluation.metrics import compute_metrics
    from nuclei_d2.inference.predictor import NucleiPredictor
    from nuclei_d2.modeling.rcnn import NucleiRCNN
    from nuclei_d2.utils.io import read_image_rgb

    predictor = NucleiPredictor(cfg)
    if not isinstance(predictor.model, NucleiRCNN):
        raise ValueError(f"{cfg.MODEL.META_ARCHITECTURE} is not an R-CNN: only R-CNN masks overlap")
    threshold, min_visible = float(cfg.TEST.MASK_THRESHOLD), float(cfg.TEST.MIN_VISIBLE_FRACTION)
    ev = cfg.TEST.NUCLEI_EVAL
    painters = rules(threshold, min_areas)
    records: dict[str, list[dict]] = {name: [] for name in painters}
    for rec in tqdm(DatasetCatalog.get(dataset), desc=f"{dataset}", unit="image"):
        image = read_image_rgb(rec["file_name"])
        h, w = image.shape[:2]
        nuclei = model_nuclei(predictor.model, predictor.mapper({"image": image, "height": h, "width": w}),
                              threshold, min_visible, float(ev.SCORE_THRESHOLD))
        gt = load_ground_truth(rec, (h, w))
        for name, paint in painters.items():
            m = compute_metrics(gt, paint(nuclei), float(ev.IOU_THRESHOLD), hausdorff=False)
            records[name].append({"image": _image_name(rec), **{k: m[k] for k in METRICS}})
    return records


def table_rows(records: dict[str, list[dict]]) -> list[dict]:
    """One row per rule: means and the paired comparison with ``score``."""
    from nuclei_d2.evaluation.offline import compare_predictions

    base = records["score"]
    rows = []
    for name, recs in records.items():
        row = {"row": name, **{k: float(np.mean([r[k] for r in recs])) for k in METRICS}}
        cmp = {c["metric"]: c for c in compare_predictions(base, recs, ("AJI", "PQ"))}
        better = sum(b["AJI"] > a["AJI"] for a, b in zip(base, recs))
        row.update(AJI_diff=cmp["AJI"]["mean_diff"], AJI_diff_se=cmp["AJI"]["se_diff"],
                   images_better=f"{better}/{len(recs)}", p_AJI=cmp["AJI"]["p_value"], p_PQ=cmp["PQ"]["p_value"])
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict]) -> str:
    from tabulate import tabulate

    def f(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    return tabulate([[f(r[c]) for c in COLUMNS] for r in rows], headers=COLUMNS, tablefmt="pipe",
                    disable_numparse=True)


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    """The table as CSV, atomically (:func:`nuclei_d2.utils.io.atomic_write`)."""
    from nuclei_d2.utils.io import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)

    atomic_write(path, write)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--run", help="a tools/train_net.py OUTPUT_DIR (its config.yaml and model_final.pth)")
    p.add_argument("--config-file", help="the model's config (instead of --run)")
    p.add_argument("--weights", help="the model's weights (with --config-file)")
    p.add_argument("--dataset", default="kumar_train", help="a registered dataset with ground truth")
    p.add_argument("--min-areas", type=int, nargs="*", default=[30], help="rows 'min area N' (pixels)")
    p.add_argument("--output-csv", help="also write the table here")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = p.parse_args(argv)
    if bool(args.run) == bool(args.config_file):
        p.error("give --run RUN_DIR or --config-file CONFIG --weights WEIGHTS")
    if args.run:
        args.config_file, args.weights = os.path.join(args.run, "config.yaml"), os.path.join(args.run,
                                                                                              "model_final.pth")
    for what, path in (("config", args.config_file), ("weights", args.weights)):
        if not path or not os.path.isfile(path):
            p.error(f"{what} file {path!r} not found")
    if any(a < 1 for a in args.min_areas):
        p.error("--min-areas must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from nuclei_d2.config import build_cfg

    cfg = build_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
    start = time.perf_counter()
    records = score_rules(cfg, args.dataset, args.min_areas)
    rows = table_rows(records)
    print(f"\n{args.dataset}, {len(records['score'])} images, {time.perf_counter() - start:.0f} s "
          f"(mask threshold {cfg.TEST.MASK_THRESHOLD}, min visible fraction {cfg.TEST.MIN_VISIBLE_FRACTION})\n")
    print(format_table(rows))
    if args.output_csv:
        write_csv(Path(args.output_csv), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

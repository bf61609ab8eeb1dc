"""Scoring saved predictions: folders of label maps, COCO JSON datasets and COCO results files; A/B comparison.

The logic behind ``tools/evaluate.py`` (which only calls :func:`main`)::

    python tools/evaluate.py --gt labels/ --pred predictions/ --output-dir out/
    python tools/evaluate.py --gt test_coco.json --pred coco_instances_results.json
    python tools/evaluate.py --gt labels/ --pred method_a/ --pred-b method_b/   # paired Wilcoxon per metric

Sources (:func:`open_label_source`):

* a **folder** of label maps (``.png``/``.tif``/``.tiff``/``.npy``, 0 = background), images matched by file stem;
* a **COCO dataset JSON** (``images`` + ``annotations`` with RLE or polygon masks), images named by the stem of
  their ``file_name``; annotations are painted in order (a later one wins an overlapped pixel), or by score when
  every annotation has one;
* a **COCO results JSON** (a list of ``{"image_id", "segmentation", "score"}``, e.g. Detectron2's
  ``coco_instances_results.json``) -- only as a prediction, with a COCO dataset JSON as ground truth to map image ids
  to images. Overlapping detections are resolved like the evaluator does: a pixel goes to the highest score (ties:
  the detection listed first). Images without any detection have an empty prediction. Categories are ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import ImageReadError, atomic_write, read_label_map
from ..structures import annotations_to_label_map
from .metrics import HIGHER_IS_BETTER, METRIC_KEYS, compute_metrics
from .report import format_summary_table, is_seen, summarize, write_records_csv, write_results_json

__all__ = [
    "LabelMapSource",
    "build_parser",
    "compare_predictions",
    "format_comparison_table",
    "load_organ_map",
    "main",
    "open_label_source",
    "score_sources",
    "write_comparison_csv",
]

logger = logging.getLogger(__name__)

LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy")


@dataclass
class LabelMapSource:
    """Named label maps, loaded one at a time (``load(name)``) so a whole test set never sits in memory."""

    path: Path
    kind: str  # "folder", "coco" or "coco-results"
    names: list[str]
    loader: Callable[[str], np.ndarray]
    organs: dict[str, str] = field(default_factory=dict)
    image_ids: dict[Any, str] = field(default_factory=dict)  # COCO image id -> name
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __contains__(self, name: str) -> bool:
        return name in self._name_set

    def __len__(self) -> int:
        return len(self.names)

    def __post_init__(self) -> None:
        self._name_set = set(self.names)

    def load(self, name: str) -> np.ndarray:
        if name not in self._name_set:
            raise KeyError(f"{self.path}: no image named {name!r}")
        return self.loader(name)


def _paint(annos: list[dict[str, Any]], height: int, width: int, by_score: bool) -> np.ndarray:
    """Label map of annotations; with ``by_score`` the highest score wins overlaps (ties: the first listed)."""
    if by_score:
        order = sorted(range(len(annos)), key=lambda k: (-float(annos[k]["score"]), k))
        annos = [annos[k] for k in reversed(order)]  # painted last = wins
    return annotations_to_label_map(annos, height, width)


def _folder_source(folder: Path) -> LabelMapSource:
    files: dict[str, Path] = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.suffix.lower() in LABEL_SUFFIXES and not f.name.startswith("."):
            if f.stem in files:
                raise ValueError(f"{folder}: two label maps for image {f.stem!r}: {files[f.stem].name} and {f.name}")
            files[f.stem] = f
    if not files:
        raise ValueError(f"{folder}: no label maps ({', '.join(LABEL_SUFFIXES)}) in this folder")
    return LabelMapSource(path=folder, kind="folder", names=list(files), loader=lambda n: read_label_map(files[n]))


def _coco_source(path: Path, data: Mapping[str, Any]) -> LabelMapSource:
    names: dict[Any, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    organs: dict[str, str] = {}
    for img in data["images"]:
        for key in ("id", "height", "width"):
            if key not in img:
                raise ValueError(f"{path}: image entry {img.get('file_name', img)} has no {key!r}")
        name = Path(str(img["file_name"])).stem if img.get("file_name") else str(img["id"])
        if name in sizes:
            raise ValueError(f"{path}: two images are named {name!r}")
        names[img["id"]] = name
        sizes[name] = (int(img["height"]), int(img["width"]))
        if img.get("organ"):
            organs[name] = str(img["organ"])
    annos: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for k, a in enumerate(data["annotations"]):
        if a.get("image_id") not in names:
            raise ValueError(f"{path}: annotation {k} refers to unknown image_id {a.get('image_id')!r}")
        if "segmentation" not in a:
            raise ValueError(f"{path}: annotation {k} has no 'segmentation'; nucleus metrics need masks")
        if not a.get("iscrowd", 0):
            annos[names[a["image_id"]]].append(a)

    def load(name: str) -> np.ndarray:
        items = annos.get(name, [])
        try:
            return _paint(items, *sizes[name], by_score=bool(items) and all("score" in a for a in items))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: image {name!r}: {e}") from e

    return LabelMapSource(path=path, kind="coco", names=list(sizes), loader=load, organs=organs, image_ids=names,
                          sizes=sizes)


def _results_source(path: Path, results: list[Any], reference: LabelMapSource | None,
                    min_score: float) -> LabelMapSource:
    if reference is None or reference.kind != "coco":
        raise ValueError(f"{path}: a COCO results file lists detections by image_id; give the ground truth as the "
                         "COCO dataset JSON these ids come from (--gt dataset.json)")
    per_image: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for k, r in enumerate(results):
        if not isinstance(r, Mapping) or "image_id" not in r or "segmentation" not in r:
            raise ValueError(f"{path}: entry {k} is not a COCO result with 'image_id' and 'segmentation'")
        if r["image_id"] not in reference.image_ids:
            raise ValueError(f"{path}: entry {k} refers to image_id {r['image_id']!r}, which is not in "
                             f"{reference.path}")
        if float(r.get("score", 1.0)) >= min_score:
            per_image[reference.image_ids[r["image_id"]]].append({**r, "score": float(r.get("score", 1.0))})

    def load(name: str) -> np.ndarray:
        try:
            return _paint(per_image.get(name, []), *reference.sizes[name], by_score=True)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: image {name!r}: {e}") from e

    return LabelMapSource(path=path, kind="coco-results", names=list(reference.names), loader=load,
                          sizes=dict(reference.sizes))


def open_label_source(path: str | Path, reference: LabelMapSource | None = None,
                      min_score: float = 0.0) -> LabelMapSource:
    """Open a folder of label maps, a COCO dataset JSON or a COCO results JSON (which needs ``reference``).

    Args:
        reference: the ground-truth source, needed to read a COCO results file (image ids -> images, sizes).
        min_score: drop detections of a COCO results file scoring below this.
    """
    path = Path(path)
    if path.is_dir():
        return _folder_source(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such folder or file")
    if path.suffix.lower() in LABEL_SUFFIXES:
        raise ValueError(f"{path}: give the folder that holds the label maps, not one file")
    if path.suffix.lower() != ".json":
        raise ValueError(f"{path}: expected a folder of label maps or a COCO .json file")
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if isinstance(data, Mapping) and "images" in data and "annotations" in data:
        return _coco_source(path, data)
    if isinstance(data, list):
        return _results_source(path, data, reference, min_score)
    raise ValueError(f"{path}: neither a COCO dataset (with 'images' and 'annotations') nor a COCO results list")


def load_organ_map(path: str | Path) -> dict[str, str]:
    """``{image name: organ}`` from a JSON file mapping names to organs or to dicts with an ``organ`` key.

    The MoNuSeg ``metadata.json`` of the shared data has the second form.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: organ map not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object {{image name: organ}}")
    out = {}
    for name, v in data.items():
        organ = v.get("organ") if isinstance(v, Mapping) else v
        if organ is not None:
            out[Path(str(name)).stem] = str(organ)
    return out


def score_sources(gt: LabelMapSource, pred: LabelMapSource, *, iou_threshold: float = 0.5, hausdorff: bool = True,
                  missing: str = "error", organs: Mapping[str, str] | None = None,
                  train_organs: Sequence[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Score every ground-truth image against its prediction; returns one record per image (ground-truth order).

    Args:
        missing: what to do with ground-truth images that have no prediction: "error" (default) or "empty"
            (score an empty prediction). Predictions without ground truth are ignored with a warning.
        organs: ``{image name: organ}``; defaults to the organs a COCO ground truth lists.
        train_organs: organs seen in training (for the seen/unseen split).
    """
    if missing not in ("error", "empty"):
        raise ValueError(f"missing must be 'error' or 'empty', got {missing!r}")
    absent = [n for n in gt.names if n not in pred]
    if absent and missing == "error":
        shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
        raise ValueError(f"{pred.path}: no prediction for {len(absent)} of {len(gt)} ground-truth images ({shown}); "
                         "use --missing empty to score them as empty predictions")
    extra = [n for n in pred.names if n not in gt]
    if extra:
        logger.warning(f"{pred.path}: {len(extra)} predictions have no ground truth and are ignored "
                       f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''})")
    organs = dict(gt.organs) | dict(organs or {})
    from tqdm import tqdm

    records = []
    for name in tqdm(gt.names, desc=f"scoring {pred.path.name}", unit="image", disable=not progress):
        g = gt.load(name)
        p = pred.load(name) if name in pred else np.zeros(g.shape, dtype=np.int32)
        if g.shape != p.shape:
            raise ValueError(f"image {name!r}: ground truth ({gt.path}) is {g.shape[0]}x{g.shape[1]} but the "
                             f"prediction ({pred.path}) is {p.shape[0]}x{p.shape[1]}")
        organ = organs.get(name)
        records.append({"image": name, "organ": organ, "organ_seen": is_seen(organ, None, train_organs),
                        **compute_metrics(g, p, iou_threshold, hausdorff=hausdorff)})
    return records


def compare_predictions(records_a: Sequence[Mapping[str, Any]], records_b: Sequence[Mapping[str, Any]],
                        keys: Sequence[str] = METRIC_KEYS) -> list[dict[str, Any]]:
    """Paired comparison of two prediction sets on the same images: a two-sided Wilcoxon signed-rank test per metric.

    Returns one row per metric: ``n`` (image pairs; NaN values dropped), ``mean_a``, ``mean_b``, ``mean_diff`` and
    ``median_diff`` (B - A), ``statistic`` and ``p_value`` of ``scipy.stats.wilcoxon`` (zero differences dropped,
    its default), and ``better`` ("A", "B" or "=" by the mean, knowing whether the metric is higher- or lower-better).
    When every difference is zero the test is undefined: ``p_value`` is 1.0 and ``statistic`` NaN.
    """
    from scipy.stats import wilcoxon

    a_by = {r["image"]: r for r in records_a}
    b_by = {r["image"]: r for r in records_b}
    if set(a_by) != set(b_by):
        only_a, only_b = sorted(set(a_by) - set(b_by)), sorted(set(b_by) - set(a_by))
        raise ValueError(f"the two prediction sets cover different images (only in A: {only_a[:5]}, only in B: "
                         f"{only_b[:5]}); a paired test needs the same images")
    names = [r["image"] for r in records_a]
    rows = []
    for k in keys:
        a = np.array([float(a_by[n][k]) for n in names])
        b = np.array([float(b_by[n][k]) for n in names])
        ok = ~(np.isnan(a) | np.isnan(b))
        a, b = a[ok], b[ok]
        d = b - a
        row: dict[str, Any] = {"metric": k, "n": int(a.size),
                               "mean_a": float(a.mean()) if a.size else math.nan,
                               "mean_b": float(b.mean()) if b.size else math.nan,
                               "mean_diff": float(d.mean()) if d.size else math.nan,
                               "median_diff": float(np.median(d)) if d.size else math.nan}
        if a.size == 0:
            row.update(statistic=math.nan, p_value=math.nan)
        elif np.all(d == 0):
            row.update(statistic=math.nan, p_value=1.0)
        else:
            res = wilcoxon(a, b)
            row.update(statistic=float(res.statistic), p_value=float(res.pvalue))
        if not d.size or row["mean_diff"] == 0:
            row["better"] = "="
        else:
            b_higher = row["mean_diff"] > 0
            row["better"] = "B" if b_higher == HIGHER_IS_BETTER[k] else "A"
        rows.append(row)
    return rows


COMPARISON_COLUMNS = ("metric", "n", "mean_a", "mean_b", "mean_diff", "median_diff", "statistic", "p_value", "better")


def format_comparison_table(rows: Sequence[Mapping[str, Any]], name_a: str = "A", name_b: str = "B") -> str:
    from tabulate import tabulate

    def f(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}")
        return str(v)

    headers = ["metric", "n", f"mean {name_a}", f"mean {name_b}", "mean diff (B-A)", "median diff", "W", "p",
               "better"]
    body = [[f(r[c]) for c in COMPARISON_COLUMNS] for r in rows]
    for line in body:
        line[-1] = {"A": name_a, "B": name_b}.get(line[-1], line[-1])
    return tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True)


def write_comparison_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    import csv

    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(COMPARISON_COLUMNS)
            for r in rows:
                w.writerow([r[c] for c in COMPARISON_COLUMNS])

    return atomic_write(path, _write)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py",
        description="Score nucleus instance segmentations (AJI, AJI+, PQ, F1, Dice, Hausdorff, MDR/FDR/USR/OSR) "
                    "against ground truth, and compare two prediction sets with a paired Wilcoxon test.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--gt", required=True, help="ground truth: folder of label maps or COCO dataset JSON")
    p.add_argument("--pred", required=True,
                   help="predictions: folder of label maps (matched by file stem), COCO dataset JSON, or COCO "
                        "results JSON (needs --gt as COCO JSON)")
    p.add_argument("--pred-b", help="a second prediction set to compare with --pred (paired Wilcoxon per metric)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"), help="names of --pred and --pred-b in the tables")
    p.add_argument("--iou-threshold", type=float, default=0.5,
                   help="IoU a pair must exceed for F1/precision/recall (PQ always uses 0.5)")
    p.add_argument("--min-score", type=float, default=0.0, help="drop detections of COCO results below this score")
    p.add_argument("--no-hausdorff", action="store_true", help="skip the object-level Hausdorff distance")
    p.add_argument("--missing", choices=("error", "empty"), default="error",
                   help="ground-truth images without a prediction: stop with an error, or score an empty prediction")
    p.add_argument("--organs", help="JSON {image name: organ} (or {name: {'organ': ...}}, like MoNuSeg's "
                                    "metadata.json) for per-organ results")
    p.add_argument("--train-organs", help="comma-separated organs seen in training, for seen/unseen results")
    p.add_argument("--output-dir", help="write per-image CSV, JSON summary (and comparison CSV) here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tools/evaluate.py``; returns the process exit code (2 on bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        return _run(args)
    except (ValueError, KeyError, FileNotFoundError, ImageReadError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.iou_threshold < 1.0:
        raise ValueError(f"--iou-threshold must be in [0, 1), got {args.iou_threshold}")
    gt = open_label_source(args.gt)
    organs = load_organ_map(args.organs) if args.organs else None
    train_organs = [o.strip() for o in args.train_organs.split(",") if o.strip()] if args.train_organs else None
    name_a, name_b = args.names or ("A", "B")
    settings = {"gt": str(gt.path), "iou_threshold": args.iou_threshold, "pq_iou_threshold": 0.5,
                "hausdorff": not args.no_hausdorff, "min_score": args.min_score, "missing": args.missing,
                "train_organs": train_organs}
    out_dir = Path(args.output_dir) if args.output_dir else None

    sets = [("", name_a, args.pred)] + ([("_b", name_b, args.pred_b)] if args.pred_b else [])
    all_records = []
    for suffix, name, src in sets:
        pred = open_label_source(src, reference=gt, min_score=args.min_score)
        records = score_sources(gt, pred, iou_threshold=args.iou_threshold, hausdorff=not args.no_hausdorff,
                                missing=args.missing, organs=organs, train_organs=train_organs,
                                progress=not args.quiet)
        summary = summarize(records)
        print(f"\n{name}: {pred.path} ({len(records)} images; F1/precision/recall at IoU > {args.iou_threshold:g}, "
              "PQ at IoU > 0.5)")
        print(format_summary_table(summary))
        if out_dir:
            write_records_csv(out_dir / f"per_image{suffix}.csv", records)
            write_results_json(out_dir / f"results{suffix}.json", records, summary,
                               {**settings, "pred": str(pred.path), "name": name})
        all_records.append(records)
    if args.pred_b:
        rows = compare_predictions(all_records[0], all_records[1])
        print(f"\n{name_b} vs {name_a}: paired two-sided Wilcoxon signed-rank test per metric "
              f"({len(all_records[0])} images)")
        print(format_comparison_table(rows, name_a, name_b))
        if out_dir:
            write_comparison_csv(out_dir / "comparison.csv", rows)
    if out_dir:
        print(f"\nresults written to {out_dir}")
    return 0

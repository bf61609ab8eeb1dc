"""Scoring saved predictions: folders of label maps, COCO JSON datasets and COCO results files; A/B comparison.

The logic behind ``tools/evaluate.py`` (whose parser lives in the tool file; it calls :func:`run_evaluate`)::

    python tools/evaluate.py --gt labels/ --pred predictions/ --output-dir out/
    python tools/evaluate.py --gt labels/ --pred predict_out/          # tools/predict.py's output folder as it is
    python tools/evaluate.py --gt test_coco.json --pred coco_instances_results.json
    python tools/evaluate.py --gt labels/ --pred method_a/ --pred-b method_b/   # paired Wilcoxon per metric
    python tools/evaluate.py --compare a/nuclei_per_image.csv b/nuclei_per_image.csv   # the same, from per-image CSVs
    python tools/evaluate.py --summary nuclei_per_image.csv                     # mean +- standard error over images

Sources (:func:`open_label_source`):

* a **folder** of label maps (``.png``/``.tif``/``.tiff``/``.npy``, 0 = background), images named by file stem.
  As a prediction, it is matched to the ground truth's names: image ``<stem>`` is ``<stem>.<ext>`` or
  ``<stem>_labels.<ext>`` (the name ``tools/predict.py`` writes); two files for one image are an error naming both.
  Hidden files (``.*``, e.g. unfinished temporary files) and predict's RGB overlays (``*_overlay.png``) are not
  label maps; other files (GeoJSON, CSV, ``*.done.json``, ``summary.json``) have other suffixes and are ignored;
* a **COCO dataset JSON** (``images`` + ``annotations`` with RLE or polygon masks), images named by the stem of
  their ``file_name``; annotations are painted in order (a later one wins an overlapped pixel), or by score when
  every annotation has one. Two images with one id or one name are an error;
* a **COCO results JSON** (a list of ``{"image_id", "segmentation", "score"}``, e.g. Detectron2's
  ``coco_instances_results.json``) -- only as a prediction, with a COCO dataset JSON as ground truth to map image ids
  to images. Overlapping detections are resolved like the evaluator does: a pixel goes to the highest score (ties:
  the detection listed first). Images without any detection have an empty prediction. Categories are ignored.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..structures import annotations_to_label_map
from ..utils.io import ImageReadError, atomic_write, read_json, read_label_map
from ..utils.io import check_output_dir as _check_output_dir
from .metrics import HIGHER_IS_BETTER, METRIC_KEYS, compute_metrics
from .report import (
    format_mean_se_table,
    format_summary_table,
    is_seen,
    read_records_csv,
    summarize,
    summarize_mean_se,
    write_mean_se_csv,
    write_records_csv,
    write_results_json,
)

__all__ = [
    "LabelMapSource",
    "check_coverage",
    "check_output_dir",
    "compare_predictions",
    "compare_records_csv",
    "format_comparison_table",
    "load_organ_map",
    "open_label_source",
    "run_evaluate",
    "score_sources",
    "write_comparison_csv",
]

logger = logging.getLogger(__name__)

LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
#: ``tools/predict.py`` names the label map of image ``<stem>`` ``<stem>_labels.<ext>`` (``OUTPUT_KINDS["labels"]``).
PREDICT_LABEL_TAG = "_labels"
#: ... and writes RGB overlays ``<stem>_overlay.png`` beside it, which are pictures, not label maps.
PREDICT_OVERLAY_TAG = "_overlay"


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
    files: dict[str, Path] = field(default_factory=dict)  # folder: image name -> label map file
    unmatched: list[str] | None = None  # folder matched to a reference: its label maps no reference image claims

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


def _is_label_file(f: Path) -> bool:
    """A candidate label map: a visible file with a label suffix that is not one of predict's RGB overlays."""
    if f.name.startswith(".") or f.suffix.lower() not in LABEL_SUFFIXES:
        return False
    if f.suffix.lower() == ".png" and f.stem.endswith(PREDICT_OVERLAY_TAG):
        return False
    return f.is_file()


def _duplicates_error(where: Path, groups: Mapping[str, Sequence[Path]]) -> ValueError:
    shown = "; ".join(f"{name!r}: {' and '.join(f.name for f in files)}" for name, files in groups.items())
    return ValueError(f"{where}: two label maps for image {shown}" if len(groups) == 1 else
                      f"{where}: several label maps for {len(groups)} images ({shown})")


def _folder_source(folder: Path) -> LabelMapSource:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(folder.iterdir()):
        if _is_label_file(f):
            by_stem[f.stem].append(f)
    if not by_stem:
        hint = ""
        if any(f.name.endswith((".geojson", "_nuclei.csv", ".done.json")) for f in folder.iterdir()):
            hint = "; tools/predict.py writes them with --outputs labels"
        raise ValueError(f"{folder}: no label maps ({', '.join(LABEL_SUFFIXES)}) in this folder{hint}")
    dups = {stem: fs for stem, fs in by_stem.items() if len(fs) > 1}
    if dups:
        raise _duplicates_error(folder, dups)
    files = {stem: fs[0] for stem, fs in by_stem.items()}
    return LabelMapSource(path=folder, kind="folder", names=list(files), loader=lambda n: read_label_map(files[n]),
                          files=files)


def _match_folder(source: LabelMapSource, names: Sequence[str]) -> LabelMapSource:
    """The folder's label maps renamed to the reference's image names.

    The prediction of image ``<stem>`` is ``<stem>.<ext>`` or ``<stem>_labels.<ext>`` (tools/predict.py); both at
    once are ambiguous, an error naming both files. Label maps matching no name are kept in ``unmatched``.
    """
    matched: dict[str, Path] = {}
    dups: dict[str, list[Path]] = {}
    for name in names:
        found = [source.files[s] for s in (name, name + PREDICT_LABEL_TAG) if s in source.files]
        if len(found) > 1:
            dups[name] = found
        elif found:
            matched[name] = found[0]
    if dups:
        raise _duplicates_error(source.path, dups)
    used = {f.name for f in matched.values()}
    unmatched = [f.name for f in source.files.values() if f.name not in used]
    return LabelMapSource(path=source.path, kind="folder", names=list(matched),
                          loader=lambda n: read_label_map(matched[n]), files=matched, unmatched=unmatched)


def _coco_source(path: Path, data: Mapping[str, Any]) -> LabelMapSource:
    images, annotations = data["images"], data["annotations"]
    if not isinstance(images, list) or not all(isinstance(img, Mapping) for img in images):
        raise ValueError(f"{path}: 'images' must be a list of objects")
    if not isinstance(annotations, list) or not all(isinstance(a, Mapping) for a in annotations):
        raise ValueError(f"{path}: 'annotations' must be a list of objects")
    for img in images:
        for key in ("id", "height", "width"):
            if key not in img:
                raise ValueError(f"{path}: image entry {img.get('file_name', img)} has no {key!r}")
        if not isinstance(img["id"], (int, str)) or isinstance(img["id"], bool):
            raise ValueError(f"{path}: image {img.get('file_name', '')!r} has id {img['id']!r}; ids are integers "
                             "or strings")
    # Two entries with one id would silently give one image the other's annotations and score the first against
    # nothing; two with one name would be indistinguishable in the results.
    id_counts = Counter(img["id"] for img in images)
    dup_ids = [i for i, c in id_counts.items() if c > 1]
    if dup_ids:
        shown = ", ".join(repr(i) for i in dup_ids[:10]) + (" ..." if len(dup_ids) > 10 else "")
        raise ValueError(f"{path}: duplicate image id(s) {shown} in 'images' ({sum(id_counts[i] for i in dup_ids)} "
                         "entries); every image needs its own id")
    ids_by_name: dict[str, list[Any]] = defaultdict(list)
    for img in images:
        name = Path(str(img["file_name"])).stem if img.get("file_name") else str(img["id"])
        ids_by_name[name].append(img["id"])
    dup_names = {n: ids for n, ids in ids_by_name.items() if len(ids) > 1}
    if dup_names:
        shown = "; ".join(f"{n!r}: ids {', '.join(repr(i) for i in ids)}" for n, ids in list(dup_names.items())[:5])
        raise ValueError(f"{path}: several images share a name (the stem of file_name; images are matched by it): "
                         f"{shown}")
    names: dict[Any, str] = {}
    sizes: dict[str, tuple[int, int]] = {}
    organs: dict[str, str] = {}
    for img in images:
        name = Path(str(img["file_name"])).stem if img.get("file_name") else str(img["id"])
        names[img["id"]] = name
        try:
            sizes[name] = (int(img["height"]), int(img["width"]))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: image {name!r} has a non-integer height or width") from None
        if img.get("organ"):
            organs[name] = str(img["organ"])
    annos: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for k, a in enumerate(annotations):
        image_id = a.get("image_id")
        if not isinstance(image_id, (int, str)) or image_id not in names:
            raise ValueError(f"{path}: annotation {k} refers to unknown image_id {image_id!r}")
        if "segmentation" not in a:
            raise ValueError(f"{path}: annotation {k} has no 'segmentation'; nucleus metrics need masks")
        if not a.get("iscrowd", 0):
            annos[names[image_id]].append(a)

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
        if not isinstance(r["image_id"], (int, str)) or r["image_id"] not in reference.image_ids:
            raise ValueError(f"{path}: entry {k} refers to image_id {r['image_id']!r}, which is not in "
                             f"{reference.path}")
        try:
            score = float(r.get("score", 1.0))
        except (TypeError, ValueError):
            raise ValueError(f"{path}: entry {k} has a non-numeric score {r.get('score')!r}") from None
        if score >= min_score:
            per_image[reference.image_ids[r["image_id"]]].append({**r, "score": score})

    def load(name: str) -> np.ndarray:
        try:
            return _paint(per_image.get(name, []), *reference.sizes[name], by_score=True)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}: image {name!r}: {e}") from e

    return LabelMapSource(path=path, kind="coco-results", names=list(reference.names), loader=load,
                          sizes=dict(reference.sizes), unmatched=[])


def open_label_source(path: str | Path, reference: LabelMapSource | None = None,
                      min_score: float = 0.0) -> LabelMapSource:
    """Open a folder of label maps, a COCO dataset JSON or a COCO results JSON (which needs ``reference``).

    Args:
        reference: the ground-truth source. A folder is matched to its image names (``<stem>.<ext>`` or
            predict's ``<stem>_labels.<ext>``); a COCO results file needs it to map image ids to images and sizes.
        min_score: drop detections of a COCO results file scoring below this.
    """
    path = Path(path)
    if path.is_dir():
        source = _folder_source(path)
        return _match_folder(source, reference.names) if reference is not None else source
    if not path.is_file():
        if any(p.is_file() for p in path.parents):
            raise FileNotFoundError(f"{path}: no such folder or file (a parent is a file)")
        raise FileNotFoundError(f"{path}: no such folder or file")
    if path.suffix.lower() in LABEL_SUFFIXES:
        raise ValueError(f"{path}: give the folder that holds the label maps, not one file")
    if path.suffix.lower() != ".json":
        raise ValueError(f"{path}: expected a folder of label maps or a COCO .json file")
    data = read_json(path)
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
    data = read_json(path, "organ map")
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a JSON object {{image name: organ}}")
    out = {}
    for name, v in data.items():
        organ = v.get("organ") if isinstance(v, Mapping) else v
        if organ is not None:
            out[Path(str(name)).stem] = str(organ)
    return out


def check_coverage(gt: LabelMapSource, pred: LabelMapSource, missing: str = "error") -> list[str]:
    """Check that ``pred`` covers ``gt`` before anything is scored; returns the names of ground-truth images without
    a prediction (only possible with ``missing="empty"``).

    A prediction set that matches none of the ground-truth images is an error whatever ``missing`` says: scoring it
    would only produce a table of zeros for a naming mistake.
    """
    if missing not in ("error", "empty"):
        raise ValueError(f"missing must be 'error' or 'empty', got {missing!r}")
    absent = [n for n in gt.names if n not in pred]
    if gt.names and len(absent) == len(gt.names):
        shown = ", ".join(gt.names[:3]) + (" ..." if len(gt.names) > 3 else "")
        theirs = pred.unmatched if pred.unmatched is not None else pred.names
        seen = f"; it has {', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}" if theirs else ""
        raise ValueError(f"{pred.path}: no prediction matched any of the {len(gt)} ground-truth images of {gt.path} "
                         f"({shown}){seen}; a folder's label maps must be named <image>.<ext> or <image>_labels.<ext>")
    if absent and missing == "error":
        shown = ", ".join(absent[:10]) + (" ..." if len(absent) > 10 else "")
        raise ValueError(f"{pred.path}: no prediction for {len(absent)} of {len(gt)} ground-truth images ({shown}); "
                         "use --missing empty to score them as empty predictions")
    return absent


def score_sources(gt: LabelMapSource, pred: LabelMapSource, *, iou_threshold: float = 0.5, hausdorff: bool = True,
                  missing: str = "error", organs: Mapping[str, str] | None = None,
                  train_organs: Sequence[str] | None = None, progress: bool = True) -> list[dict[str, Any]]:
    """Score every ground-truth image against its prediction; returns one record per image (ground-truth order).

    Args:
        missing: what to do with ground-truth images that have no prediction: "error" (default) or "empty"
            (score an empty prediction). No prediction at all for any image is an error either way
            (:func:`check_coverage`). Predictions without ground truth are ignored with a warning.
        organs: ``{image name: organ}``; defaults to the organs a COCO ground truth lists.
        train_organs: organs seen in training (for the seen/unseen split).
    """
    check_coverage(gt, pred, missing)
    extra = pred.unmatched if pred.unmatched is not None else [n for n in pred.names if n not in gt]
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
            where = pred.files.get(name, pred.path)
            raise ValueError(f"image {name!r}: ground truth ({gt.files.get(name, gt.path)}) is {g.shape[0]}x"
                             f"{g.shape[1]} but the prediction ({where}) is {p.shape[0]}x{p.shape[1]}")
        organ = organs.get(name)
        records.append({"image": name, "organ": organ, "organ_seen": is_seen(organ, None, train_organs),
                        **compute_metrics(g, p, iou_threshold, hausdorff=hausdorff)})
    return records


#: ``better`` when the paired test is not significant at ``alpha`` (or every difference is zero).
NOT_SIGNIFICANT = "n.s."


def compare_predictions(records_a: Sequence[Mapping[str, Any]], records_b: Sequence[Mapping[str, Any]],
                        keys: Sequence[str] = METRIC_KEYS, *, alpha: float = 0.05,
                        names: tuple[str, str] = ("A", "B")) -> list[dict[str, Any]]:
    """Paired comparison of two prediction sets on the same images: a two-sided Wilcoxon signed-rank test per metric.

    Returns one row per metric: ``n`` (image pairs; NaN values dropped), ``mean_a``, ``mean_b``, ``mean_diff`` (B -
    A), ``se_diff`` (its standard error over images: sample standard deviation of the differences / sqrt(n); NaN
    below two pairs), ``median_diff``, ``statistic`` and ``p_value`` of ``scipy.stats.wilcoxon`` (zero differences
    dropped, its default), ``alpha`` and ``better``: the name (from ``names``) of the set with the better mean (knowing
    whether the metric is higher- or lower-better) only when ``p_value < alpha``; ``"n.s."`` when the difference is
    not significant; ``""`` when there is nothing to test (no pairs). When every difference is zero the test is
    undefined: ``p_value`` is 1.0 and ``statistic`` NaN.
    """
    from scipy.stats import wilcoxon

    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    a_by = {r["image"]: r for r in records_a}
    b_by = {r["image"]: r for r in records_b}
    if set(a_by) != set(b_by):
        only_a, only_b = sorted(set(a_by) - set(b_by)), sorted(set(b_by) - set(a_by))
        raise ValueError(f"the two prediction sets cover different images (only in {names[0]}: {only_a[:5]}, only in "
                         f"{names[1]}: {only_b[:5]}); a paired test needs the same images")
    image_names = [r["image"] for r in records_a]
    rows = []
    for k in keys:
        a = np.array([float(a_by[n][k]) for n in image_names])
        b = np.array([float(b_by[n][k]) for n in image_names])
        ok = ~(np.isnan(a) | np.isnan(b))
        a, b = a[ok], b[ok]
        d = b - a
        row: dict[str, Any] = {"metric": k, "n": int(a.size),
                               "mean_a": float(a.mean()) if a.size else math.nan,
                               "mean_b": float(b.mean()) if b.size else math.nan,
                               "mean_diff": float(d.mean()) if d.size else math.nan,
                               "se_diff": float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan,
                               "median_diff": float(np.median(d)) if d.size else math.nan}
        if a.size == 0:
            row.update(statistic=math.nan, p_value=math.nan)
        elif np.all(d == 0):
            row.update(statistic=math.nan, p_value=1.0)
        else:
            res = wilcoxon(a, b)
            row.update(statistic=float(res.statistic), p_value=float(res.pvalue))
        row["alpha"] = alpha
        if math.isnan(row["p_value"]):
            row["better"] = ""
        elif row["p_value"] < alpha and row["mean_diff"] != 0:
            b_higher = row["mean_diff"] > 0
            row["better"] = names[1] if b_higher == HIGHER_IS_BETTER[k] else names[0]
        else:
            row["better"] = NOT_SIGNIFICANT
        rows.append(row)
    return rows


COMPARISON_COLUMNS = ("metric", "n", "mean_a", "mean_b", "mean_diff", "se_diff", "median_diff", "statistic", "p_value",
                      "alpha", "better")


def _comparison_headers(name_a: str, name_b: str) -> list[str]:
    """CSV column names: the sets' names where the rows say a/b."""
    return ["metric", "n", f"mean_{name_a}", f"mean_{name_b}", f"mean_diff_{name_b}_minus_{name_a}",
            f"se_diff_{name_b}_minus_{name_a}", f"median_diff_{name_b}_minus_{name_a}", "statistic", "p_value", "alpha",
            "better"]


def format_comparison_table(rows: Sequence[Mapping[str, Any]], name_a: str = "A", name_b: str = "B") -> str:
    """Text table of :func:`compare_predictions` rows (made with the same names)."""
    from tabulate import tabulate

    def f(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else (f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}")
        return str(v)

    alpha = rows[0]["alpha"] if rows else 0.05
    headers = ["metric", "n", f"mean {name_a}", f"mean {name_b}", f"mean diff ({name_b} - {name_a})",
               "SE of mean diff", "median diff", "W", "p", f"better (p < {alpha:g})"]
    columns = [c for c in COMPARISON_COLUMNS if c != "alpha"]
    body = [[f(r[c]) for c in columns] for r in rows]
    return tabulate(body, headers=headers, tablefmt="pipe", disable_numparse=True)


#: Metrics of ``--compare`` / ``--summary`` unless ``--metrics`` says otherwise (the README's table columns).
CSV_DEFAULT_METRICS: tuple[str, ...] = ("AJI", "PQ", "Dice1", "F1")


def compare_records_csv(path_a: str | Path, path_b: str | Path, keys: Sequence[str] = CSV_DEFAULT_METRICS, *,
                        alpha: float = 0.05, names: tuple[str, str] = ("A", "B")) -> list[dict[str, Any]]:
    """:func:`compare_predictions` of two evaluations already done, from their per-image CSVs (matched by name).

    Both files are read whole and checked first (:func:`~nuclei_d2.evaluation.report.read_records_csv`); an image
    in one file but not the other is an error naming the file that lacks it.
    """
    path_a, path_b = Path(path_a), Path(path_b)
    rec_a, rec_b = read_records_csv(path_a, keys), read_records_csv(path_b, keys)
    for lacking, other, theirs, ours in ((path_b, path_a, rec_a, rec_b), (path_a, path_b, rec_b, rec_a)):
        have = {r["image"] for r in ours}
        absent = [r["image"] for r in theirs if r["image"] not in have]
        if absent:
            shown = ", ".join(absent[:5]) + (" ..." if len(absent) > 5 else "")
            raise ValueError(f"{lacking}: no row for {len(absent)} of the {len(theirs)} images of {other} ({shown}); "
                             "a paired comparison needs the same images in both files")
    return compare_predictions(rec_a, rec_b, keys, alpha=alpha, names=names)


def write_comparison_csv(path: str | Path, rows: Sequence[Mapping[str, Any]], name_a: str = "A",
                         name_b: str = "B") -> Path:
    """``comparison.csv`` (written atomically), its columns named after the two sets."""
    import csv

    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(_comparison_headers(name_a, name_b))
            for r in rows:
                w.writerow([r[c] for c in COMPARISON_COLUMNS])

    return atomic_write(path, _write)


# --------------------------------------------------------------------------------------------------------------------
# tools/evaluate.py (its parser lives in the tool file, so --help never imports torch)
# --------------------------------------------------------------------------------------------------------------------


def check_output_dir(path: str | Path, file_names: Sequence[str] = ()) -> Path:
    """Check, without creating anything, that ``path`` is or can become a folder where ``file_names`` can be written.

    Run before any scoring, so a bad ``--output-dir`` costs seconds, not a whole evaluation.
    """
    path = _check_output_dir(path, "--output-dir", ValueError)
    for name in file_names:
        if (path / name).is_dir():
            raise ValueError(f"{path / name}: is a folder; cannot write the results file {name} there")
    return path


def _one_line(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        msg = str(e.args[0])
    elif isinstance(e, OSError) and e.filename is not None and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())


def run_evaluate(args: argparse.Namespace) -> int:
    """``tools/evaluate.py`` after parsing: returns the exit status (2 on bad input, one line on stderr).

    Order: the output folder is checked, then every input is opened and checked (ground truth, both prediction
    sets, the organ file), then everything is scored, and only then are tables printed and files written, so a bad
    input anywhere leaves no output behind. ``--compare A.csv B.csv`` and ``--summary CSV`` read per-image CSVs
    instead of scoring label maps, in the same order (output folder, whole inputs, then output).
    """
    try:
        if getattr(args, "compare", None):
            return _run_compare(args)
        if getattr(args, "summary", None):
            return _run_summary(args)
        return _run(args)
    except (ValueError, KeyError, OSError, ImageReadError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.iou_threshold < 1.0:
        raise ValueError(f"--iou-threshold must be in [0, 1), got {args.iou_threshold}")
    alpha = getattr(args, "alpha", 0.05)
    name_a, name_b = args.names or ("A", "B")
    keys = _metric_keys(getattr(args, "metrics", None), METRIC_KEYS)
    sets = [("", name_a, args.pred)] + ([("_b", name_b, args.pred_b)] if args.pred_b else [])
    out_dir = None
    if args.output_dir:
        files = [f"{stem}{suffix}.{ext}" for suffix, _, _ in sets for stem, ext in (("per_image", "csv"),
                                                                                   ("results", "json"))]
        out_dir = check_output_dir(args.output_dir, files + (["comparison.csv"] if args.pred_b else []))

    # 1. open and check every input
    gt = open_label_source(args.gt)
    preds = [open_label_source(src, reference=gt, min_score=args.min_score) for _, _, src in sets]
    for pred in preds:
        check_coverage(gt, pred, args.missing)
    organs = load_organ_map(args.organs) if args.organs else None
    train_organs = [o.strip() for o in args.train_organs.split(",") if o.strip()] if args.train_organs else None

    # 2. score everything
    all_records = [score_sources(gt, pred, iou_threshold=args.iou_threshold, hausdorff=not args.no_hausdorff,
                                 missing=args.missing, organs=organs, train_organs=train_organs,
                                 progress=not args.quiet) for pred in preds]
    rows = (compare_predictions(all_records[0], all_records[1], keys, alpha=alpha, names=(name_a, name_b))
            if args.pred_b else None)

    # 3. report
    settings = {"gt": str(gt.path), "iou_threshold": args.iou_threshold, "pq_iou_threshold": 0.5,
                "hausdorff": not args.no_hausdorff, "min_score": args.min_score, "missing": args.missing,
                "train_organs": train_organs}
    summaries = [summarize(records) for records in all_records]
    for (_, name, _), pred, records, summary in zip(sets, preds, all_records, summaries):
        print(f"\n{name}: {pred.path} ({len(records)} images; F1/precision/recall at IoU > {args.iou_threshold:g}, "
              "PQ at IoU > 0.5)")
        print(format_summary_table(summary))
    if rows is not None:
        print(f"\n{name_b} vs {name_a}: paired two-sided Wilcoxon signed-rank test per metric "
              f"({len(all_records[0])} images); 'better' names a set only where p < {alpha:g}, n.s. otherwise")
        print(format_comparison_table(rows, name_a, name_b))
    if out_dir:
        for (suffix, name, _), pred, records, summary in zip(sets, preds, all_records, summaries):
            write_records_csv(out_dir / f"per_image{suffix}.csv", records)
            write_results_json(out_dir / f"results{suffix}.json", records, summary,
                               {**settings, "pred": str(pred.path), "name": name, "alpha": alpha})
        if rows is not None:
            write_comparison_csv(out_dir / "comparison.csv", rows, name_a, name_b)
        print(f"\nresults written to {out_dir}")
    return 0


def _metric_keys(requested: Sequence[str] | None, default: Sequence[str]) -> tuple[str, ...]:
    """``--metrics``, checked against the known metrics (the parser cannot import them without numpy)."""
    if not requested:
        return tuple(default)
    unknown = [m for m in requested if m not in METRIC_KEYS]
    if unknown:
        raise ValueError(f"--metrics: unknown metric {', '.join(repr(m) for m in unknown)} (known: "
                         f"{', '.join(METRIC_KEYS)})")
    return tuple(dict.fromkeys(requested))


def _alpha(args: argparse.Namespace) -> float:
    alpha = getattr(args, "alpha", 0.05)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"--alpha must be in (0, 1), got {alpha}")
    return alpha


def _run_compare(args: argparse.Namespace) -> int:
    """``--compare A.csv B.csv``: the ``--pred-b`` table from two per-image CSVs already written."""
    alpha = _alpha(args)
    keys = _metric_keys(getattr(args, "metrics", None), CSV_DEFAULT_METRICS)
    name_a, name_b = args.names or ("A", "B")
    path_a, path_b = (Path(p) for p in args.compare)
    out_dir = check_output_dir(args.output_dir, ["comparison.csv"]) if args.output_dir else None
    rows = compare_records_csv(path_a, path_b, keys, alpha=alpha, names=(name_a, name_b))
    n = max((r["n"] for r in rows), default=0)
    print(f"{name_a}: {path_a}\n{name_b}: {path_b}")
    print(f"\n{name_b} vs {name_a}: paired two-sided Wilcoxon signed-rank test per metric ({n} images matched by "
          f"name); SE = standard error of the mean difference over images; 'better' names a set only where "
          f"p < {alpha:g}, n.s. otherwise")
    print(format_comparison_table(rows, name_a, name_b))
    if out_dir:
        write_comparison_csv(out_dir / "comparison.csv", rows, name_a, name_b)
        print(f"\nresults written to {out_dir / 'comparison.csv'}")
    return 0


def _run_summary(args: argparse.Namespace) -> int:
    """``--summary CSV``: mean +- standard error over images per metric, overall and per organ group."""
    keys = _metric_keys(getattr(args, "metrics", None), CSV_DEFAULT_METRICS)
    path = Path(args.summary)
    out_dir = check_output_dir(args.output_dir, ["summary.csv"]) if args.output_dir else None
    records = read_records_csv(path, keys)
    rows = summarize_mean_se(records, keys)
    print(f"{path} ({len(records)} images): mean ± standard error over images (sample SD / sqrt(n))")
    print(format_mean_se_table(rows, keys))
    if out_dir:
        write_mean_se_csv(out_dir / "summary.csv", rows, keys)
        print(f"\nresults written to {out_dir / 'summary.csv'}")
    return 0

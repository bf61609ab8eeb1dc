"""Per-image records -> dataset summaries (all images, per organ, seen vs unseen organs), tables and files.

Shared by :class:`~nuclei_d2.evaluation.NucleiEvaluator` and ``tools/evaluate.py`` so both report the same way.

A *record* is one image's result: ``{"image": name, "organ": str | None, "organ_seen": bool | None, **metrics}``
where the metrics are those of :func:`~nuclei_d2.evaluation.metrics.compute_metrics` (``METRIC_KEYS`` and
``COUNT_KEYS``).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write, write_json_atomic
from .metrics import COUNT_KEYS, METRIC_KEYS, aggregate_metrics

__all__ = [
    "HEADLINE_KEYS",
    "RECORD_INFO_KEYS",
    "flat_results",
    "format_mean_se_table",
    "format_summary_table",
    "is_seen",
    "mean_se",
    "read_records_csv",
    "summarize",
    "summarize_mean_se",
    "write_mean_se_csv",
    "write_records_csv",
    "write_results_json",
]

#: Identification columns of a record, before the metrics.
RECORD_INFO_KEYS: tuple[str, ...] = ("image", "organ", "organ_seen")

#: Metrics repeated per organ in :func:`flat_results` (all metrics are in the JSON file).
HEADLINE_KEYS: tuple[str, ...] = ("AJI", "AJI+", "PQ", "F1", "Dice1", "Dice2")


def is_seen(organ: str | None, organ_seen: Any = None, train_organs: Sequence[str] | None = None) -> bool | None:
    """Whether an image's organ was seen in training.

    An explicit per-image ``organ_seen`` (bool) wins; otherwise the organ is looked up (case-insensitively) in
    ``train_organs`` (the dataset metadata's list of training organs); without either the answer is unknown (None).
    """
    if organ_seen is not None:
        return bool(organ_seen)
    if organ is None or train_organs is None:
        return None
    return str(organ).strip().lower() in {str(o).strip().lower() for o in train_organs}


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate per-image records: ``{"all": ..., "organs": {organ: ...}, "seen": ..., "unseen": ...}``.

    Each value is :func:`~nuclei_d2.evaluation.metrics.aggregate_metrics` of the group (mean over images and pooled
    counts). ``organs`` is empty without organ information; ``seen``/``unseen`` are present only when some image's
    seen/unseen status is known.
    """
    out: dict[str, Any] = {"all": aggregate_metrics(records), "organs": {}}
    organs = sorted({str(r["organ"]) for r in records if r.get("organ") not in (None, "")})
    for organ in organs:
        out["organs"][organ] = aggregate_metrics([r for r in records if str(r.get("organ")) == organ])
    seen = [r for r in records if r.get("organ_seen") is True]
    unseen = [r for r in records if r.get("organ_seen") is False]
    if seen:
        out["seen"] = aggregate_metrics(seen)
    if unseen:
        out["unseen"] = aggregate_metrics(unseen)
    return out


def flat_results(summary: Mapping[str, Any]) -> dict[str, float]:
    """The flat ``{name: float}`` Detectron2 expects under the task key (``print_csv_format``, ``EventStorage``).

    ``<metric>``: mean over images (as the papers report); ``<metric>-pooled``: computed from counts summed over the
    dataset; ``<metric>-seen`` / ``<metric>-unseen``: means over images of organs seen / not seen in training;
    ``<metric>-<organ>``: means per organ for ``HEADLINE_KEYS``; ``n_images`` (and ``n_images-<group>``). Names with
    a dash are kept out of Detectron2's short "copypaste" line but stay in the dict and in TensorBoard.
    """
    res: dict[str, float] = {}
    allg = summary["all"]
    for k in METRIC_KEYS:
        res[k] = float(allg["mean"][k])
    res["n_images"] = float(allg["n_images"])
    for k in METRIC_KEYS:
        res[f"{k}-pooled"] = float(allg["pooled"][k])
    for group in ("seen", "unseen"):
        if group in summary:
            for k in METRIC_KEYS:
                res[f"{k}-{group}"] = float(summary[group]["mean"][k])
            res[f"n_images-{group}"] = float(summary[group]["n_images"])
    for organ, agg in summary.get("organs", {}).items():
        name = organ if organ not in ("pooled", "seen", "unseen") else f"organ_{organ}"
        for k in HEADLINE_KEYS:
            res[f"{k}-{name}"] = float(agg["mean"][k])
        res[f"n_images-{name}"] = float(agg["n_images"])
    return res


def _fmt(v: float) -> str:
    return "nan" if isinstance(v, float) and math.isnan(v) else f"{v:.4f}"


def format_summary_table(summary: Mapping[str, Any], keys: Sequence[str] = METRIC_KEYS) -> str:
    """A text table: one row per group (all images mean / pooled, seen, unseen, each organ), one column per metric."""
    from tabulate import tabulate

    rows = []

    def add(name: str, agg: Mapping[str, Any], which: str = "mean") -> None:
        rows.append([name, agg["n_images"], *[_fmt(agg[which][k]) for k in keys]])

    allg = summary["all"]
    add("all (mean over images)", allg)
    add("all (pooled)", allg, "pooled")
    for group in ("seen", "unseen"):
        if group in summary:
            add(f"{group} organs", summary[group])
    for organ, agg in summary.get("organs", {}).items():
        add(f"organ: {organ}", agg)
    headers = ["group", "images", *[k.replace("Hausdorff_obj", "HD_obj") for k in keys]]
    return tabulate(rows, headers=headers, tablefmt="pipe", disable_numparse=True)


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return v


def write_records_csv(path: str | os.PathLike, records: Iterable[Mapping[str, Any]],
                      extra_keys: Sequence[str] = ()) -> Path:
    """Per-image CSV (written atomically): image, organ, organ_seen, every metric, every count, then ``extra_keys``."""
    columns = [*RECORD_INFO_KEYS, *METRIC_KEYS, *COUNT_KEYS, *extra_keys]
    records = list(records)

    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(columns)
            for r in records:
                w.writerow([_csv_value(r.get(c)) for c in columns])

    return atomic_write(path, _write)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else str(obj)
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item"):  # numpy scalar
        return _json_safe(obj.item())
    return obj


def write_results_json(path: str | os.PathLike, records: Sequence[Mapping[str, Any]], summary: Mapping[str, Any],
                       settings: Mapping[str, Any] | None = None) -> Path:
    """``{"settings": ..., "summary": ..., "per_image": [...]}`` written atomically (NaN becomes null)."""
    payload = {"settings": dict(settings or {}), "metric_keys": list(METRIC_KEYS), "summary": summary,
               "per_image": list(records)}
    return write_json_atomic(path, _json_safe(payload), indent=1)


# --------------------------------------------------------------------------------------------------------------------
# Reading per-image CSVs back, and tile-to-tile noise (issue 24: "is the difference real?")
# --------------------------------------------------------------------------------------------------------------------

_SEEN_WORDS = {"true": True, "1": True, "yes": True, "seen": True,
               "false": False, "0": False, "no": False, "unseen": False, "": None}


def read_records_csv(path: str | os.PathLike, metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Per-image records ``{"image", "organ", "organ_seen", *metrics}`` from a per-image CSV, in file order.

    Reads what :func:`write_records_csv` writes: NucleiEvaluator's ``nuclei_per_image.csv`` (``OUTPUT_DIR/inference/
    <dataset>/``), ``tools/evaluate.py``'s ``per_image.csv``, ``benchmarks/ensemble.py``'s ``per_image/<row>.csv``;
    or any hand-made CSV with an ``image`` column and the ``metrics`` columns (``organ`` and ``organ_seen`` are
    optional). Plain text through the csv module: no code runs. ``nan`` or an empty cell is a missing value (NaN).

    Raises:
        ValueError naming the file (and the line): no ``image`` column, a metric column absent, a duplicate or empty
        image name, a value that is not a number, no rows, or a file that is not UTF-8 text / not CSV.
    """
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames
            if not header:
                raise ValueError(f"{path}: empty file; expected a per-image CSV with a header line")
            header = [h.strip() for h in header]
            reader.fieldnames = header
            if "image" not in header:
                raise ValueError(f"{path}: no 'image' column (columns: {', '.join(header[:8])}"
                                 f"{' ...' if len(header) > 8 else ''}); expected a per-image CSV such as "
                                 "nuclei_per_image.csv")
            absent = [m for m in metrics if m not in header]
            if absent:
                raise ValueError(f"{path}: no column {', '.join(repr(m) for m in absent)} (it has "
                                 f"{', '.join(h for h in header if h not in RECORD_INFO_KEYS)[:200]})")
            records: list[dict[str, Any]] = []
            lines: dict[str, int] = {}
            for row in reader:
                line = reader.line_num
                name = (row.get("image") or "").strip()
                if not name:
                    raise ValueError(f"{path}: line {line}: empty image name")
                if name in lines:
                    raise ValueError(f"{path}: image {name!r} is listed twice (lines {lines[name]} and {line}); "
                                     "a paired comparison needs one row per image")
                lines[name] = line
                seen = (row.get("organ_seen") or "").strip().lower()
                if seen not in _SEEN_WORDS:
                    raise ValueError(f"{path}: line {line}: organ_seen is {row['organ_seen']!r}; expected True, "
                                     "False or empty")
                rec: dict[str, Any] = {"image": name, "organ": (row.get("organ") or "").strip() or None,
                                       "organ_seen": _SEEN_WORDS[seen]}
                for m in metrics:
                    cell = row.get(m)
                    if cell is None:
                        raise ValueError(f"{path}: line {line}: the row ends before column {m!r}")
                    try:
                        rec[m] = float(cell) if cell.strip() else math.nan
                    except ValueError:
                        raise ValueError(f"{path}: line {line}: {m} is {cell!r}, not a number") from None
                records.append(rec)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); expected a per-image CSV") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV ({e})") from None
    if not records:
        raise ValueError(f"{path}: no image rows under the header")
    return records


def mean_se(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, standard error of the mean, n) of the non-NaN values: SE = sample standard deviation / sqrt(n).

    The SE is NaN for fewer than two values, the mean NaN for none.
    """
    vals = [float(v) for v in values if not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan, 0
    mean = math.fsum(vals) / n
    if n < 2:
        return mean, math.nan, n
    var = math.fsum((v - mean) ** 2 for v in vals) / (n - 1)
    return mean, math.sqrt(var / n), n


def summarize_mean_se(records: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and standard error over images per group: ``[{"group", "n_images", "mean": {k}, "se": {k}}, ...]``.

    Groups as in :func:`format_summary_table`: ``all``, ``seen organs`` / ``unseen organs`` (when some image's
    status is known), ``organ: <name>`` (sorted) when records have organs.
    """
    groups: list[tuple[str, list[Mapping[str, Any]]]] = [("all", list(records))]
    for label, flag in (("seen organs", True), ("unseen organs", False)):
        members = [r for r in records if r.get("organ_seen") is flag]
        if members:
            groups.append((label, members))
    for organ in sorted({str(r["organ"]) for r in records if r.get("organ") not in (None, "")}):
        groups.append((f"organ: {organ}", [r for r in records if str(r.get("organ")) == organ]))
    out = []
    for label, members in groups:
        stats = {k: mean_se(r[k] for r in members) for k in keys}
        out.append({"group": label, "n_images": len(members), "mean": {k: v[0] for k, v in stats.items()},
                    "se": {k: v[1] for k, v in stats.items()}})
    return out


def format_mean_se_table(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    """Text table of :func:`summarize_mean_se`: one row per group, ``mean ± SE`` per metric."""
    from tabulate import tabulate

    body = [[r["group"], r["n_images"], *[f"{_fmt(r['mean'][k])} ± {_fmt(r['se'][k])}" for k in keys]] for r in rows]
    return tabulate(body, headers=["group", "images", *keys], tablefmt="pipe", disable_numparse=True)


def write_mean_se_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> Path:
    """``summary.csv`` (written atomically): group, n_images, then ``<metric>`` and ``<metric>_se`` per metric."""

    def _write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["group", "n_images", *[c for k in keys for c in (k, f"{k}_se")]])
            for r in rows:
                w.writerow([r["group"], r["n_images"],
                            *[_csv_value(v) for k in keys for v in (r["mean"][k], r["se"][k])]])

    return atomic_write(path, _write)

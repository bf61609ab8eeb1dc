#!/usr/bin/env python
"""Robustness: score a model on a dataset under test-time appearance shifts (stain strength, scanner colour, blur,
JPEG, lower magnification), one table row per shift.

    python benchmarks/robustness.py --config-file configs/classical_watershed.yaml --output-dir runs/robust/floor
    python benchmarks/robustness.py --config-file runs/nb_unet/config.yaml --weights runs/nb_unet/model_final.pth \\
        --output-dir runs/robust/nb_unet
    python benchmarks/robustness.py --config-file CFG --weights W --shifts blur:2 jpeg:30 scanner:aperio-like \\
        --stain-norm macenko --stain-reference ref.png --output-dir runs/robust/nb_unet_macenko --save-examples
    python benchmarks/robustness.py ... TEST.AUG.ENABLED True       # KEY VALUE overrides go to the config

Each shift (``nuclei_d2/data/shifts.py``, docs/robustness.md) is applied to every test image by the inference
mapper (``INPUT.TEST_SHIFT``) before stain normalisation and before the extra input channels are computed, and the
model is scored by the trainer's own evaluation (``NucleiTrainer.test``: TEST.AUG / TEST.ENSEMBLE as the config says,
AJI / PQ / Dice1 / F1 and the same-organ / new-organ means). The row "none" comes first; rows losing more than 0.03
AJI against it are marked. Writes ``robustness.csv`` and ``robustness.json`` into ``--output-dir`` (rewritten after
every shift; ``"complete": true`` once all are done), each shift's evaluation under ``eval/<shift>/``, and with
``--save-examples`` ``robustness_examples.png`` (the centre of the first tile under every shift).
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

#: AJI a shift may cost before its row is marked (issue 24's goal).
MAX_AJI_LOSS = 0.03
KEYS = ("AJI", "PQ", "Dice1", "F1")
COLUMNS = ["shift", "AJI", "dAJI", "PQ", "Dice1", "F1", "AJI-seen", "AJI-unseen", "PQ-seen", "PQ-unseen",
           "s_per_tile", "loses_more_than_0.03"]


def build_parser() -> argparse.ArgumentParser:
    """The command line, standard library only (``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(prog="benchmarks/robustness.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config-file", required=True, help="the model's config (e.g. a run's config.yaml)")
    p.add_argument("--weights", default="", help="MODEL.WEIGHTS (none for the classical floor)")
    p.add_argument("--dataset", default="kumar_test", help="registered dataset to score on")
    p.add_argument("--shifts", nargs="+", metavar="KIND:STRENGTH",
                   help="shifts to measure, e.g. blur:2 jpeg:30 hematoxylin:0.6 scanner:aperio-like lowmag:2 "
                        "noise:8 (default: the strong set of docs/robustness.md, nuclei_d2.data.shifts."
                        "STRONG_SHIFTS); 'none' is always measured first")
    p.add_argument("--stain-norm", choices=("none", "macenko", "vahadane"), default=None,
                   help="stain normalisation at inference (INPUT.NUCLEI.STAIN_NORM; default: the config's)")
    p.add_argument("--stain-reference", default=None,
                   help="reference image or normaliser JSON for --stain-norm (INPUT.NUCLEI.STAIN_REFERENCE)")
    p.add_argument("--output-dir", required=True, help="where robustness.csv / .json and eval/<shift>/ go")
    p.add_argument("--save-examples", action="store_true",
                   help="also write robustness_examples.png: the centre of the first tile under every shift")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    late = [o for o in args.opts[::2] if o.startswith("--")]
    if late:
        p.error(f"option {late[0]} after the config overrides: give the KEY VALUE overrides last")
    if len(args.opts) % 2:
        p.error(f"config overrides come in KEY VALUE pairs, got {len(args.opts)} words: {' '.join(args.opts)}")
    if "INPUT.TEST_SHIFT" in args.opts[::2]:
        p.error("INPUT.TEST_SHIFT is set per shift by this benchmark: list shifts with --shifts")
    if args.stain_norm not in (None, "none") and not args.stain_reference:
        p.error(f"--stain-norm {args.stain_norm} needs --stain-reference (a reference image or normaliser JSON)")
    return args


def _slug(shift: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in shift)


def _row(shift: str, metrics: dict, seconds_per_tile: float, reference_aji: float | None) -> dict:
    get = lambda k: float(metrics.get(k, float("nan")))  # noqa: E731
    d = get("AJI") - reference_aji if reference_aji is not None else 0.0
    return {"shift": shift, **{k: get(k) for k in KEYS}, "dAJI": d,
            **{k: get(k) for k in ("AJI-seen", "AJI-unseen", "PQ-seen", "PQ-unseen")},
            "s_per_tile": round(seconds_per_tile, 2), "loses_more_than_0.03": bool(d < -MAX_AJI_LOSS)}


def format_table(rows: list[dict]) -> str:
    """The one table: shift | AJI | dAJI vs none | PQ | Dice1 | F1 | AJI same | AJI new | s/tile | mark."""
    from tabulate import tabulate

    body = [[r["shift"], r["AJI"], f"{r['dAJI']:+.3f}", r["PQ"], r["Dice1"], r["F1"], r["AJI-seen"], r["AJI-unseen"],
             f"{r['s_per_tile']:.2f}", f"LOSES > {MAX_AJI_LOSS:g}" if r["loses_more_than_0.03"] else ""]
            for r in rows]
    return tabulate(body, headers=["shift", "AJI", "dAJI vs none", "PQ", "Dice1", "F1", "AJI same organ",
                                   "AJI new organ", "s/tile", ""], floatfmt=".3f", disable_numparse=[2, 8])


def _write_results(out: Path, rows: list[dict], info: dict, metrics: dict, complete: bool) -> None:
    from nuclei_d2.utils.io import atomic_write, write_json_atomic

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    atomic_write(out / "robustness.csv", lambda tmp: tmp.write_text(text))
    write_json_atomic(out / "robustness.json", {**info, "complete": complete, "rows": rows, "metrics": metrics},
                      indent=2)


def save_examples(path: Path, image, shifts: list, normalizer=None, size: int = 128) -> Path:
    """A PNG strip: the centre ``size`` x ``size`` of ``image`` under every shift (a second row stain-normalised
    when ``normalizer`` is given), each panel labelled."""
    import cv2
    import numpy as np

    from nuclei_d2.data.augment import StainNormalization
    from nuclei_d2.utils.io import atomic_write

    h, w = image.shape[:2]
    s = min(size, h, w)
    crop_at = (slice((h - s) // 2, (h - s) // 2 + s), slice((w - s) // 2, (w - s) // 2 + s))
    band = 30  # two lines of text: the kind (and '+ norm'), then the strength
    rows = []
    for with_norm in ([False, True] if normalizer is not None else [False]):
        panels = []
        for shift in shifts:
            shifted = shift(image)  # shifted whole, then cropped: blur/JPEG/lowmag see the tile as in the benchmark
            if with_norm:
                shifted = StainNormalization(normalizer).get_transform(shifted).apply_image(shifted)
            panel = np.full((s + band, s, 3), 255, dtype=np.uint8)
            panel[band:] = shifted[crop_at]
            kind, _, strength = shift.name.partition(":")
            for line, text in enumerate((kind + (" + norm" if with_norm else ""), strength)):
                cv2.putText(panel, text.strip(), (3, 12 + 13 * line), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1,
                            cv2.LINE_AA)
            panels.append(np.pad(panel, ((0, 2), (0, 2), (0, 0)), constant_values=255))
        rows.append(np.concatenate(panels, axis=1))
    strip = np.concatenate(rows, axis=0)

    def write(tmp: Path) -> None:
        if not cv2.imwrite(str(tmp), cv2.cvtColor(strip, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{path}: could not write the PNG")

    return atomic_write(path, write)


def run(args: argparse.Namespace) -> int:
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.utils.logger import setup_logger

    import nuclei_d2  # noqa: F401  (registers datasets and models)
    from nuclei_d2.checkpoint import NucleiCheckpointer
    from nuclei_d2.data.augment import build_stain_normalizer
    from nuclei_d2.data.datasets import DatasetLoadError
    from nuclei_d2.data.shifts import STRONG_SHIFTS, parse_shift
    from nuclei_d2.engine import ConfigError, NucleiTrainer, setup_cfg
    from nuclei_d2.engine.defaults import UNTRAINABLE_ARCHITECTURES
    from nuclei_d2.utils.io import check_output_dir, read_image_rgb

    opts = ["DATASETS.TEST", f"('{args.dataset}',)"]
    if args.weights:
        opts += ["MODEL.WEIGHTS", args.weights]
    if args.stain_norm is not None:
        opts += ["INPUT.NUCLEI.STAIN_NORM", args.stain_norm]
    if args.stain_reference is not None:
        opts += ["INPUT.NUCLEI.STAIN_REFERENCE", args.stain_reference]
    try:
        out = check_output_dir(args.output_dir)
        names = list(dict.fromkeys(["none", *(args.shifts or STRONG_SHIFTS)]))
        shifts = [parse_shift(s) for s in names]
        shifts = list({s.name: s for s in shifts}.values())  # "none" and "" are one row
        cfg = setup_cfg(args.config_file, [*opts, "OUTPUT_DIR", str(out / "eval"), *args.opts], eval_only=True,
                        check_data=True)
        normalizer = build_stain_normalizer(cfg)  # a bad reference is one line now, not after the first shift
        dicts = DatasetCatalog.get(args.dataset)
    except (ConfigError, DatasetLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not dicts:
        print(f"error: dataset {args.dataset!r} has no images", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    setup_logger(str(out / "log.txt"), name="nuclei_d2")
    log = logging.getLogger("nuclei_d2.robustness")
    if not cfg.MODEL.WEIGHTS and cfg.MODEL.META_ARCHITECTURE not in UNTRAINABLE_ARCHITECTURES:
        log.warning("MODEL.WEIGHTS is empty: measuring a randomly initialised %s", cfg.MODEL.META_ARCHITECTURE)
    if args.save_examples:
        path = save_examples(out / "robustness_examples.png", read_image_rgb(dicts[0]["file_name"]), shifts,
                             normalizer)
        log.info("wrote %s", path)

    model = NucleiTrainer.build_model(cfg)
    NucleiCheckpointer.from_config(model, cfg, cfg.OUTPUT_DIR, config_file=args.config_file).resume_or_load(
        cfg.MODEL.WEIGHTS, resume=False)
    info = {"config": args.config_file, "weights": cfg.MODEL.WEIGHTS, "dataset": args.dataset, "tiles": len(dicts),
            "stain_norm": cfg.INPUT.NUCLEI.STAIN_NORM, "stain_reference": cfg.INPUT.NUCLEI.STAIN_REFERENCE,
            "test_aug": bool(cfg.TEST.AUG.ENABLED), "opts": args.opts, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "max_aji_loss": MAX_AJI_LOSS}
    log.info("robustness of %s on %s (%d tiles), %d shifts, stain normalisation %s, %d threads",
             args.config_file, args.dataset, len(dicts), len(shifts), info["stain_norm"], info["threads"])

    rows: list[dict] = []
    metrics: dict[str, dict] = {}
    for i, shift in enumerate(shifts, 1):
        scfg = cfg.clone()
        scfg.defrost()
        scfg.INPUT.TEST_SHIFT = "" if shift.kind == "none" else shift.name
        scfg.OUTPUT_DIR = str(out / "eval" / _slug(shift.name))
        scfg.freeze()
        t = time.perf_counter()
        results = NucleiTrainer.test(scfg, model)
        seconds = time.perf_counter() - t
        flat = results.get("nuclei", results)
        metrics[shift.name] = {k: float(v) for k, v in flat.items() if isinstance(v, int | float)}
        row = _row(shift.name, metrics[shift.name], seconds / len(dicts), rows[0]["AJI"] if rows else None)
        rows.append(row)
        _write_results(out, rows, info, metrics, complete=i == len(shifts))
        log.info("[%d/%d] %s: AJI %.3f (%+.3f) PQ %.3f Dice1 %.3f F1 %.3f, %.0f s%s", i, len(shifts), shift.name,
                 row["AJI"], row["dAJI"], row["PQ"], row["Dice1"], row["F1"], seconds,
                 f"  LOSES > {MAX_AJI_LOSS:g} AJI" if row["loses_more_than_0.03"] else "")

    print(format_table(rows))
    lost = [r["shift"] for r in rows if r["loses_more_than_0.03"]]
    print(f"{len(lost)} of {len(rows) - 1} shifts lose more than {MAX_AJI_LOSS:g} AJI"
          + (f": {', '.join(lost)}" if lost else ""))
    print(f"wrote {out / 'robustness.csv'}, {out / 'robustness.json'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Score saved nucleus segmentations against ground truth, compare two prediction sets or two evaluations.

    python tools/evaluate.py --gt GT_LABELS/ --pred PRED_LABELS/ [--output-dir out/]
    python tools/evaluate.py --gt GT_LABELS/ --pred PREDICT_OUTPUT/   # tools/predict.py's folder (<stem>_labels.tif)
    python tools/evaluate.py --gt test_coco.json --pred output/inference/coco_instances_results.json
    python tools/evaluate.py --gt GT/ --pred A/ --pred-b B/ --names unet hovernet   # paired Wilcoxon per metric
    python tools/evaluate.py --gt GT/ --pred P/ --organs metadata.json --train-organs liver,breast,kidney,prostate
    python tools/evaluate.py --compare runA/inference/kumar_test/nuclei_per_image.csv \
        runB/inference/kumar_test/nuclei_per_image.csv --names A B     # two evaluations already done: same table
    python tools/evaluate.py --summary runA/inference/kumar_test/nuclei_per_image.csv   # mean +- SE over images

Metrics and conventions: docs/metrics.md. The work is done by nuclei_d2.evaluation.offline.run_evaluate.
"""

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed


def build_parser() -> argparse.ArgumentParser:
    """The command line, standard library only (``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py",
        description="Score nucleus instance segmentations (AJI, AJI+, PQ, F1, Dice, Hausdorff, MDR/FDR/USR/OSR) "
                    "against ground truth, and compare two prediction sets with a paired Wilcoxon test; or read "
                    "per-image CSVs already written (--compare, --summary).",
        epilog="A folder prediction for ground-truth image <stem> is <stem>.<ext> or <stem>_labels.<ext> (what "
               "tools/predict.py writes; ext: png, tif, tiff, npy); both at once is an error. Overlays "
               "(*_overlay.png), hidden files and non-label files are ignored. Nothing is written unless every "
               "input is valid. --compare and --summary read per-image CSVs (nuclei_per_image.csv of an "
               "evaluation, per_image.csv of this tool, benchmarks/ensemble.py's per_image/<row>.csv): an 'image' "
               "column and one column per metric.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--gt", help="ground truth: folder of label maps or COCO dataset JSON")
    p.add_argument("--pred",
                   help="predictions: folder of label maps (e.g. tools/predict.py's output folder), COCO dataset "
                        "JSON, or COCO results JSON (needs --gt as COCO JSON)")
    p.add_argument("--pred-b", help="a second prediction set to compare with --pred (paired Wilcoxon per metric)")
    p.add_argument("--compare", nargs=2, metavar=("A.csv", "B.csv"),
                   help="instead of --gt/--pred: compare two per-image CSVs of evaluations already done (images "
                        "matched by name; paired Wilcoxon and the standard error of the difference per metric)")
    p.add_argument("--summary", metavar="CSV",
                   help="instead of --gt/--pred: mean +- standard error over images per metric of one per-image CSV, "
                        "overall and per organ group (seen/unseen, organ) when the CSV has them")
    p.add_argument("--metrics", nargs="+", metavar="METRIC",
                   help="metrics to compare/summarise (default: AJI PQ Dice1 F1 for --compare/--summary, every "
                        "metric for --pred-b)")
    p.add_argument("--names", nargs=2, metavar=("A", "B"),
                   help="names of --pred and --pred-b (or of --compare's two files) in the tables and comparison.csv "
                        "(default: A B)")
    p.add_argument("--alpha", type=float, default=0.05,
                   help="significance level of the paired test: the 'better' column names a set only where p < alpha")
    p.add_argument("--iou-threshold", type=float, default=0.5,
                   help="IoU a pair must exceed for F1/precision/recall (PQ always uses 0.5)")
    p.add_argument("--min-score", type=float, default=0.0, help="drop detections of COCO results below this score")
    p.add_argument("--no-hausdorff", action="store_true", help="skip the object-level Hausdorff distance")
    p.add_argument("--missing", choices=("error", "empty"), default="error",
                   help="ground-truth images without a prediction: stop with an error, or score an empty prediction "
                        "(a prediction set matching no image at all is an error either way)")
    p.add_argument("--organs", help="JSON {image name: organ} (or {name: {'organ': ...}}, like MoNuSeg's "
                                    "metadata.json) for per-organ results")
    p.add_argument("--train-organs", help="comma-separated organs seen in training, for seen/unseen results")
    p.add_argument("--output-dir", help="write per-image CSV, JSON summary (and comparison CSV) here; comparison.csv "
                                        "with --compare, summary.csv with --summary")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments that need no file (exit 2 with argparse's message otherwise)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.compare and args.summary:
        p.error("--compare and --summary are two different modes; give one")
    if args.compare or args.summary:
        mode = "--compare" if args.compare else "--summary"
        scoring = [o for o, v in (("--gt", args.gt), ("--pred", args.pred), ("--pred-b", args.pred_b),
                                  ("--organs", args.organs), ("--train-organs", args.train_organs)) if v]
        if scoring:
            p.error(f"{mode} reads per-image CSVs already scored; {', '.join(scoring)} belong to scoring label maps")
    elif not (args.gt and args.pred):
        p.error("the following arguments are required: --gt, --pred (or --compare A.csv B.csv, or --summary CSV)")
    if not 0.0 <= args.iou_threshold < 1.0:
        p.error(f"--iou-threshold must be in [0, 1), got {args.iou_threshold:g}")
    if not 0.0 < args.alpha < 1.0:
        p.error(f"--alpha must be in (0, 1), got {args.alpha:g}")
    if args.names and (args.names[0] == args.names[1] or not all(n.strip() for n in args.names)):
        p.error(f"--names needs two different, non-empty names, got {args.names[0]!r} and {args.names[1]!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from nuclei_d2.evaluation.offline import run_evaluate  # heavy imports (torch via nuclei_d2) only after parsing

    return run_evaluate(args)


if __name__ == "__main__":
    sys.exit(main())

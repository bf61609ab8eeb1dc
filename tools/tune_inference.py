#!/usr/bin/env python
"""Tune a trained model's inference settings on a registered training split and write them as a config file.

    python tools/tune_inference.py --config-file configs/maskrcnn_plus-cpu.yaml --weights model_final.pth \\
        --dataset kumar_train --grid MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.5,0.7,0.8 \\
        MODEL.ROI_HEADS.NMS_THRESH_TEST=0.3,0.4
    python tools/tune_inference.py --config-file configs/nb_unet-cpu.yaml --weights model_final.pth \\
        --grid MODEL.NB.THRESHOLD=0.5,0.7,0.8,0.9 --max-images 4 MODEL.DEVICE cpu
    python tools/tune_inference.py --config-file configs/classical_watershed.yaml --grid \\
        MODEL.CLASSICAL.THRESHOLD_SCALE=0.9,1.0,1.1 MODEL.CLASSICAL.MIN_SIZE=30,60 --top 5

The work is done by nuclei_d2.engine.tune_inference; docs/time_to_accuracy.md shows what it found on Kumar.
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(
        prog="tune_inference.py",
        description="Tune a trained model's inference settings (score/probability thresholds, post-processing) on a "
                    "registered training split and write the best as a config file.")
    p.add_argument("--config-file", required=True, help="config of the trained model")
    p.add_argument("--weights", default="", help="checkpoint (default: the config's MODEL.WEIGHTS)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickled weights (.pkl; sets MODEL.CHECKPOINT.ALLOW_PICKLE True). Unpickling a "
                        "file can run arbitrary code: use it only for files you trust")
    p.add_argument("--dataset", default="kumar_train", help="registered dataset to tune on (default kumar_train)")
    p.add_argument("--grid", nargs="+", required=True, metavar="KEY=V1,V2",
                   help="config key and the values to try, e.g. MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.5,0.7,0.8 "
                        "(commas inside brackets or quotes do not split: "
                        "TEST.AUG.TRANSFORMS=\"['identity'],['identity','hflip']\")")
    p.add_argument("--metric", default="AJI", help="per-image mean to maximise (AJI, PQ, Dice1, F1; default AJI)")
    p.add_argument("--max-images", type=int, default=0, help="tune on the first N images only (0 = all)")
    p.add_argument("--no-reuse-maps", dest="reuse_maps", action="store_false",
                   help="full inference at every grid point, even when only a dense model's post-processing or the "
                        "merging of test-time copies changes")
    p.add_argument("--output", default="", help="tuned config to write (default OUTPUT_DIR/tune_inference/tuned.yaml)")
    p.add_argument("--top", type=int, default=0, help="rows of the result table to print (0 = all)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="further config overrides KEY VALUE ...")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.allow_pickle:
        args.opts = [*args.opts, "MODEL.CHECKPOINT.ALLOW_PICKLE", "True"]
    from nuclei_d2.engine.tune_inference import run  # heavy imports (torch, detectron2) only after parsing

    return run(args)


if __name__ == "__main__":
    sys.exit(main())

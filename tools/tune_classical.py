#!/usr/bin/env python
"""Tune the classical floor's parameters on a registered training split and write them as a config file: a preset of
tools/tune_inference.py (the same run) with the classical config and its default grid of MODEL.CLASSICAL keys.

    python tools/tune_classical.py --dataset kumar_train
    python tools/tune_classical.py --threshold-scale 0.9 1.0 1.1 --sigma-factor 0.5 --min-size 30 --max-images 4
    python tools/train_net.py --config-file output/classical_watershed/tune_inference/tuned.yaml --eval-only

The first line is the same as
    python tools/tune_inference.py --config-file configs/classical_watershed.yaml --dataset kumar_train --grid \\
        MODEL.CLASSICAL.THRESHOLD_SCALE=0.8,0.9,1.0,1.1,1.2,1.3 MODEL.CLASSICAL.SIGMA_FACTOR=0.25,0.5,0.75 \\
        MODEL.CLASSICAL.MIN_SIZE=10,30,60 --top 10
plus a check that the config is a ClassicalWatershed one. docs/classical.md explains the method.
"""

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

#: The grid tried by default (6 x 3 x 3 = 54 points), as ``MODEL.CLASSICAL.<KEY>`` values.
DEFAULT_GRID = {
    "THRESHOLD_SCALE": (0.8, 0.9, 1.0, 1.1, 1.2, 1.3),
    "SIGMA_FACTOR": (0.25, 0.5, 0.75),
    "MIN_SIZE": (10, 30, 60),
}


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(
        prog="tune_classical.py",
        description="Tune the classical floor (deconvolution + Otsu + distance watershed) on a registered dataset "
                    "and write the best parameters as a config file (tools/tune_inference.py with a default grid).")
    p.add_argument("--config-file", default="configs/classical_watershed.yaml", help="the config to tune")
    p.add_argument("--dataset", default="kumar_train", help="registered dataset to tune on (default kumar_train)")
    p.add_argument("--metric", default="AJI", help="per-image mean to maximise (AJI, PQ, Dice1, F1; default AJI)")
    p.add_argument("--threshold-scale", type=float, nargs="+", default=list(DEFAULT_GRID["THRESHOLD_SCALE"]),
                   help="MODEL.CLASSICAL.THRESHOLD_SCALE values")
    p.add_argument("--sigma-factor", type=float, nargs="+", default=list(DEFAULT_GRID["SIGMA_FACTOR"]),
                   help="MODEL.CLASSICAL.SIGMA_FACTOR values")
    p.add_argument("--min-size", type=int, nargs="+", default=list(DEFAULT_GRID["MIN_SIZE"]),
                   help="MODEL.CLASSICAL.MIN_SIZE values")
    p.add_argument("--max-images", type=int, default=0, help="use only the first N images (0 = all)")
    p.add_argument("--output", default="",
                   help="tuned config to write (default OUTPUT_DIR/tune_inference/tuned.yaml)")
    p.add_argument("--top", type=int, default=10, help="rows of the result table to print (0 = all)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p


def tune_inference_args(args: argparse.Namespace) -> list[str]:
    """The tools/tune_inference.py command line this preset runs."""
    grid = [f"MODEL.CLASSICAL.THRESHOLD_SCALE={','.join(map(str, args.threshold_scale))}",
            f"MODEL.CLASSICAL.SIGMA_FACTOR={','.join(map(str, args.sigma_factor))}",
            f"MODEL.CLASSICAL.MIN_SIZE={','.join(map(str, args.min_size))}"]
    return ["--grid", *grid, "--config-file", args.config_file, "--dataset", args.dataset, "--metric", args.metric,
            "--max-images", str(args.max_images), "--output", args.output, "--top", str(args.top), *args.opts]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    spec = importlib.util.spec_from_file_location("tune_inference_tool", REPO / "tools" / "tune_inference.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    run_args = tool.build_parser().parse_args(tune_inference_args(args))
    run_args.meta_architecture = "ClassicalWatershed"  # the grid's keys are read by this model only
    from nuclei_d2.engine.tune_inference import run  # heavy imports (torch, detectron2) only after parsing

    return run(run_args)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train the tiny baseline on the embedded synthetic data, predict a held-apart tile, write overlay + metrics; then
segment the same tile with the model zoo's flagship (a model trained on real H&E) and print the command that does
that on your own image or slide.

    python tools/demo.py                              # ~2 minutes on 2 CPU cores, ~60 MB written
    python tools/demo.py --zoo-only                   # only the zoo model (seconds)
    python tools/demo.py --iters 300 --output output/demo300 --no-zoo
    python tools/demo.py --output output/demo SOLVER.BASE_LR 0.002
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(prog="demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Writes into --output: model_final.pth (weights only) with config.yaml beside "
                                       "it, metrics_final.json, demo_overlay.png, demo_prediction_labels.png; zoo/ "
                                       "(the zoo model's overlay, GeoJSON and CSV). Exit status 0 done, 2 a config "
                                       "or model zoo problem (one line).")
    p.add_argument("--config-file", default=str(REPO / "configs" / "maskrcnn_baseline-tiny.yaml"))
    p.add_argument("--output", default="output/demo", help="folder for the weights, config, overlay and metrics")
    p.add_argument("--iters", type=int, default=150, help="training iterations")
    p.add_argument("--zoo-model", default=None, metavar="NAME",
                   help="model zoo entry run on the tile after training (default: the zoo's flagship)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--no-zoo", action="store_true", help="skip the model zoo step")
    group.add_argument("--zoo-only", action="store_true", help="skip training: only the model zoo step")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.iters < 1:
        build_parser().error(f"--iters must be at least 1, got {args.iters}")
    # Heavy imports (torch, detectron2) only after parsing.
    from pathlib import Path

    import nuclei_d2  # noqa: F401  (registers datasets and models)
    from nuclei_d2.engine.demo import demo_tile, run_demo, run_zoo_demo
    from nuclei_d2.errors import ConfigError

    try:
        if args.zoo_only:
            run_zoo_demo(demo_tile(args.config_file, args.opts)["file_name"], Path(args.output) / "zoo",
                         args.zoo_model)
        else:
            run_demo(args.config_file, args.output, args.iters, args.opts, zoo_model=args.zoo_model,
                     zoo=not args.no_zoo)
    except ConfigError as e:  # includes CheckpointError (a tampered or missing zoo file)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

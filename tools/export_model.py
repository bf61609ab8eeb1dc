#!/usr/bin/env python
"""Export a trained nuclei-d2 model's networks to ONNX or TorchScript (one file per network) with the sidecar
``export.json`` and ``config.yaml`` that make the folder a complete segmenter. See docs/export.md.

    python tools/export_model.py --config-file configs/nb_unet.yaml --weights model_final.pth --format onnx \\
        --output exports/nb_onnx
    python tools/export_model.py --model two_stage_unet-monuseg --format torchscript --output exports/ts_pt
    python tools/export_model.py --model two_stage_unet-monuseg --format onnx --quantize int8 \
        --calibration kumar_train --output exports/ts_int8     # int8: 2-3x faster on CPUs with VNNI
    python tools/predict.py --exported exports/nb_onnx --input tile.png --output out     # run it

Exit status: 0 exported, 2 a config, weights, method or output problem (one line on stderr; nothing written).
"""

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(
        description="Export a nuclei-d2 model's networks to ONNX or TorchScript, with the sidecar JSON its "
                    "pre/post-processing needs. KEY VALUE config overrides go at the end.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config-file", default=None, help="the model's config (the one it was trained with), or zoo:NAME")
    p.add_argument("--model", default=None, metavar="NAME", help="a model zoo entry instead of --config-file")
    p.add_argument("--weights", default=None, help="trained weights (sets MODEL.WEIGHTS)")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="what to export to")
    p.add_argument("--output", required=True, help="export folder to create (written whole or not at all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export folder")
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: static int8 quantisation of the ONNX networks, calibrated on real images "
                        "(docs/export.md, 'int8')")
    p.add_argument("--calibration", default=None, metavar="DIR_OR_DATASET",
                   help="images to calibrate int8 with: a folder of images or a registered dataset name "
                        "(default: the config's first DATASETS.TRAIN)")
    p.add_argument("--calibration-images", type=int, default=4, metavar="N",
                   help="how many calibration images (each segmented once; every network's inputs recorded)")
    p.add_argument("--calibrate-method", default="minmax", choices=["minmax", "percentile", "entropy"],
                   help="how int8 activation ranges are chosen from the calibration inputs")
    p.add_argument("--allow-untrained", action="store_true",
                   help="export random weights when MODEL.WEIGHTS is empty (speed tests only)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickled weights (.pkl; unpickling can run code: only files you trust)")
    p.add_argument("opts", nargs="*", default=[], help="KEY VALUE config overrides (e.g. MODEL.NB.THRESHOLD 0.6)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if bool(args.model) == bool(args.config_file):
        p.error("give --model NAME (a model zoo entry) or --config-file FILE, not both or neither")
    if args.quantize != "none" and args.format != "onnx":
        p.error(f"--quantize {args.quantize} is for ONNX Runtime: use --format onnx")
    if args.calibration_images < 1:
        p.error("--calibration-images must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from nuclei_d2.engine.export import export_from_config  # heavy imports (torch, detectron2) only after parsing
    from nuclei_d2.errors import ConfigError

    opts = list(args.opts) + (["MODEL.CHECKPOINT.ALLOW_PICKLE", "True"] if args.allow_pickle else [])
    try:
        out = export_from_config(args.config_file, args.format, args.output, weights=args.weights,
                                 model_name=args.model, opts=opts, allow_untrained=args.allow_untrained,
                                 overwrite=args.overwrite, quantize=args.quantize, calibration=args.calibration,
                                 calibration_count=args.calibration_images, calibrate_method=args.calibrate_method)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

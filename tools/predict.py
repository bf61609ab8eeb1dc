#!/usr/bin/env python
"""Segment nuclei in images, folders, large tiles and whole slides; write GeoJSON (QuPath), COCO results, label maps,
per-nucleus CSV measurements and overlays. See docs/inference.md.

    python tools/predict.py --config-file configs/maskrcnn_baseline.yaml --weights model_final.pth \\
        --input slides/ --output out --outputs geojson csv overlay --tissue-mask MODEL.DEVICE cpu
    python tools/predict.py --config-file configs/two_stage_unet.yaml --weights model_final.pth \\
        --input "slides/*.svs" --output out --magnification 20 --shard 0/4
    python tools/predict.py --config-file configs/classical_watershed.yaml --input tile.png --output out
    python tools/predict.py --model NAME --input tile.png --output out     # a model zoo entry (--list-models)
    python tools/predict.py --exported export_dir --input tile.png --output out   # an exported model (docs/export.md)

A killed run resumes when started again with the same command: finished inputs are skipped and the finished tiles of
an interrupted slide (kept in <output>/<stem>.partial/) are reused.
"""

import argparse
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

#: The output kinds of nuclei_d2.inference.run.OUTPUT_KINDS (listed here so --help needs no torch; a test keeps
#: the two in step).
OUTPUT_KINDS = ("geojson", "coco", "labels", "csv", "overlay")


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: ``--help`` and argument errors never import torch)."""
    p = argparse.ArgumentParser(
        description="Segment nuclei in images, folders, large tiles and whole slides with any nuclei-d2 model.",
        epilog="Example: python tools/predict.py --config-file configs/maskrcnn_baseline.yaml --weights "
               "model_final.pth --input slides/*.svs --output out --outputs geojson csv --level 0 --tissue-mask. "
               "Exit status: 0 all done, 1 some inputs failed, 2 bad config, arguments or output folder, "
               "130 / 143 interrupted by Ctrl-C / SIGTERM (rerun the same command to resume).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, metavar="NAME",
                   help="a model zoo entry (its config and verified weights); see --list-models")
    p.add_argument("--list-models", action="store_true", help="print the model zoo's entries and exit")
    p.add_argument("--config-file", default=None,
                   help="model config (the one it was trained with), or zoo:NAME; not with --model")
    p.add_argument("--weights", default=None, help="trained weights (sets MODEL.WEIGHTS)")
    p.add_argument("--exported", default=None, metavar="DIR",
                   help="an export folder of tools/export_model.py: its networks run instead of weights "
                        "(INFERENCE.EXPORTED); its config.yaml is the config unless --config-file / --model is given")
    p.add_argument("--runtime", default=None, choices=["torch", "onnxruntime", "torchscript"],
                   help="what runs the networks (INFERENCE.RUNTIME); default with --exported: the folder's format's "
                        "runtime")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickled weights (.pkl; sets MODEL.CHECKPOINT.ALLOW_PICKLE True). Unpickling a "
                        "file can run arbitrary code: use it only for files you trust")
    p.add_argument("--input", nargs="+", default=None, help="image files, folders or glob patterns")
    p.add_argument("--output", default=None, help="output folder (checked for writing before anything else)")
    p.add_argument("--outputs", nargs="+", default=None, choices=list(OUTPUT_KINDS),
                   help="what to write (default INFERENCE.OUTPUTS)")
    p.add_argument("--level", type=int, default=0, help="pyramid level of slides to analyse (0 = full resolution)")
    p.add_argument("--magnification", type=float, default=None,
                   help="analyse the slide level closest to this objective power (e.g. 20)")
    p.add_argument("--tissue-mask", action="store_true", help="skip tiles without tissue (thumbnail mask)")
    p.add_argument("--tissue-threshold", type=float, default=0.08, help="optical density threshold of the mask")
    p.add_argument("--tile-size", type=int, default=None, help="tile side in px (default INFERENCE.TILE_SIZE)")
    p.add_argument("--overlap", type=int, default=None, help="tile overlap in px (default INFERENCE.OVERLAP)")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per forward pass (INFERENCE.BATCH_SIZE)")
    p.add_argument("--label-format", default=".tif", choices=[".tif", ".png", ".npy"], help="label map format")
    p.add_argument("--backend", default="auto", choices=["auto", "tifffile", "tiffslide", "openslide", "pil"])
    p.add_argument("--overwrite", action="store_true",
                   help="redo inputs whose outputs are complete (and discard the finished tiles of interrupted ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--shard", default="0/1", help="K/N: process only the K-th of N shards of the inputs")
    p.add_argument("--num-gpus", type=int, default=1, help="processes per machine (Detectron2 launch)")
    p.add_argument("--num-machines", type=int, default=1)
    p.add_argument("--machine-rank", type=int, default=0)
    p.add_argument("--dist-url", default="auto")
    p.add_argument("opts", nargs="*", default=[], help="KEY VALUE config overrides (e.g. MODEL.DEVICE cpu)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the command line: one model (``--model`` or ``--config-file``), ``--input`` and ``--output``
    unless ``--list-models``; ``--model NAME`` becomes ``--config-file zoo:NAME``."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.list_models:
        return args
    if args.model and args.config_file:
        p.error("give --model NAME or --config-file FILE, not both")
    if args.exported and not args.model and not args.config_file:
        args.config_file = str(Path(args.exported) / "config.yaml")  # the export folder's own config
    if args.exported and args.weights:
        p.error("--weights and --exported exclude each other: an export folder's files are the weights")
    if args.runtime in ("onnxruntime", "torchscript") and not args.exported and "INFERENCE.EXPORTED" not in args.opts:
        p.error(f"--runtime {args.runtime} runs an export folder: give --exported DIR (tools/export_model.py)")
    if not args.model and not args.config_file:
        p.error("give a model: --model NAME (a model zoo entry, see --list-models), --config-file FILE or --exported "
                "DIR")
    if args.model:
        args.config_file = "zoo:" + args.model
    missing = [flag for flag, v in (("--input", args.input), ("--output", args.output)) if not v]
    if missing:
        p.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.list_models:
        from nuclei_d2.errors import ConfigError
        from nuclei_d2.model_zoo import format_table

        try:
            print(format_table())
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    from nuclei_d2.engine.predict import run_predict  # heavy imports (torch, detectron2) only after parsing

    return run_predict(args)


if __name__ == "__main__":
    sys.exit(main())

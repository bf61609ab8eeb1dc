"""The command line of ``tools/convert_dataset.py`` (kept here so it is importable and testable).

    python tools/convert_dataset.py monuseg-xml --images DIR --xml DIR --out x.json [--split-file F --split S]
    python tools/convert_dataset.py labels      --images DIR --labels DIR --out x.json
    python tools/convert_dataset.py dsb2018     --images stage1_train --out x.json
    python tools/convert_dataset.py mat         --images DIR --labels DIR --out x.json [--type-key inst_type ...]
    python tools/convert_dataset.py pannuke     --images images.npy --masks masks.npy --out x.json [--keep-types]
    python tools/convert_dataset.py to-labels   --json x.json --out-dir DIR [--format png|tif|npy]
    python tools/convert_dataset.py prepare-builtin {monuseg2018,dsb2018,cpm17,tnbc,pannuke} --source DIR [--root R]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

logger = logging.getLogger("nuclei_d2.data.converters")


def _common(p: argparse.ArgumentParser, organs: bool = True) -> None:
    p.add_argument("--out", required=True, help="output COCO JSON (written atomically)")
    p.add_argument("--split-file", help="JSON of split name -> image stems (nested keys allowed), e.g. "
                                        "../shared/data/monuseg2018/splits.json")
    p.add_argument("--split", action="append", default=[],
                   help="split to convert, keys joined by '/', e.g. kumar2017/train; repeat for a union")
    if organs:
        p.add_argument("--metadata", help="JSON with an organ per image stem ({stem: {organ: ...}} or "
                                          "{stem: organ}); default: a metadata.json beside the images, if any")
    p.add_argument("--organ", help="organ of every image the metadata does not name")
    p.add_argument("--image-root", help="store file_name relative to this folder (default: absolute paths)")
    p.add_argument("--verify-images", action="store_true",
                   help="decode every image to check it (default: read image headers only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_dataset.py",
        description="Convert nuclei datasets to COCO instance-segmentation JSON (category 'nucleus', compressed RLE, "
                    "organ per image) and back. See docs/data.md.")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    # -q also after the command (SUPPRESS keeps the top-level value when it is not repeated there)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "monuseg-xml", parents=[quiet], aliases=["kumar-xml"], help="MoNuSeg/Kumar tiles + Aperio ImageScope XML")
    p.add_argument("--images", required=True, help="folder of <stem>.tif tiles")
    p.add_argument("--xml", required=True, help="folder of <stem>.xml annotations (may be --images)")
    p.add_argument("--overlap", choices=["first", "last"], default="first",
                   help="which polygon keeps overlapping pixels (default first: as the released label maps)")
    _common(p)

    p = sub.add_parser(
        "labels", parents=[quiet], help="images + instance label maps (PNG/TIFF/NPY/MAT, 0 = background)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--labels", required=True, help="folder of label maps, matched to images by stem")
    p.add_argument("--label-suffix", default="", help="label stems end with this, e.g. _label")
    p.add_argument("--recursive", action="store_true", help="search sub-folders too")
    p.add_argument("--binary", action="store_true", help="label files are foreground masks: nuclei = 8-connected "
                                                         "components")
    p.add_argument("--mat-key", help="variable holding the instance map in .mat label files")
    _common(p)

    p = sub.add_parser(
        "dsb2018", parents=[quiet], help="Kaggle DSB2018 layout: <id>/images/<id>.png + <id>/masks/*.png")
    p.add_argument("--images", required=True, help="the stage folder, e.g. stage1_train")
    p.add_argument("--allow-unlabelled", action="store_true",
                   help="keep images without a masks/ folder (as images with no nuclei)")
    _common(p)

    p = sub.add_parser(
        "mat", parents=[quiet], aliases=["cpm17", "hovernet"],
                       help="images + .mat labels (inst_map; HoVer-Net inst_type for types)")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--labels", required=True, help="folder of .mat files, matched to images by stem")
    p.add_argument("--label-suffix", default="", help="label stems end with this")
    p.add_argument("--mat-key", help="instance-map variable (default inst_map, or the only 2-D integer array)")
    p.add_argument("--type-key", help="keep nucleus types: per-instance type variable (inst_type) or type map")
    p.add_argument("--type-names", help="comma-separated names of types 1..K (needed with --type-key)")
    _common(p)

    p = sub.add_parser(
        "pannuke", parents=[quiet], help="PanNuke fold: images.npy + masks.npy (+ types.npy); writes PNGs")
    p.add_argument("--images", required=True, help="the fold's images.npy")
    p.add_argument("--masks", required=True, help="the fold's masks.npy")
    p.add_argument("--types", help="the fold's types.npy (tissue per image; default: beside images.npy)")
    p.add_argument("--image-dir", help="where to write the PNGs (default: <out stem>_images beside the JSON)")
    p.add_argument("--keep-types", action="store_true", help="5 categories (neoplastic, inflammatory, connective, "
                                                             "dead, epithelial) instead of one 'nucleus'")
    p.add_argument("--out", required=True, help="output COCO JSON")

    p = sub.add_parser(
        "to-labels", parents=[quiet], help="COCO JSON -> one label map per image")
    p.add_argument("--json", required=True, help="COCO JSON")
    p.add_argument("--out-dir", required=True, help="folder for <stem>.<format> label maps")
    p.add_argument("--format", default="png", choices=["png", "tif", "npy"],
                   help="png = uint16 (default), tif/npy = int32")
    p.add_argument("--type-dir", help="also write category-id maps here")

    p = sub.add_parser(
        "prepare-builtin", parents=[quiet], help="write the built-in datasets' JSONs under the datasets root")
    p.add_argument("family", choices=["monuseg2018", "dsb2018", "cpm17", "tnbc", "pannuke"])
    p.add_argument("--source", required=True, help="the downloaded dataset folder (datasets/README.md)")
    p.add_argument("--root", help="datasets root (default $NUCLEI_D2_DATASETS or ./datasets)")
    p.add_argument("--test-source", help="monuseg2018: the MoNuSeg 2018 test folder (*.tif + *.xml)")
    p.add_argument("--from-xml", action="store_true", help="monuseg2018: rasterize the XMLs even if label maps "
                                                           "exist")
    p.add_argument("--allow-unlabelled", action="store_true", help="dsb2018: keep images without masks/")
    return parser


def _run(args: argparse.Namespace) -> list[Path]:
    from . import (
        coco_to_label_maps,
        convert_dsb2018,
        convert_label_maps,
        convert_mat,
        convert_monuseg_xml,
        convert_pannuke,
        prepare_builtin,
    )

    show = not args.quiet
    cmd = args.command
    common: dict[str, Any] = {}
    if hasattr(args, "split_file"):
        common = dict(split_file=args.split_file, splits=args.split or None, organ=args.organ,
                      image_root=args.image_root, verify_images=args.verify_images, show_progress=show)
        if hasattr(args, "metadata"):
            common["metadata"] = args.metadata
    if cmd in ("monuseg-xml", "kumar-xml"):
        convert_monuseg_xml(args.images, args.xml, args.out, overlap=args.overlap, **common)
    elif cmd == "labels":
        convert_label_maps(args.images, args.labels, args.out, label_suffix=args.label_suffix,
                           recursive=args.recursive, binary=args.binary, mat_key=args.mat_key, **common)
    elif cmd == "dsb2018":
        convert_dsb2018(args.images, args.out, allow_unlabelled=args.allow_unlabelled, **common)
    elif cmd in ("mat", "cpm17", "hovernet"):
        names = [n.strip() for n in args.type_names.split(",")] if args.type_names else None
        convert_mat(args.images, args.labels, args.out, key=args.mat_key, type_key=args.type_key,
                    type_names=names, label_suffix=args.label_suffix, **common)
    elif cmd == "pannuke":
        convert_pannuke(args.images, args.masks, args.out, types_npy=args.types, image_dir=args.image_dir,
                        keep_types=args.keep_types, show_progress=show)
    elif cmd == "to-labels":
        return coco_to_label_maps(args.json, args.out_dir, fmt=args.format, type_dir=args.type_dir,
                                  show_progress=show)
    elif cmd == "prepare-builtin":
        options: dict[str, Any] = {"show_progress": show}
        if args.family == "monuseg2018":
            options.update(test_source=args.test_source, from_xml=args.from_xml)
        elif args.test_source or args.from_xml:
            raise SystemExit("error: --test-source/--from-xml apply to monuseg2018 only")
        if args.family == "dsb2018":
            options["allow_unlabelled"] = args.allow_unlabelled
        elif args.allow_unlabelled:
            raise SystemExit("error: --allow-unlabelled applies to dsb2018 only")
        return prepare_builtin(args.family, args.source, args.root, **options)
    return [Path(args.out)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the converter command line; returns the exit code (0 ok, 1 conversion error, 2 usage error)."""
    from ..io import ImageReadError
    from .common import ConversionError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    start = time.perf_counter()
    try:
        written = _run(args)
    except (ConversionError, ImageReadError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - start
    if args.command == "to-labels":
        print(f"wrote {len(written)} label maps to {args.out_dir} in {elapsed:.1f} s")
    else:
        for path in written:
            print(f"wrote {path}")
        print(f"done in {elapsed:.1f} s")
    return 0

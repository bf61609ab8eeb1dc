#!/usr/bin/env python
"""Convert nuclei datasets to COCO instance-segmentation JSON (and back); prepare the built-in datasets.

    python tools/convert_dataset.py prepare-builtin monuseg2018 --source ../shared/data/monuseg2018
    python tools/convert_dataset.py monuseg-xml --images DIR --xml DIR --out kumar.json \\
        --split-file splits.json --split kumar2017/train [--rasterize fill-poly]
    python tools/convert_dataset.py labels --images DIR --labels DIR --out mine.json
    python tools/convert_dataset.py to-labels --json mine.json --out-dir labels/

Run with -h (or COMMAND -h) for every option; docs/data.md explains formats and conventions. Exit status: 0 done,
2 bad arguments or bad input (one line on stderr naming the file), 130 interrupted. The parser is built here with
the standard library only, so --help and argument errors never import torch; the work is done by
nuclei_d2.data.converters (nuclei_d2.data.converters.cli.run).
"""

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this clone's nuclei_d2, whatever the venv has installed

RASTERIZE = ("centers", "fill-poly")  # nuclei_d2.data.converters.monuseg_xml.RASTERIZE_METHODS (a test checks)
RASTERIZE_HELP = ("how XML polygons become pixels: centers = pixels whose centre is inside (default; matches the "
                  "released MoNuSeg label maps), fill-poly = also every pixel the outline touches, as cv2.fillPoly "
                  "(~8%% more foreground on MoNuSeg; see docs/data.md)")


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
                   help="decode every image to check it (default: read image headers, and refuse a TIFF whose "
                        "strips or tiles run past the end of the file)")


def build_parser() -> argparse.ArgumentParser:
    """The command line (standard library only: building it imports nothing heavy)."""
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
    p.add_argument("--rasterize", choices=RASTERIZE, default="centers", help=RASTERIZE_HELP)
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
        "to-labels", parents=[quiet], help="COCO JSON -> one label map per image (all or nothing)")
    p.add_argument("--json", required=True, help="COCO JSON (validated whole before anything is written)")
    p.add_argument("--out-dir", required=True, help="folder for <stem>.<format> label maps (other files in it are "
                                                    "kept)")
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
    p.add_argument("--rasterize", choices=RASTERIZE, default=None,
                   help="monuseg2018, when XMLs are rasterized: " + RASTERIZE_HELP)
    p.add_argument("--allow-unlabelled", action="store_true", help="dsb2018: keep images without masks/")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments; every usage error exits 2 here, before anything heavy is imported."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "prepare-builtin":
        if args.family != "monuseg2018" and (args.test_source or args.from_xml or args.rasterize):
            parser.error("--test-source, --from-xml and --rasterize apply to monuseg2018 only")
        if args.family != "dsb2018" and args.allow_unlabelled:
            parser.error("--allow-unlabelled applies to dsb2018 only")
    if args.command in ("mat", "cpm17", "hovernet") and (args.type_key is None) != (args.type_names is None):
        parser.error("keeping nucleus types needs both --type-key and --type-names (names of types 1..K)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from nuclei_d2.data.converters.cli import run  # heavy imports (numpy, torch via nuclei_d2) only after parsing

    return run(args)


if __name__ == "__main__":
    sys.exit(main())

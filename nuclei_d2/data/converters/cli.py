"""What ``tools/convert_dataset.py`` runs once its arguments are parsed (the parser lives in the tool, built with the
standard library only, so ``--help`` and argument errors never import torch).

:func:`run` takes the tool's ``argparse.Namespace``, calls the converter function of the command and turns every
input or file-system error into one line on stderr and exit status 2 (130 when interrupted).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["run"]

logger = logging.getLogger("nuclei_d2.data.converters")


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
        convert_monuseg_xml(args.images, args.xml, args.out, overlap=args.overlap, rasterize=args.rasterize,
                            **common)
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
            options.update(test_source=args.test_source, from_xml=args.from_xml, rasterize=args.rasterize)
        if args.family == "dsb2018":
            options["allow_unlabelled"] = args.allow_unlabelled
        return prepare_builtin(args.family, args.source, args.root, **options)
    return [Path(args.out)]


def run(args: argparse.Namespace) -> int:
    """Run the parsed command; returns the exit code (0 done, 2 bad input or unwritable output, 130 interrupted)."""
    from ...utils.io import ImageReadError
    from .common import ConversionError

    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    start = time.perf_counter()
    try:
        written = _run(args)
    except (ConversionError, ImageReadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # FileNotFoundError, PermissionError, disk full, ...: name the path, no traceback
        path = e.filename if e.filename is not None else ""
        detail = e.strerror or str(e)
        print(f"error: {path}: {detail}" if path else f"error: {detail}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; outputs are written atomically, so nothing half-written is left", file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    if args.command == "to-labels":
        print(f"wrote {len(written)} label maps to {args.out_dir} in {elapsed:.1f} s")
    else:
        for path in written:
            print(f"wrote {path}")
        print(f"done in {elapsed:.1f} s")
    return 0

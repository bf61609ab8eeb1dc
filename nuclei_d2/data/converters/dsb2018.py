"""Kaggle Data Science Bowl 2018 layout -> COCO.

Caicedo et al., "Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl", Nature Methods 16,
2019. Each image is a folder ``<id>/images/<id>.png`` (RGBA: the alpha channel is dropped when read) with
``<id>/masks/*.png``, one binary mask per nucleus. Masks are painted in natural file-name order into one label map
(where masks overlap the later one wins, as in ``../shared/data/dsb2018_brightfield/labels``), so the COCO
annotations of an image never overlap.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...utils.io import IMAGE_SUFFIXES
from .common import (
    CocoBuilder,
    ConversionError,
    check_output_file,
    load_organs,
    natural_key,
    progress,
    read_image_header,
    split_stems,
    write_coco,
)

__all__ = ["convert_dsb2018", "read_dsb2018_masks"]

logger = logging.getLogger("nuclei_d2.data.converters")


def _read_mask(path: Path, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    m = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if m is None:
        raise ConversionError(f"{path}: cannot read mask image")
    if m.ndim == 3:  # a colour or RGBA mask: any non-zero channel is foreground
        m = m.max(axis=2)
    if m.shape != tuple(shape):
        raise ConversionError(f"{path}: mask is {m.shape[0]}x{m.shape[1]} but its image is {shape[0]}x{shape[1]}")
    return m > 0


def read_dsb2018_masks(masks_dir: str | os.PathLike, shape: tuple[int, int]) -> np.ndarray:
    """Label map (int32) of the per-nucleus masks in ``masks_dir``: mask ``k`` (natural order) -> label ``k + 1``.

    Overlapping pixels go to the later mask; empty masks and masks fully covered by later ones are skipped (warned),
    so labels may have gaps.
    """
    masks_dir = Path(masks_dir)
    files = sorted((p for p in masks_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")), key=lambda p: natural_key(p.name))
    label = np.zeros(shape, dtype=np.int32)
    empty = []
    for k, path in enumerate(files, start=1):
        m = _read_mask(path, shape)
        if not m.any():
            empty.append(path.name)
            continue
        label[m] = k
    if empty:
        logger.warning("%s: %d empty mask(s) skipped: %s", masks_dir, len(empty), ", ".join(empty[:5]))
    return label


def convert_dsb2018(root: str | os.PathLike, out: str | os.PathLike | None = None, *,
                    split_file: str | os.PathLike | None = None, splits: Sequence[str] | None = None,
                    stems: Sequence[str] | None = None,
                    metadata: str | os.PathLike | dict[str, Any] | None = None, organ: str | None = None,
                    image_root: str | os.PathLike | None = None, allow_unlabelled: bool = False,
                    verify_images: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Convert a DSB2018 stage folder (``<root>/<id>/images/<id>.png``, ``<root>/<id>/masks/*.png``) to COCO.

    Args:
        root: the stage folder, e.g. ``stage1_train``.
        allow_unlabelled: keep images that have no ``masks`` folder (e.g. the original ``stage1_test``) as images
            with no annotations; by default that is an error, since evaluating on them would be meaningless.
        Other arguments as in :func:`nuclei_d2.data.converters.convert_label_maps` (``metadata`` has no default
        here: DSB2018 records no organ).
    """
    if out is not None:
        check_output_file(out)
    root = Path(root)
    if not root.is_dir():
        raise ConversionError(f"{root}: DSB2018 folder not found")
    ids = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=natural_key)
    if not ids:
        raise ConversionError(f"{root}: no image folders (<id>/images/<id>.png) found")
    stems = split_stems(split_file, splits, stems)
    if stems is not None:
        present = set(ids)
        missing = [s for s in stems if s not in present]
        if missing:
            raise ConversionError(f"{root}: {len(missing)} image folder(s) of the split are missing: "
                                  f"{', '.join(missing[:5])}")
        ids = sorted(stems, key=natural_key)
    organs = load_organs(metadata)
    builder = CocoBuilder(image_root=image_root, info={
        "source_format": "dsb2018", "images": str(root.resolve()), "split": list(splits or []),
        "conventions": "masks painted in natural file order, later mask wins"})
    for image_id in progress(ids, "DSB2018", total=len(ids), enabled=show_progress):
        folder = root / image_id
        image_path = _find_image(folder, image_id)
        h, w = read_image_header(image_path, verify=verify_images)
        masks_dir = folder / "masks"
        if not masks_dir.is_dir():
            if not allow_unlabelled:
                raise ConversionError(f"{masks_dir}: masks folder not found (use --allow-unlabelled to keep images "
                                      "without annotations)")
            label = np.zeros((h, w), dtype=np.int32)
        else:
            label = read_dsb2018_masks(masks_dir, (h, w))
        builder.add_label_map(builder.file_name(image_path), label, organ=organs.get(image_id, organ))
    coco = builder.to_dict()
    if out is not None:
        write_coco(coco, out)
    return coco


def _find_image(folder: Path, image_id: str) -> Path:
    images_dir = folder / "images"
    expected = images_dir / f"{image_id}.png"
    if expected.is_file():
        return expected
    cands = sorted(p for p in images_dir.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if images_dir.is_dir() else []
    if len(cands) == 1:
        return cands[0]
    raise ConversionError(f"{expected}: image not found" + (f" (found {len(cands)} other images)" if cands else ""))

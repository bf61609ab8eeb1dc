"""PanNuke ``.npy`` folds -> PNG images + COCO.

Gamper et al., "PanNuke: an open pan-cancer histology dataset for nuclei instance segmentation and classification",
ECDP 2019, and "PanNuke Dataset Extension, Insights and Baselines", arXiv:2003.10778. Each fold ships
``images.npy`` (N x 256 x 256 x 3, float 0-255), ``masks.npy`` (N x 256 x 256 x 6: channels 0-4 are instance maps of
the nuclei of each type, channel 5 is background) and ``types.npy`` (N tissue names, stored as the image's organ).

COCO needs image files, so the images are written as PNG next to the JSON (``<json stem>_images/<index>.png`` by
default) and ``file_name`` is stored relative to the JSON's folder. Arrays are memory-mapped: a 2,656-image fold
(8 GB of float64 masks) converts without loading it whole.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...structures import relabel_sequential
from ...utils.io import atomic_write, to_rgb_uint8
from ..datasets.protocols import PANNUKE_TYPES
from .common import (
    CocoBuilder,
    ConversionError,
    check_output_dir,
    check_output_file,
    collapse_categories,
    progress,
    write_coco,
)

__all__ = ["PANNUKE_TYPES", "convert_pannuke", "pannuke_label_map"]

logger = logging.getLogger("nuclei_d2.data.converters")



def pannuke_label_map(mask: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """One ``H x W x 6`` PanNuke mask -> (label map 1..N, ``{label: type id 1..5}``).

    Instances are numbered channel by channel (type 1 first), in increasing original id within a channel. Where
    channels overlap (rare), the later channel keeps the pixel.
    """
    mask = np.asarray(mask)
    h, w = mask.shape[:2]
    label = np.zeros((h, w), dtype=np.int32)
    types: dict[int, int] = {}
    next_id = 1
    for c in range(len(PANNUKE_TYPES)):
        ch = mask[:, :, c]
        if not ch.any():
            continue
        seq = relabel_sequential(np.rint(ch).astype(np.int64))
        n = int(seq.max())
        fg = seq > 0
        label[fg] = seq[fg] + (next_id - 1)
        types.update({next_id + k: c + 1 for k in range(n)})
        next_id += n
    return label, types


def _load(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise ConversionError(f"{path}: PanNuke {what} file not found")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError:  # object arrays (types.npy of strings saved as objects) need pickle
        return np.load(path, allow_pickle=True)
    except Exception as e:
        raise ConversionError(f"{path}: cannot read PanNuke {what} ({type(e).__name__}: {e})") from None


def convert_pannuke(images_npy: str | os.PathLike, masks_npy: str | os.PathLike, out: str | os.PathLike, *,
                    types_npy: str | os.PathLike | None = None, image_dir: str | os.PathLike | None = None,
                    keep_types: bool = False, prefix: str = "", show_progress: bool = True,
                    write: bool = True) -> dict[str, Any]:
    """Convert one PanNuke fold: write its images as PNG and its nuclei as COCO to ``out``.

    Args:
        types_npy: tissue names per image (organ); default: ``types.npy`` next to ``images_npy`` if present.
        image_dir: where to write the PNGs (default ``<out folder>/<out stem>_images``); must be under ``out``'s
            folder, since ``file_name`` is stored relative to it.
        keep_types: one category per nucleus type (:data:`PANNUKE_TYPES`, ids 1-5); else one ``nucleus`` category.
        prefix: prefix of the PNG names (``<prefix><index:05d>.png``).
        write: write the JSON to ``out`` (the PNGs are always written); False returns the document only.
    """
    images_npy, masks_npy, out = Path(images_npy), Path(masks_npy), Path(out)
    check_output_file(out)
    check_output_dir(Path(image_dir) if image_dir is not None else out.parent / f"{out.stem}_images",
                     "PanNuke image folder")
    images = _load(images_npy, "images")
    masks = _load(masks_npy, "masks")
    if images.ndim != 4 or images.shape[3] not in (3, 4):
        raise ConversionError(f"{images_npy}: expected N x H x W x 3 images, got shape {images.shape}")
    if masks.ndim != 4 or masks.shape[3] != 6:
        raise ConversionError(f"{masks_npy}: expected N x H x W x 6 masks (5 type channels + background), "
                              f"got shape {masks.shape}")
    if masks.shape[:3] != images.shape[:3]:
        raise ConversionError(f"{masks_npy}: masks {masks.shape[:3]} do not match images {images.shape[:3]} "
                              f"of {images_npy}")
    if types_npy is None and (images_npy.parent / "types.npy").is_file():
        types_npy = images_npy.parent / "types.npy"
    organs = None
    if types_npy is not None:
        organs = np.asarray(_load(Path(types_npy), "tissue types"))
        if organs.shape != (images.shape[0],):
            raise ConversionError(f"{types_npy}: {organs.shape} tissue types for {images.shape[0]} images")
    json_dir = out.parent.resolve()
    image_dir = Path(image_dir) if image_dir is not None else out.parent / f"{out.stem}_images"
    image_dir = image_dir.resolve()
    try:
        image_dir.relative_to(json_dir)
    except ValueError:
        raise ConversionError(f"{image_dir}: the PanNuke image folder must be under the JSON's folder {json_dir}") \
            from None
    image_dir.mkdir(parents=True, exist_ok=True)
    builder = CocoBuilder(PANNUKE_TYPES, image_root=json_dir, info={
        "source_format": "pannuke", "images": str(images_npy.resolve()), "annotations": str(masks_npy.resolve()),
        "channels": list(PANNUKE_TYPES) + ["background"]})
    import cv2

    n = images.shape[0]
    for i in progress(range(n), f"PanNuke {images_npy.parent.name}", total=n, enabled=show_progress):
        img = np.asarray(images[i])
        if np.issubdtype(img.dtype, np.floating):  # PanNuke stores 0-255 as float64
            img = np.clip(np.rint(np.nan_to_num(img)), 0, 255).astype(np.uint8)
        rgb = to_rgb_uint8(img, source=f"{images_npy}[{i}]")
        png = image_dir / f"{prefix}{i:05d}.png"

        def _write(tmp: Path, rgb: np.ndarray = rgb) -> None:
            if not cv2.imwrite(str(tmp), np.ascontiguousarray(rgb[:, :, ::-1])):
                raise OSError(f"{tmp}: cv2.imwrite failed")

        atomic_write(png, _write)
        label, types = pannuke_label_map(np.asarray(masks[i]))
        organ = str(organs[i]).strip().lower() if organs is not None else None
        builder.add_label_map(builder.file_name(png), label, organ=organ, types=types, pannuke_index=i)
    coco = builder.to_dict()
    coco["info"]["nuclei_d2"].pop("image_root", None)  # relative to the JSON's own folder, wherever it moves
    if not keep_types:
        coco = collapse_categories(coco)
    if write:
        write_coco(coco, out)
    return coco

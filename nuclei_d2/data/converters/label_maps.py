"""A folder of images + a folder of instance label maps (PNG / TIFF / NPY / MAT, 0 = background) -> COCO.

The most common way nuclei datasets are shared (Kumar/MoNuSeg label maps, CoNSeP, Lizard patches, the output of
any segmentation tool): image ``<stem>.<ext>`` and label map ``<stem><label_suffix>.<ext>``. Each non-zero value is
one nucleus; values need not be consecutive. With ``binary=True`` the label images are foreground masks (e.g. TNBC,
Naylor et al., IEEE TMI 2019) and nuclei are their 8-connected components.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...utils.io import ImageReadError, read_label_map
from .common import (
    ConversionError,
    build_from_label_maps,
    check_output_file,
    find_files_by_stem,
    find_metadata,
    load_organs,
    match_images,
    split_stems,
    write_coco,
)
from .mat import read_mat_label

__all__ = ["LABEL_SUFFIXES", "convert_label_maps", "read_any_label"]

#: Label map formats the label-map converter reads.
LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy", ".mat")


def read_any_label(path: str | os.PathLike, shape: tuple[int, int] | None = None, binary: bool = False,
                   mat_key: str | None = None) -> np.ndarray:
    """Read an instance label map (int32) of any supported format, checking it has ``shape`` when given.

    ``binary``: the file is a foreground mask (any non-zero value); nuclei are its 8-connected components.
    """
    path = Path(path)
    if path.suffix.lower() == ".mat":
        label, _ = read_mat_label(path, shape, key=mat_key)
    else:
        try:
            label = read_label_map(path, shape)
        except ImageReadError as e:
            raise ConversionError(str(e)) from None
    if binary:
        from scipy import ndimage

        label, _ = ndimage.label(label > 0, structure=np.ones((3, 3), dtype=bool))
        label = label.astype(np.int32)
    return label


def convert_label_maps(images: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike | None = None, *,
                       split_file: str | os.PathLike | None = None, splits: Sequence[str] | None = None,
                       stems: Sequence[str] | None = None,
                       metadata: str | os.PathLike | dict[str, Any] | None = None, organ: str | None = None,
                       image_root: str | os.PathLike | None = None, label_suffix: str = "", recursive: bool = False,
                       binary: bool = False, mat_key: str | None = None, verify_images: bool = False,
                       show_progress: bool = True) -> dict[str, Any]:
    """Convert images + instance label maps (matched by stem) to COCO.

    Args:
        images, labels: the two folders (may be the same folder when ``label_suffix`` tells the files apart).
        out: write the JSON here (atomically) if given.
        stems: convert exactly these image stems (instead of a split file).
        split_file, splits: convert only these splits (``"kumar2017/train"``; see :func:`common.select_split`).
        metadata: JSON with an organ per stem (default: ``metadata.json`` next to the images or one or two folders
            up, if present). ``organ``: organ of the images the metadata does not name (e.g. ``"breast"`` for TNBC).
        image_root: store ``file_name`` relative to this folder (default: absolute paths).
        label_suffix: label stems end with this (``"_label"``: ``a_label.png`` labels ``a.png``).
        recursive: search sub-folders of both folders too (stems must be unique).
        binary: label files are foreground masks; nuclei = 8-connected components.
        mat_key: variable holding the instance map in ``.mat`` label files.
        verify_images: decode every image (slower) instead of reading its header only.

    Returns:
        The COCO document. A label map with no nucleus gives an image with no annotations (kept).
    """
    if out is not None:
        check_output_file(out)
    stems = split_stems(split_file, splits, stems)
    if Path(images).resolve() == Path(labels).resolve() and not label_suffix:
        raise ConversionError(f"{images}: images and label maps share a folder; tell them apart with --label-suffix")
    found = find_files_by_stem(labels, LABEL_SUFFIXES, "label map", recursive=recursive, strip_suffix=label_suffix)
    pairs = match_images(images, found, "label map", stems=stems, recursive=recursive)
    meta = metadata if metadata is not None else find_metadata(images)
    info = {"source_format": "label_maps", "images": str(Path(images).resolve()),
            "annotations": str(Path(labels).resolve()), "split": list(splits or []), "binary": binary}

    def read(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, None]:
        return read_any_label(path, shape, binary=binary, mat_key=mat_key), None

    coco = build_from_label_maps(pairs, read, organs=load_organs(meta), organ=organ, image_root=image_root,
                                 info=info, verify_images=verify_images, show_progress=show_progress,
                                 desc="label maps")
    if out is not None:
        write_coco(coco, out)
    return coco

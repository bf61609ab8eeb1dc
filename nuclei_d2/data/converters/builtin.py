"""``prepare-builtin``: write the JSONs of the built-in datasets (:mod:`nuclei_d2.data.datasets.builtin`) from a
download, in exactly the layout the built-in registrations expect. One command per dataset family.

Images are not copied: image records point at the download by absolute path (PanNuke excepted: its images are
arrays, written as PNG under ``<root>/pannuke/fold<k>/``). Moving the download means running the command again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ...structures import label_values
from ..datasets.builtin import builtin_json_path, datasets_root
from ..datasets.protocols import KUMAR_SPLITS, MONUSEG2018_TILE_ORGAN
from .common import (
    ConversionError,
    build_from_label_maps,
    check_output_dir,
    collapse_categories,
    find_files_by_stem,
    natural_key,
    subset_coco,
    write_coco,
)
from .dsb2018 import convert_dsb2018
from .label_maps import LABEL_SUFFIXES, convert_label_maps, read_any_label
from .monuseg_xml import convert_monuseg_xml
from .pannuke import convert_pannuke

__all__ = ["PREPARERS", "prepare_builtin"]

logger = logging.getLogger("nuclei_d2.data.converters")


def _first_dir(*cands: Path) -> Path | None:
    return next((c for c in cands if c.is_dir()), None)


def prepare_monuseg2018(source: str | os.PathLike, root: str | os.PathLike | None = None,
                        test_source: str | os.PathLike | None = None, from_xml: bool = False,
                        rasterize: str | None = None, show_progress: bool = True) -> list[Path]:
    """``monuseg2018_train`` (30 tiles), the Kumar split (``kumar_train``, ``kumar_test_same``, ``kumar_test_diff``,
    ``kumar_test``) and, with ``test_source``, ``monuseg2018_test`` (14 challenge test tiles).

    ``source`` is either ``../shared/data/monuseg2018`` (``train/images`` + ``train/labels`` label maps, used as
    they are) or the official training download (``Tissue Images/*.tif`` + ``Annotations/*.xml``, rasterized);
    ``from_xml`` forces the XMLs. ``test_source`` is the official test download (``*.tif`` and ``*.xml`` side by side).
    ``rasterize``: how XML polygons become pixels (``"centers"``, the default, or ``"fill-poly"``; docs/data.md);
    asking for it when no XML is rasterized is an error rather than being ignored.
    """
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(f"{source}: MoNuSeg folder not found")
    nested = source / "MoNuSeg 2018 Training Data"
    images = _first_dir(source / "train" / "images", source / "images", source / "Tissue Images",
                        nested / "Tissue Images")
    labels = _first_dir(source / "train" / "labels", source / "labels")
    xmls = _first_dir(source / "train" / "annotations_xml", source / "annotations_xml", source / "Annotations",
                      nested / "Annotations")
    if images is None:
        raise ConversionError(f"{source}: no image folder (train/images, images or 'Tissue Images') found")
    stems = list(MONUSEG2018_TILE_ORGAN)
    if labels is not None and not from_xml:
        if rasterize is not None and test_source is None:
            raise ConversionError(f"{labels}: the training tiles come as label maps here, so --rasterize would change "
                                  "nothing; add --from-xml to rasterize the XMLs")
        if rasterize is not None:
            logger.warning("%s: training tiles from label maps; --rasterize %s applies to the test XMLs only", labels,
                           rasterize)
        coco = convert_label_maps(images, labels, stems=stems, metadata=MONUSEG2018_TILE_ORGAN,
                                  show_progress=show_progress)
    elif xmls is not None:
        coco = convert_monuseg_xml(images, xmls, stems=stems, metadata=MONUSEG2018_TILE_ORGAN,
                                   rasterize=rasterize or "centers", show_progress=show_progress)
    else:
        raise ConversionError(f"{source}: no label maps (train/labels) or XML annotations (Annotations) found")
    written = [write_coco(coco, builtin_json_path("monuseg2018_train", root))]
    for name, split in KUMAR_SPLITS.items():
        written.append(write_coco(subset_coco(coco, split, note=f"kumar2017 protocol: {name}"),
                                  builtin_json_path(name, root)))
    if test_source is not None:
        test = convert_monuseg_xml(test_source, test_source, rasterize=rasterize or "centers",
                                   show_progress=show_progress)
        written.append(write_coco(test, builtin_json_path("monuseg2018_test", root)))
    return written


def prepare_dsb2018(source: str | os.PathLike, root: str | os.PathLike | None = None,
                    allow_unlabelled: bool = False, show_progress: bool = True) -> list[Path]:
    """``dsb2018_stage1_train`` / ``dsb2018_stage1_test`` from a folder holding ``stage1_train/`` and/or
    ``stage1_test/`` in the Kaggle layout (``../shared/data/dsb2018_brightfield`` or the full download)."""
    source = Path(source)
    written = []
    for stage in ("stage1_train", "stage1_test"):
        if (source / stage).is_dir():
            coco = convert_dsb2018(source / stage, allow_unlabelled=allow_unlabelled, show_progress=show_progress)
            written.append(write_coco(coco, builtin_json_path(f"dsb2018_{stage}", root)))
    if not written:
        raise ConversionError(f"{source}: neither stage1_train/ nor stage1_test/ found")
    return written


def prepare_cpm17(source: str | os.PathLike, root: str | os.PathLike | None = None,
                  show_progress: bool = True) -> list[Path]:
    """``cpm17_train`` / ``cpm17_test`` from the CPM-17 folder as distributed with HoVer-Net
    (``{train,test}/Images/*.png`` + ``{train,test}/Labels/*.mat`` with ``inst_map``; label PNG/TIFF also work)."""
    source = Path(source)
    written = []
    for split in ("train", "test"):
        images = _first_dir(source / split / "Images", source / split / "images")
        labels = _first_dir(source / split / "Labels", source / split / "labels")
        if images is None or labels is None:
            raise ConversionError(f"{source / split}: expected Images/ and Labels/ folders")
        coco = convert_label_maps(images, labels, show_progress=show_progress)
        written.append(write_coco(coco, builtin_json_path(f"cpm17_{split}", root)))
    return written


def prepare_tnbc(source: str | os.PathLike, root: str | os.PathLike | None = None,
                 show_progress: bool = True) -> list[Path]:
    """``tnbc`` (Naylor et al., IEEE TMI 2019; breast) from ``Slide_XX/*.png`` + ``GT_XX/*.png``.

    Ground-truth images with only two values are foreground masks: their nuclei are 8-connected components; images
    with more values are taken as instance label maps.
    """
    source = Path(source)
    slides = sorted((p for p in source.glob("Slide_*") if p.is_dir()), key=lambda p: natural_key(p.name))
    if not slides:
        raise ConversionError(f"{source}: no Slide_XX folders found")
    pairs = []
    for slide in slides:
        gt = source / slide.name.replace("Slide_", "GT_", 1)
        labels = find_files_by_stem(gt, LABEL_SUFFIXES, "ground-truth")
        images = find_files_by_stem(slide, (".png", ".tif", ".tiff", ".jpg"), "image")
        missing = sorted(set(labels) - set(images))
        if missing:
            raise ConversionError(f"{gt}: no image in {slide} for {', '.join(missing)}")
        pairs += [(s, images[s], labels[s]) for s in sorted(labels, key=natural_key)]

    def read(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, None]:
        from scipy import ndimage

        label = read_any_label(path, shape)
        if label_values(label).size <= 1:  # a foreground mask (0/1 or 0/255): nuclei = 8-connected components
            label = ndimage.label(label > 0, structure=np.ones((3, 3), dtype=bool))[0].astype(np.int32)
        return label, None

    coco = build_from_label_maps(pairs, read, organ="breast", info={"source_format": "tnbc",
                                                                   "images": str(source.resolve())},
                                 show_progress=show_progress, desc="TNBC")
    return [write_coco(coco, builtin_json_path("tnbc", root))]


def _find_fold(source: Path, k: int, filename: str) -> Path | None:
    hits = [p for p in source.rglob(filename) if f"fold{k}" in str(p.relative_to(source)).lower().replace(" ", "")]
    return sorted(hits)[0] if hits else None


def prepare_pannuke(source: str | os.PathLike, root: str | os.PathLike | None = None,
                    show_progress: bool = True) -> list[Path]:
    """``pannuke_fold{1,2,3}`` (one ``nucleus`` category) and ``pannuke_fold{k}_types`` (5 types) from the PanNuke
    download (``Fold 1/images/fold1/images.npy``, ``Fold 1/masks/fold1/masks.npy``, ...). PNGs go to
    ``<root>/pannuke/fold<k>/``."""
    source = Path(source)
    written = []
    for k in (1, 2, 3):
        images, masks = _find_fold(source, k, "images.npy"), _find_fold(source, k, "masks.npy")
        if images is None or masks is None:
            logger.warning("%s: PanNuke fold %d not found (images.npy and masks.npy under a 'fold%d' folder)",
                           source, k, k)
            continue
        out_types = builtin_json_path(f"pannuke_fold{k}_types", root)
        typed = convert_pannuke(images, masks, out_types, image_dir=out_types.parent / f"fold{k}", keep_types=True,
                                show_progress=show_progress, write=False)
        written.append(write_coco(typed, out_types))
        written.append(write_coco(collapse_categories(typed), builtin_json_path(f"pannuke_fold{k}", root)))
    if not written:
        raise ConversionError(f"{source}: no PanNuke fold found")
    return written


#: ``prepare-builtin`` families: name -> function(source, root, **options) -> written JSON paths.
PREPARERS: dict[str, Callable[..., list[Path]]] = {
    "monuseg2018": prepare_monuseg2018,
    "dsb2018": prepare_dsb2018,
    "cpm17": prepare_cpm17,
    "tnbc": prepare_tnbc,
    "pannuke": prepare_pannuke,
}


def prepare_builtin(family: str, source: str | os.PathLike, root: str | os.PathLike | None = None,
                    **options: Any) -> list[Path]:
    """Write the built-in JSONs of ``family`` (one of :data:`PREPARERS`) from ``source`` under the datasets root."""
    if family not in PREPARERS:
        raise ConversionError(f"unknown dataset family {family!r}; choose one of {', '.join(PREPARERS)}")
    check_output_dir(datasets_root(root), "datasets root")
    logger.info("preparing %s from %s into %s", family, source, datasets_root(root))
    return PREPARERS[family](source, root, **options)

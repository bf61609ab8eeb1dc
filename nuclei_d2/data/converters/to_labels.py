"""COCO JSON -> a folder of instance label maps (the reverse conversion), so every tool can work on either.

Label ``k`` of image ``<stem>`` is the ``k``-th annotation of that image in file order (painted in order: where
annotations overlap the later one wins, and the overlap is reported). Converting a label map to COCO with these
converters and back gives the same instances, numbered 1..N in increasing original label.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ...structures import annotations_to_label_map
from ..io import write_label_map
from .common import ConversionError, progress

__all__ = ["coco_to_label_maps", "load_coco_json"]

logger = logging.getLogger("nuclei_d2.data.converters")


def load_coco_json(json_file: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check a COCO instance-segmentation JSON; errors name the file and the problem."""
    json_file = Path(json_file)
    try:
        with open(json_file) as f:
            coco = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{json_file}: COCO JSON not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{json_file}: not valid JSON ({e})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise ConversionError(f"{json_file}: not a COCO JSON (no 'images' list)")
    coco.setdefault("annotations", [])
    coco.setdefault("categories", [])
    for img in coco["images"]:
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise ConversionError(f"{json_file}: image record {img.get('id', '?')} has no {key!r}")
    return coco


def coco_to_label_maps(json_file: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "png",
                       type_dir: str | os.PathLike | None = None, show_progress: bool = True) -> list[Path]:
    """Write one label map per image of ``json_file`` to ``out_dir/<stem>.<fmt>``.

    Args:
        fmt: ``png`` (uint16, up to 65,535 nuclei per image), ``tif`` or ``npy`` (int32).
        type_dir: if given, also write category maps there (pixel = COCO category id of its nucleus, 0 = background).

    Crowd annotations (``iscrowd`` 1) are not nuclei instances and are skipped. Returns the label map paths.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("png", "tif", "tiff", "npy"):
        raise ConversionError(f"unsupported label map format {fmt!r}; use png, tif or npy")
    coco = load_coco_json(json_file)
    by_image: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for anno in coco["annotations"]:
        by_image[anno["image_id"]].append(anno)
    stems: dict[str, Any] = {}
    for img in coco["images"]:
        stem = Path(img["file_name"]).stem
        if stem in stems:
            raise ConversionError(f"{json_file}: images {stems[stem]} and {img['id']} share the file stem {stem!r}; "
                                  "label maps are named by stem")
        stems[stem] = img["id"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    n_crowd = 0
    for img in progress(coco["images"], "COCO -> label maps", total=len(coco["images"]), enabled=show_progress):
        h, w = int(img["height"]), int(img["width"])
        annos = [a for a in by_image.get(img["id"], []) if not a.get("iscrowd", 0)]
        n_crowd += len(by_image.get(img["id"], [])) - len(annos)
        try:
            label = annotations_to_label_map(annos, h, w)
        except (ValueError, TypeError, KeyError) as e:
            raise ConversionError(f"{json_file}: image {img['id']} ({img['file_name']}): {e}") from None
        _report_overlap(annos, label, json_file, img)
        stem = Path(img["file_name"]).stem
        written.append(write_label_map(out_dir / f"{stem}.{fmt}", label))
        if type_dir is not None:
            cats = np.zeros(len(annos) + 1, dtype=np.int32)
            cats[1:] = [int(a["category_id"]) for a in annos]
            write_label_map(Path(type_dir) / f"{stem}.{fmt}", cats[label])
    if n_crowd:
        logger.warning("%s: %d crowd annotation(s) skipped", json_file, n_crowd)
    return written


def _report_overlap(annos: list[dict[str, Any]], label: np.ndarray, json_file: Any, img: dict[str, Any]) -> None:
    # RLE areas are pixel counts (polygon areas are not), so a sum above the painted pixels means overlap.
    if not annos or not all(isinstance(a["segmentation"], dict) and "area" in a for a in annos):
        return
    total = sum(float(a["area"]) for a in annos)
    painted = int(np.count_nonzero(label))
    if total > painted + 0.5:
        logger.warning("%s: image %s: annotations overlap on about %d pixel(s); the later annotation keeps them",
                       json_file, img["file_name"], int(total - painted))

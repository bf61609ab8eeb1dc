"""COCO JSON -> a folder of instance label maps (the reverse conversion), so every tool can work on either.

Label ``k`` of image ``<stem>`` is the ``k``-th annotation of that image in file order (painted in order: where
annotations overlap the later one wins, and the overlap is reported). Converting a label map to COCO with these
converters and back gives the same instances, numbered 1..N in increasing original label.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ...structures import annotations_to_label_map, rle_counts
from ...utils.io import _umask, read_json, write_label_map
from .common import ConversionError, check_output_dir, progress

__all__ = ["coco_to_label_maps", "load_coco_json", "validate_coco"]

logger = logging.getLogger("nuclei_d2.data.converters")


def load_coco_json(json_file: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check a COCO instance-segmentation JSON; errors name the file and the problem."""
    json_file = Path(json_file)
    coco = read_json(json_file, "COCO JSON", error=ConversionError, missing=ConversionError)
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise ConversionError(f"{json_file}: not a COCO JSON (no 'images' list)")
    coco.setdefault("annotations", [])
    coco.setdefault("categories", [])
    if not isinstance(coco["annotations"], list):
        raise ConversionError(f"{json_file}: 'annotations' is not a list")
    for img in coco["images"]:
        if not isinstance(img, dict):
            raise ConversionError(f"{json_file}: an image record is not a JSON object: {str(img)[:60]}")
        for key in ("id", "file_name", "height", "width"):
            if key not in img:
                raise ConversionError(f"{json_file}: image record {img.get('id', '?')} has no {key!r}")
    return coco


def _rle_problem(segm: dict[str, Any], h: int, w: int) -> tuple[str | None, list[int] | None]:
    """Why an RLE does not decode to an ``h x w`` mask (None if it does), and its run lengths."""
    size = segm.get("size")
    if size is not None:
        try:
            hw = (int(size[0]), int(size[1]))
        except (TypeError, ValueError, IndexError):
            return f"RLE size {size!r} is not [height, width]", None
        if hw != (h, w):
            return f"RLE size {hw[0]}x{hw[1]} differs from the image's {h}x{w}", None
    if not isinstance(segm.get("counts"), (str, bytes, list)):
        return "RLE has no 'counts' string or list", None
    try:
        counts = rle_counts(segm)
    except (IndexError, TypeError, ValueError, UnicodeDecodeError):
        return "RLE counts do not decode", None
    if any(c < 0 for c in counts):
        return "RLE counts do not decode (negative run length)", None
    if sum(counts) != h * w:
        return f"RLE covers {sum(counts):,} pixels, not the image's {h}x{w} = {h * w:,}", None
    return None, counts


def _polygon_problem(segm: list[Any]) -> str | None:
    for poly in segm:
        if not isinstance(poly, list) or len(poly) < 6 or len(poly) % 2:
            return "a polygon is not a list of at least 3 x, y pairs"
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in poly):
            return "a polygon has a non-numeric or non-finite coordinate"
    return None


def validate_coco(coco: dict[str, Any], need_categories: bool = False
                  ) -> tuple[list[str], dict[Any, list[dict[str, Any]]]]:
    """Check a whole COCO document before anything is written: image ids unique, sizes positive integers, file stems
    unique, every annotation on a known image with a segmentation that decodes to that image's size.

    Returns ``(problems, by_image)``: every problem found (in file order, one short sentence each) and the non-crowd
    annotations per image id, their RLEs replaced by decoded run lengths (so painting does not decode twice).
    """
    problems: list[str] = []
    sizes: dict[Any, tuple[int, int]] = {}
    where: dict[Any, int] = {}
    stems: dict[str, Any] = {}
    for k, img in enumerate(coco["images"]):
        iid = img["id"]
        label = f"image {iid!r} (#{k + 1} of 'images')"
        if not isinstance(iid, (int, str)) or isinstance(iid, bool):
            problems.append(f"{label}: id must be an integer or a string")
            continue
        if iid in where:
            problems.append(f"{label}: id {iid!r} is also the id of image #{where[iid] + 1}; image ids must be unique")
            continue
        where[iid] = k
        try:
            h, w = int(img["height"]), int(img["width"])
            if h != img["height"] or w != img["width"] or h <= 0 or w <= 0:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"{label}: height {img['height']!r} / width {img['width']!r} are not positive integers")
            continue
        sizes[iid] = (h, w)
        if not isinstance(img["file_name"], str) or not img["file_name"]:
            problems.append(f"{label}: file_name {img['file_name']!r} is not a file name")
            continue
        stem = Path(img["file_name"]).stem
        if stem in stems:
            problems.append(f"{label}: file stem {stem!r} is also that of image {stems[stem]!r}; label maps are "
                            "named by stem")
        stems[stem] = iid
    by_image: dict[Any, list[dict[str, Any]]] = {iid: [] for iid in sizes}
    for k, anno in enumerate(coco["annotations"]):
        if not isinstance(anno, dict):
            problems.append(f"annotation #{k + 1}: not a JSON object")
            continue
        label = f"annotation {anno['id']!r} (#{k + 1} of 'annotations')" if "id" in anno else f"annotation #{k + 1}"
        if "image_id" not in anno:
            problems.append(f"{label}: no image_id")
            continue
        iid = anno["image_id"]
        if not isinstance(iid, (int, str)) or isinstance(iid, bool) or iid not in where:
            problems.append(f"{label}: image_id {iid!r} is not the id of any image")
            continue
        if iid not in sizes:  # the image itself is broken: reported above
            continue
        if anno.get("iscrowd", 0):
            continue
        h, w = sizes[iid]
        segm = anno.get("segmentation")
        if isinstance(segm, dict):
            problem, counts = _rle_problem(segm, h, w)
            if counts is not None:
                anno = {**anno, "segmentation": {"size": [h, w], "counts": counts}}
        elif isinstance(segm, list):
            problem = _polygon_problem(segm)
        else:
            problem = "no segmentation" if segm is None else f"unsupported segmentation ({type(segm).__name__})"
        if problem is None and need_categories:
            cat = anno.get("category_id")
            if not isinstance(cat, int) or isinstance(cat, bool) or cat < 0:
                problem = f"category_id {cat!r} is not a non-negative integer"
        if problem is not None:
            problems.append(f"{label} of image {iid!r}: {problem}")
            continue
        by_image[iid].append(anno)
    return problems, by_image


def problems_message(source: Any, problems: list[str]) -> str:
    """One line: the source, the first problem, and how many more there are."""
    more = f" (and {len(problems) - 1} more problem(s) in the file)" if len(problems) > 1 else ""
    return f"{source}: {problems[0]}{more}"


class _Staging:
    """Write files into a hidden temporary folder, then move them into ``target`` only when all succeeded.

    If ``target`` does not exist, the staging folder is its sibling and is renamed to it at the end (atomic); if it
    exists, the staging folder is inside it and files are moved in one by one (replacing files of the same name,
    never deleting others). Any failure removes the staging folder and what it created.
    """

    def __init__(self, target: Path) -> None:
        self.target = target
        self.created: list[Path] = []
        if target.is_dir():
            self.folder = Path(tempfile.mkdtemp(prefix=".to-labels.tmp-", dir=target))
        else:
            missing = []
            cand = target.parent
            while not cand.exists():
                missing.append(cand)
                cand = cand.parent
            for d in reversed(missing):
                d.mkdir()
                self.created.append(d)
            self.folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))

    def commit(self) -> None:
        if not self.target.exists():
            os.chmod(self.folder, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
            os.replace(self.folder, self.target)
            return
        for f in sorted(self.folder.iterdir()):
            os.replace(f, self.target / f.name)
        self.folder.rmdir()

    def abort(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()


def coco_to_label_maps(json_file: str | os.PathLike, out_dir: str | os.PathLike, fmt: str = "png",
                       type_dir: str | os.PathLike | None = None, show_progress: bool = True) -> list[Path]:
    """Write one label map per image of ``json_file`` to ``out_dir/<stem>.<fmt>``, all or nothing.

    Args:
        fmt: ``png`` (uint16, up to 65,535 nuclei per image), ``tif`` or ``npy`` (int32).
        type_dir: if given, also write category maps there (pixel = COCO category id of its nucleus, 0 = background).

    The output folders are checked first and the whole file is validated (:func:`validate_coco`) before anything is
    painted; the maps are written to a temporary folder and moved into ``out_dir`` only when every one succeeded, so
    an error leaves ``out_dir`` as it was (files already there are only replaced by maps of the same name). Crowd
    annotations (``iscrowd`` 1) are not nuclei instances and are skipped. Returns the label map paths.
    """
    fmt = fmt.lower().lstrip(".")
    if fmt not in ("png", "tif", "tiff", "npy"):
        raise ConversionError(f"unsupported label map format {fmt!r}; use png, tif or npy")
    out_dir = check_output_dir(out_dir, "label map folder")
    if type_dir is not None:
        type_dir = check_output_dir(type_dir, "type map folder")
        if type_dir == out_dir:
            raise ConversionError(f"{type_dir}: the type maps need another folder than the label maps")
    coco = load_coco_json(json_file)
    problems, by_image = validate_coco(coco, need_categories=type_dir is not None)
    if problems:
        raise ConversionError(problems_message(json_file, problems))
    n_crowd = sum(1 for a in coco["annotations"] if a.get("iscrowd", 0))
    written = [out_dir / f"{Path(img['file_name']).stem}.{fmt}" for img in coco["images"]]
    stages = [_Staging(out_dir)]
    try:
        if type_dir is not None:
            stages.append(_Staging(Path(type_dir)))
        for img in progress(coco["images"], "COCO -> label maps", total=len(coco["images"]), enabled=show_progress):
            h, w = int(img["height"]), int(img["width"])
            annos = by_image[img["id"]]
            try:
                label = annotations_to_label_map(annos, h, w)
            except (ValueError, TypeError, KeyError) as e:
                raise ConversionError(f"{json_file}: image {img['id']!r} ({img['file_name']}): {e}") from None
            _report_overlap(annos, label, json_file, img)
            stem = Path(img["file_name"]).stem
            try:
                write_label_map(stages[0].folder / f"{stem}.{fmt}", label)
            except ValueError as e:  # more nuclei than a PNG holds
                raise ConversionError(f"{json_file}: image {img['id']!r}: {e}") from None
            if type_dir is not None:
                cats = np.zeros(len(annos) + 1, dtype=np.int32)
                cats[1:] = [int(a["category_id"]) for a in annos]
                write_label_map(stages[1].folder / f"{stem}.{fmt}", cats[label])
        for stage in stages:
            stage.commit()
    except BaseException:
        for stage in stages:
            stage.abort()
        raise
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

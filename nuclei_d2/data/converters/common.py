"""What every converter shares: the COCO document it builds, split and organ selection, and file matching.

The output of every converter is one COCO instance-segmentation JSON (Lin et al., ECCV 2014, "Microsoft COCO",
annotation format section) with these conventions:

* ``categories``: ``[{"id": 1, "name": "nucleus"}]``, or one entry per nucleus type (ids 1..K) when types are kept;
* ``images``: ``id`` (1..N in natural stem order), ``file_name`` (absolute, or relative to an ``image_root``),
  ``height``, ``width``, and ``organ`` where known;
* ``annotations``: ``segmentation`` as compressed RLE (pycocotools), ``bbox`` XYWH, ``area``, ``iscrowd`` 0, made by
  :func:`nuclei_d2.structures.label_map_to_annotations` from a non-overlapping instance label map, so the
  annotations of one image never overlap and label map -> COCO -> label map is exact;
* ``info.nuclei_d2``: how the file was made (format, sources, split, conventions), for provenance.

Images with no nuclei stay in ``images`` with no annotations: evaluation must see them (false positives count).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ...structures import label_map_to_annotations
from ...utils.io import IMAGE_SUFFIXES, nearest_existing, probe_writable, read_json, write_json_atomic
from ...utils.io import check_output_dir as _check_output_dir

__all__ = [
    "ConversionError",
    "CocoBuilder",
    "check_image_file",
    "check_output_dir",
    "check_output_file",
    "collapse_categories",
    "find_files_by_stem",
    "load_organs",
    "match_images",
    "natural_key",
    "progress",
    "read_image_header",
    "read_split_file",
    "select_split",
    "split_stems",
    "subset_coco",
    "write_coco",
]

logger = logging.getLogger("nuclei_d2.data.converters")

NUCLEUS = "nucleus"


class ConversionError(ValueError):
    """A dataset could not be converted. The message names the file and the problem."""


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``a_2`` before ``a_10`` (numbers compared as numbers)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def progress(iterable: Iterable[Any], desc: str, total: int | None = None, enabled: bool = True) -> Iterable[Any]:
    """A tqdm progress bar on stderr (silent when ``enabled`` is False)."""
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, total=total, disable=not enabled, unit="img", dynamic_ncols=True)


class CocoBuilder:
    """Accumulates image records and annotations into one COCO document with 1-based ids.

    Args:
        categories: category names; their ids are 1..K in this order (COCO ids start at 1).
        image_root: if given, ``file_name`` is stored relative to this folder (images must lie under it);
            otherwise absolute paths are stored.
        info: extra provenance stored under ``info.nuclei_d2``.
    """

    def __init__(self, categories: Sequence[str] = (NUCLEUS,), image_root: str | os.PathLike | None = None,
                 info: dict[str, Any] | None = None) -> None:
        if not categories:
            raise ValueError("at least one category is needed")
        self.categories = [{"id": i, "name": str(n), "supercategory": NUCLEUS} for i, n in enumerate(categories, 1)]
        self.image_root = Path(os.path.abspath(image_root)) if image_root is not None else None
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []
        self.info = dict(info or {})

    def file_name(self, path: str | os.PathLike) -> str:
        """The ``file_name`` stored for an image at ``path`` (absolute, or relative to ``image_root``)."""
        path = Path(os.path.abspath(path))  # absolute, symlinks kept (a mount point may move; its link not)
        if self.image_root is None:
            return str(path)
        try:
            return path.relative_to(self.image_root).as_posix()
        except ValueError:
            raise ConversionError(f"{path}: image is not under --image-root {self.image_root}") from None

    def add_image(self, file_name: str, height: int, width: int, annotations: Sequence[dict[str, Any]] = (),
                  organ: str | None = None, **extra: Any) -> int:
        """Add one image and its annotations (``label_map_to_annotations`` dicts, 1-based category ids).

        Returns the new image id.
        """
        image_id = len(self.images) + 1
        record: dict[str, Any] = {"id": image_id, "file_name": file_name, "height": int(height), "width": int(width)}
        if organ:
            record["organ"] = str(organ)
        record.update({k: v for k, v in extra.items() if v is not None})
        self.images.append(record)
        n_cat = len(self.categories)
        for anno in annotations:
            cat = int(anno.get("category_id", 1))
            if not 1 <= cat <= n_cat:
                raise ConversionError(f"{file_name}: category id {cat} outside 1..{n_cat}")
            self.annotations.append({
                "id": len(self.annotations) + 1,
                "image_id": image_id,
                "category_id": cat,
                "segmentation": anno["segmentation"],
                "area": float(anno["area"]),
                "bbox": [float(v) for v in anno["bbox"]],
                "iscrowd": 0,
            })
        return image_id

    def add_label_map(self, file_name: str, label: np.ndarray, organ: str | None = None,
                      types: dict[int, int] | None = None, **extra: Any) -> int:
        """Add an image whose nuclei are the instances of ``label`` (``types``: label value -> category id)."""
        annos = label_map_to_annotations(label, category_id=1, categories=types)
        h, w = np.asarray(label).shape
        return self.add_image(file_name, h, w, annos, organ=organ, **extra)

    def to_dict(self) -> dict[str, Any]:
        info = {
            "description": "nuclei instance segmentation (COCO format), made by nuclei_d2 convert_dataset",
            "date_created": datetime.datetime.now().isoformat(timespec="seconds"),
            "nuclei_d2": self.info,
        }
        if self.image_root is not None:
            info["nuclei_d2"] = {**self.info, "image_root": str(self.image_root)}
        return {"info": info, "licenses": [], "images": self.images, "annotations": self.annotations,
                "categories": self.categories}


def collapse_categories(coco: dict[str, Any], name: str = NUCLEUS) -> dict[str, Any]:
    """A copy of ``coco`` with every annotation in one category (id 1, ``name``); e.g. PanNuke without types."""
    out = dict(coco)
    out["categories"] = [{"id": 1, "name": name, "supercategory": NUCLEUS}]
    out["annotations"] = [{**a, "category_id": 1} for a in coco["annotations"]]
    info = dict(coco.get("info", {}))
    info["nuclei_d2"] = {**info.get("nuclei_d2", {}), "types_collapsed": [c["name"] for c in coco["categories"]]}
    out["info"] = info
    return out


def write_coco(coco: dict[str, Any], out: str | os.PathLike) -> Path:
    """Write a COCO document atomically (temp file + rename: a failure leaves an existing ``out`` untouched)."""
    out = Path(out)
    if out.suffix.lower() != ".json":
        raise ConversionError(f"{out}: the output must be a .json file")
    path = write_json_atomic(out, coco)
    logger.info("wrote %s: %d images, %d annotations", path, len(coco["images"]), len(coco["annotations"]))
    return path


# ---- output locations: checked before any work -----------------------------------------------------------------

def check_output_file(path: str | os.PathLike, what: str = "output", suffix: str | None = ".json") -> Path:
    """Check, before any work, that the file ``path`` can be written (its folder exists or can be created, and
    accepts new files); raises :class:`ConversionError` naming the path otherwise. Creates nothing."""
    path = Path(os.path.abspath(path))
    try:
        if path.is_dir():
            raise ConversionError(f"{path}: the {what} is an existing folder; give a file name")
        if suffix is not None and path.suffix.lower() != suffix:
            raise ConversionError(f"{path}: the {what} must be a {suffix} file")
        base = nearest_existing(path.parent)
        if not base.is_dir():
            raise ConversionError(f"{path}: cannot create the {what}: {base} is a file, not a folder")
    except OSError as e:
        raise ConversionError(f"{path}: cannot check the {what} location: {e.strerror or e}") from None
    probe_writable(base, path, what, ConversionError)
    return path


def check_output_dir(path: str | os.PathLike, what: str = "output folder") -> Path:
    """:func:`nuclei_d2.utils.io.check_output_dir` raising :class:`ConversionError`."""
    return _check_output_dir(path, what, ConversionError)


# ---- images: header, truncation check, full decoding -------------------------------------------------------------

@contextlib.contextmanager
def _quiet_tifffile() -> Any:
    # tifffile logs "invalid offset to first page" for a cut file before failing; our error says it in one line
    tlog = logging.getLogger("tifffile")
    level = tlog.level
    tlog.setLevel(logging.ERROR)
    try:
        yield
    finally:
        tlog.setLevel(level)


def check_image_file(path: str | os.PathLike) -> None:
    """Refuse a truncated TIFF cheaply: every strip or tile that a page indexes (offset + byte count) must lie
    inside the file. Reads the page directories only (~0.5 ms a MoNuSeg tile, vs ~30 ms to decode it: docs/data.md).
    Other formats pass (their headers are checked by :func:`nuclei_d2.utils.io.read_image_size`)."""
    path = Path(path)
    if path.suffix.lower() not in (".tif", ".tiff"):
        return
    import tifffile

    try:
        size = path.stat().st_size
        with _quiet_tifffile(), tifffile.TiffFile(path) as tf:
            if not len(tf.pages):
                raise ConversionError(f"{path}: truncated or damaged TIFF: no readable image page")
            for index, page in enumerate(tf.pages):
                ends = [int(o) + int(n) for o, n in zip(page.dataoffsets, page.databytecounts) if n]
                if ends and max(ends) > size:
                    raise ConversionError(f"{path}: truncated TIFF: page {index} needs {max(ends):,} bytes but the "
                                          f"file has {size:,}")
    except ConversionError:
        raise
    except Exception as e:  # tifffile raises many types for damaged files
        raise ConversionError(f"{path}: cannot read TIFF header ({type(e).__name__}: {e})") from None


def read_image_header(path: str | os.PathLike, verify: bool = False) -> tuple[int, int]:
    """``(height, width)`` of an image: from its header, refusing truncated TIFFs (:func:`check_image_file`), or,
    with ``verify``, by decoding every pixel (catches any damage, ~60x slower on MoNuSeg tiles)."""
    from ...utils.io import ImageReadError, read_image_rgb, read_image_size

    try:
        if verify:
            with _quiet_tifffile():
                return tuple(read_image_rgb(path).shape[:2])  # type: ignore[return-value]
        check_image_file(path)
        with _quiet_tifffile():
            return read_image_size(path)
    except ImageReadError as e:
        raise ConversionError(str(e)) from None


# ---- finding files -------------------------------------------------------------------------------------------------

def find_files_by_stem(folder: str | os.PathLike, suffixes: Sequence[str], what: str, recursive: bool = False,
                       strip_suffix: str = "", exclude: set[Path] | None = None) -> dict[str, Path]:
    """``{stem: path}`` of the files in ``folder`` whose suffix is in ``suffixes`` (case-insensitive).

    Args:
        what: what the files are (for error messages), e.g. "image" or "label map".
        recursive: also search sub-folders (stems must then be unique across them).
        strip_suffix: remove this ending from stems (e.g. ``"_mask"`` so ``a_mask.png`` matches image ``a.png``).
        exclude: paths to ignore (label files sharing a folder with their images).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: {what} folder not found")
    suffixes = tuple(s.lower() for s in suffixes)
    found: dict[str, Path] = {}
    paths = folder.rglob("*") if recursive else folder.iterdir()
    for p in sorted(paths):
        if not p.is_file() or p.name.startswith(".") or p.suffix.lower() not in suffixes:
            continue
        if exclude and p in exclude:
            continue
        stem = p.stem
        if strip_suffix:
            if not stem.endswith(strip_suffix):
                continue
            stem = stem[: -len(strip_suffix)]
        if stem in found:
            raise ConversionError(f"{folder}: two {what} files have the stem {stem!r}: {found[stem]} and {p}")
        found[stem] = p
    if not found:
        raise ConversionError(f"{folder}: no {what} files ({', '.join(suffixes)}) found")
    return found


# ---- splits and organs -------------------------------------------------------------------------------------------

def read_split_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a split file: JSON mapping split names to lists of stems, possibly nested (see :func:`select_split`)."""
    path = Path(path)
    data = read_json(path, "split file", error=ConversionError, missing=ConversionError)
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: a split file must hold a JSON object of split name -> list of image stems")
    return data


def _split_names(data: dict[str, Any], prefix: str = "") -> list[str]:
    names = []
    for k, v in data.items():
        if k.startswith("_"):
            continue
        if isinstance(v, list):
            names.append(prefix + k)
        elif isinstance(v, dict):
            names.extend(_split_names(v, prefix + k + "/"))
    return names


def select_split(split_file: str | os.PathLike, splits: Sequence[str]) -> list[str]:
    """Stems of the union of ``splits`` in ``split_file``, in file order, without duplicates.

    A split is named by its path of keys joined with ``/``: with ``{"kumar2017": {"train": [...]}}``,
    ``"kumar2017/train"``. Keys starting with ``_`` (e.g. ``_notes``) are comments.
    """
    data = read_split_file(split_file)
    stems: list[str] = []
    for split in splits:
        node: Any = data
        for key in split.split("/"):
            if not isinstance(node, dict) or key not in node:
                raise ConversionError(f"{split_file}: no split {split!r}; available: {', '.join(_split_names(data))}")
            node = node[key]
        if not isinstance(node, list) or not all(isinstance(s, str) for s in node):
            raise ConversionError(f"{split_file}: split {split!r} is not a list of image stems; available: "
                                  f"{', '.join(_split_names(data))}")
        stems.extend(node)
    return list(dict.fromkeys(stems))


def load_organs(metadata: str | os.PathLike | dict[str, Any] | None) -> dict[str, str]:
    """``{stem: organ}`` from a metadata JSON file (or dict).

    Accepted layouts: ``{stem: "organ"}``, ``{stem: {"organ": ...}}`` (``monuseg2018/metadata.json``), or those nested
    one level under a group key (``{"stage1_train": {stem: {...}}}``). Entries without an organ are ignored.
    """
    if metadata is None:
        return {}
    if isinstance(metadata, dict):
        data = metadata
        source = "<metadata>"
    else:
        source = str(metadata)
        data = read_json(metadata, "metadata file", error=ConversionError, missing=ConversionError)
    if not isinstance(data, dict):
        raise ConversionError(f"{source}: metadata must be a JSON object keyed by image stem")
    organs: dict[str, str] = {}

    def visit(d: dict[str, Any], depth: int) -> None:
        for k, v in d.items():
            if isinstance(v, str):
                organs[k] = v
            elif isinstance(v, dict):
                if isinstance(v.get("organ"), str):
                    organs[k] = v["organ"]
                elif depth == 0:
                    visit(v, 1)

    visit(data, 0)
    return organs


def match_images(images_dir: str | os.PathLike, annotations: dict[str, Path], what: str,
                 stems: Sequence[str] | None = None, recursive: bool = False) -> list[tuple[str, Path, Path]]:
    """Pair annotation files with images by stem: ``[(stem, image_path, annotation_path)]`` in natural stem order.

    An annotation file with no image is an error (naming it). Images with no annotation file are left out with a
    warning. With ``stems`` (a split), exactly those stems are converted and each needs both files.
    """
    images_dir = Path(images_dir)
    images = find_files_by_stem(images_dir, IMAGE_SUFFIXES, "image", recursive=recursive,
                                exclude=set(annotations.values()))
    if stems is not None:
        stems = list(dict.fromkeys(stems))
        no_ann = [s for s in stems if s not in annotations]
        if no_ann:
            where = f"{next(iter(annotations.values())).parent}: " if annotations else ""
            raise ConversionError(f"{where}{len(no_ann)} image(s) of the split have no {what} file: "
                                  f"{_few(no_ann)}")
        selected = stems
    else:
        selected = list(annotations)
        unannotated = sorted(set(images) - set(annotations), key=natural_key)
        if unannotated:
            logger.warning("%s: %d image(s) have no %s file and are left out: %s", images_dir, len(unannotated),
                           what, _few(unannotated))
    no_image = [s for s in selected if s not in images]
    if no_image:
        raise ConversionError(f"{images_dir}: no image for {len(no_image)} {what} file(s): "
                              f"{_few([str(annotations[s]) for s in no_image])}")
    return [(s, images[s], annotations[s]) for s in sorted(selected, key=natural_key)]


def _few(items: Sequence[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" ... ({len(items)} in all)" if len(items) > n else "")


def find_metadata(images_dir: str | os.PathLike) -> Path | None:
    """A ``metadata.json`` in the images folder, its parent or grandparent (the layout of ``../shared/data``)."""
    folder = Path(images_dir).resolve()
    for cand in (folder, folder.parent, folder.parent.parent):
        path = cand / "metadata.json"
        if path.is_file():
            logger.info("organs from %s", path)
            return path
    return None


def build_from_label_maps(pairs: Sequence[tuple[str, Path, Path]], read_label: Any, *,
                          categories: Sequence[str] = (NUCLEUS,), organs: dict[str, str] | None = None,
                          organ: str | None = None, image_root: str | os.PathLike | None = None,
                          info: dict[str, Any] | None = None, verify_images: bool = False,
                          show_progress: bool = True, desc: str = "converting") -> dict[str, Any]:
    """The COCO document of ``pairs`` (stem, image, annotation file), reading each annotation file as a label map.

    Args:
        read_label: ``read_label(path, (height, width)) -> (label_map, types)``, ``types`` a ``{label value:
            category id}`` dict or None; it must raise an error naming the file when the size is wrong.
        organs: ``{stem: organ}``; ``organ`` is used for stems it does not name.
        verify_images: decode every image (slower) instead of reading its header (and checking that a TIFF's data
            lies inside the file).
    """
    organs = organs or {}
    builder = CocoBuilder(categories, image_root=image_root, info=info)
    for stem, image_path, ann_path in progress(pairs, desc, total=len(pairs), enabled=show_progress):
        h, w = read_image_header(image_path, verify=verify_images)
        label, types = read_label(ann_path, (h, w))
        builder.add_label_map(builder.file_name(image_path), label, organ=organs.get(stem, organ), types=types)
    return builder.to_dict()


def split_stems(split_file: str | os.PathLike | None, splits: Sequence[str] | None,
                stems: Sequence[str] | None = None) -> list[str] | None:
    """The stems to convert: ``stems``, or those of ``--split-file``/``--split`` (both or neither), or None (all)."""
    if stems is not None:
        if split_file is not None or splits:
            raise ConversionError("give either stems or --split-file/--split, not both")
        return list(stems)
    if splits and split_file is None:
        raise ConversionError("--split needs --split-file")
    if split_file is not None and not splits:
        raise ConversionError(f"{split_file}: --split-file given without --split (which split to convert?)")
    return select_split(split_file, splits) if split_file is not None and splits else None


def subset_coco(coco: dict[str, Any], stems: Sequence[str], note: str | None = None) -> dict[str, Any]:
    """The images of ``coco`` whose file stem is in ``stems`` (and their annotations), renumbered 1..N.

    Used to cut protocol splits (Kumar train / same-organ test / new-organ test) from one conversion.
    """
    wanted = set(stems)
    by_stem = {Path(img["file_name"]).stem: img for img in coco["images"]}
    missing = [s for s in stems if s not in by_stem]
    if missing:
        raise ConversionError(f"{len(missing)} image(s) of the split are not in the converted set: {_few(missing)}")
    new_id: dict[Any, int] = {}
    images = []
    for img in coco["images"]:
        if Path(img["file_name"]).stem in wanted:
            new_id[img["id"]] = len(images) + 1
            images.append({**img, "id": new_id[img["id"]]})
    annotations = []
    for anno in coco["annotations"]:
        if anno["image_id"] in new_id:
            annotations.append({**anno, "id": len(annotations) + 1, "image_id": new_id[anno["image_id"]]})
    info = dict(coco.get("info", {}))
    if note is not None:
        info["nuclei_d2"] = {**info.get("nuclei_d2", {}), "split": [note]}
    return {**coco, "info": info, "images": images, "annotations": annotations}

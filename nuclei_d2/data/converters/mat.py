"""MATLAB ``.mat`` instance labels (CPM-15/17, Kumar and CoNSeP as distributed with HoVer-Net) -> COCO.

Graham et al., "HoVer-Net: Simultaneous segmentation and classification of nuclei in multi-tissue histology images",
Medical Image Analysis 58, 2019, distribute Kumar, CPM-15, CPM-17 and CoNSeP labels as ``Labels/<stem>.mat`` with
``inst_map`` (H x W, 0 = background, 1..N = nuclei) and, for typed datasets, ``inst_type`` (N x 1: the type of
instance ``i + 1``; or of ``inst_uid[i]`` when ``inst_uid`` is present) and ``type_map`` (H x W). Other CPM-style
files hold a single 2-D integer array under another name; it is found automatically or named with ``key``.

MATLAB v7.3 files are HDF5, which ``scipy.io.loadmat`` cannot read: re-save them with ``save(f, '-v7')``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

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

__all__ = ["convert_mat", "read_mat_label"]

logger = logging.getLogger("nuclei_d2.data.converters")

_PREFERRED_KEYS = ("inst_map", "instance_map", "label", "labels", "mask")


def _loadmat(path: Path) -> dict[str, Any]:
    import scipy.io

    if not path.is_file():
        raise ConversionError(f"{path}: label file not found")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the .mat file is empty (0 bytes)")
    try:
        return scipy.io.loadmat(path)
    except NotImplementedError:
        raise ConversionError(f"{path}: MATLAB v7.3 (HDF5) files are not supported; re-save it in MATLAB with "
                              "save(file, '-v7') or convert it with h5py") from None
    except Exception as e:  # scipy raises ValueError/TypeError/... on corrupt files
        raise ConversionError(f"{path}: cannot read .mat file ({type(e).__name__}: {e})") from None


def _pick_key(data: dict[str, Any], path: Path, key: str | None) -> str:
    names = [k for k in data if not k.startswith("__")]
    if key is not None:
        if key not in data:
            raise ConversionError(f"{path}: no variable {key!r} in the .mat file (variables: {', '.join(names)})")
        return key
    for k in _PREFERRED_KEYS:
        if k in data:
            return k
    cands = [k for k in names if isinstance(data[k], np.ndarray) and data[k].ndim == 2 and data[k].size > 1
             and (np.issubdtype(data[k].dtype, np.integer) or np.issubdtype(data[k].dtype, np.floating))
             and min(data[k].shape) > 1]
    if len(cands) == 1:
        return cands[0]
    raise ConversionError(f"{path}: cannot tell which variable is the instance map "
                          f"({'candidates' if cands else 'variables'}: {', '.join(cands or names)}); "
                          "name it with --mat-key")


def read_mat_label(path: str | os.PathLike, shape: tuple[int, int] | None = None, key: str | None = None,
                   type_key: str | None = None) -> tuple[np.ndarray, dict[int, int] | None]:
    """Read the instance map (int32) of a ``.mat`` file and, with ``type_key``, each instance's type.

    Returns:
        ``(label, types)``; ``types`` maps label value -> type id (None without ``type_key``). Instances of type 0
        (HoVer-Net's "no type") are removed from ``label`` with a warning.
    """
    path = Path(path)
    data = _loadmat(path)
    k = _pick_key(data, path, key)
    label = np.asarray(data[k])
    if label.ndim == 3 and label.shape[2] == 1:
        label = label[:, :, 0]
    if label.ndim != 2:
        raise ConversionError(f"{path}: variable {k!r} has shape {label.shape}; an instance map must be 2-D")
    if np.issubdtype(label.dtype, np.floating):
        if not np.all(np.mod(label, 1) == 0):
            raise ConversionError(f"{path}: variable {k!r} holds non-integer values")
    elif not (np.issubdtype(label.dtype, np.integer) or label.dtype == bool):
        raise ConversionError(f"{path}: variable {k!r} has unsupported dtype {label.dtype}")
    if label.size and label.min() < 0:
        raise ConversionError(f"{path}: variable {k!r} has negative labels")
    if shape is not None and tuple(label.shape) != tuple(shape):
        raise ConversionError(f"{path}: instance map is {label.shape[0]}x{label.shape[1]} but its image is "
                              f"{shape[0]}x{shape[1]}")
    label = label.astype(np.int32)
    if type_key is None:
        return label, None
    return _types(data, path, label, type_key)


def _types(data: dict[str, Any], path: Path, label: np.ndarray, type_key: str) -> tuple[np.ndarray, dict[int, int]]:
    from ...structures import label_values

    values = label_values(label)
    if type_key not in data:
        names = [k for k in data if not k.startswith("__")]
        raise ConversionError(f"{path}: no variable {type_key!r} for nucleus types (variables: {', '.join(names)})")
    inst_type = np.asarray(data[type_key])
    if inst_type.ndim == 2 and inst_type.shape == label.shape:  # a per-pixel type map: majority vote per instance
        types = _majority(label, inst_type.astype(np.int64))
    else:
        inst_type = inst_type.reshape(-1).astype(np.int64)
        if "inst_uid" in data:
            uid = np.asarray(data["inst_uid"]).reshape(-1).astype(np.int64)
            if uid.size != inst_type.size:
                raise ConversionError(f"{path}: inst_uid has {uid.size} entries but {type_key} {inst_type.size}")
            types = dict(zip(uid.tolist(), inst_type.tolist()))
        elif values.size and inst_type.size >= int(values[-1]):
            types = {int(v): int(inst_type[v - 1]) for v in values}
        elif "type_map" in data and np.asarray(data["type_map"]).shape == label.shape:
            types = _majority(label, np.asarray(data["type_map"]).astype(np.int64))
        else:
            raise ConversionError(f"{path}: {type_key} has {inst_type.size} entries but the instance map has labels "
                                  f"up to {int(values[-1]) if values.size else 0}; cannot assign types")
    missing = [int(v) for v in values if int(v) not in types]
    if missing:
        raise ConversionError(f"{path}: no type for instance label(s) {missing[:5]}")
    present = set(values.tolist())
    untyped = [v for v, t in types.items() if t == 0 and v in present]
    if untyped:
        logger.warning("%s: %d instance(s) of type 0 (no type) are left out", path, len(untyped))
        lut = np.ones(int(label.max()) + 1, dtype=bool)
        lut[untyped] = False
        label = np.where(lut[label], label, 0).astype(np.int32)
    return label, {int(v): int(t) for v, t in types.items() if t != 0}


def _majority(label: np.ndarray, type_map: np.ndarray) -> dict[int, int]:
    from scipy import ndimage

    out = {}
    for idx, sl in enumerate(ndimage.find_objects(label)):
        if sl is None:
            continue
        t = type_map[sl][label[sl] == idx + 1]
        t = t[t > 0]
        out[idx + 1] = int(np.bincount(t).argmax()) if t.size else 0
    return out


def convert_mat(images: str | os.PathLike, labels: str | os.PathLike, out: str | os.PathLike | None = None, *,
                key: str | None = None, type_key: str | None = None, type_names: Sequence[str] | None = None,
                split_file: str | os.PathLike | None = None, splits: Sequence[str] | None = None,
                stems: Sequence[str] | None = None,
                metadata: str | os.PathLike | dict[str, Any] | None = None, organ: str | None = None,
                image_root: str | os.PathLike | None = None, label_suffix: str = "", verify_images: bool = False,
                show_progress: bool = True) -> dict[str, Any]:
    """Convert images + ``.mat`` instance labels (matched by stem) to COCO.

    Args:
        key: the instance-map variable (default: ``inst_map``, or the only 2-D integer array).
        type_key, type_names: keep nucleus types as categories: ``type_key`` names the per-instance type variable
            (``inst_type``) or a per-pixel type map; ``type_names`` names types 1..K (required with ``type_key``,
            so every split of a dataset gets the same categories). Without them: one ``nucleus`` category.
        label_suffix: label stems end with this (``"_mask"``: ``a_mask.mat`` labels ``a.png``).
        Other arguments as in :func:`nuclei_d2.data.converters.convert_label_maps`.
    """
    if (type_key is None) != (type_names is None):
        raise ConversionError("keeping nucleus types needs both --type-key and --type-names (names of types 1..K)")
    if out is not None:
        check_output_file(out)
    stems = split_stems(split_file, splits, stems)
    mats = find_files_by_stem(labels, (".mat",), ".mat label", strip_suffix=label_suffix)
    pairs = match_images(images, mats, ".mat label", stems=stems)
    n_types = len(type_names) if type_names else 0

    def read(path: Path, shape: tuple[int, int]) -> tuple[np.ndarray, dict[int, int] | None]:
        label, types = read_mat_label(path, shape, key=key, type_key=type_key)
        if types is not None:
            bad = sorted({t for t in types.values() if not 1 <= t <= n_types})
            if bad:
                raise ConversionError(f"{path}: type id(s) {bad} outside 1..{n_types} (--type-names gives "
                                      f"{n_types} names)")
        return label, types

    info = {"source_format": "mat", "images": str(Path(images).resolve()), "annotations": str(Path(labels).resolve()),
            "split": list(splits or []), "mat_key": key, "type_key": type_key}
    meta = metadata if metadata is not None else find_metadata(images)
    coco = build_from_label_maps(pairs, read, categories=tuple(type_names) if type_names else ("nucleus",),
                                 organs=load_organs(meta), organ=organ, image_root=image_root, info=info,
                                 verify_images=verify_images, show_progress=show_progress, desc=".mat labels")
    if out is not None:
        write_coco(coco, out)
    return coco

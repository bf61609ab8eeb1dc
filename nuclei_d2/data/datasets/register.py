"""Register nuclei COCO JSONs in Detectron2's ``DatasetCatalog`` / ``MetadataCatalog``.

Registration is cheap and lazy: nothing is read until ``DatasetCatalog.get(name)`` (or until the class names are
first asked for), so importing :mod:`nuclei_d2` with dozens of registered datasets costs nothing and a dataset whose
files are absent only fails, with a message saying which file is missing and how to make it, when it is used.

Dataset dicts follow Detectron2's standard format (``detectron2/data/datasets/coco.py:load_coco_json``) plus the
image's ``organ`` (None when unknown), which Detectron2's own loader would drop:

``{"file_name": absolute path, "height", "width", "image_id": the JSON's image id, "organ",
"annotations": [{"bbox": XYWH, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0-based contiguous,
"segmentation": compressed RLE (or the JSON's polygons), "iscrowd"}]}``

Masks are RLE, so the mapper must use ``INPUT.MASK_FORMAT = "bitmask"``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.catalog import Metadata

from ...utils.io import read_json

__all__ = [
    "DatasetLoadError",
    "NucleiMetadata",
    "dataset_names_by_origin",
    "get_image_organs",
    "load_nuclei_json",
    "parse_register_entry",
    "register_datasets_from_config",
    "register_nuclei_dataset",
    "unprepared_dataset_message",
    "unregister_nuclei_dataset",
]

logger = logging.getLogger("nuclei_d2.data.datasets")

#: Definitions of the datasets registered through this module: name -> normalised arguments.
_DEFINITIONS: dict[str, tuple[Any, ...]] = {}
#: Their ``missing_hint`` (how to create the JSON), by name.
_HINTS: dict[str, str | None] = {}
_LOCK = threading.Lock()
_JSON_CACHE: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}
_CACHE_SIZE = 8


class DatasetLoadError(FileNotFoundError):
    """A registered dataset's files are missing or unusable. The message names the file and how to create it."""


# ---- reading the JSON ------------------------------------------------------------------------------------------

def _read_json(json_file: Path, dataset_name: str | None, missing_hint: str | None) -> dict[str, Any]:
    """Parsed COCO JSON, cached by (path, mtime, size) so a dataset used by trainer and evaluator is read once."""
    who = f"dataset {dataset_name!r}: " if dataset_name else ""
    try:
        st = json_file.stat()
    except FileNotFoundError:
        hint = f" {missing_hint}" if missing_hint else ""
        raise DatasetLoadError(f"{who}annotation file {json_file} not found.{hint}") from None
    key = str(json_file)
    stamp = (st.st_mtime_ns, st.st_size)
    with _LOCK:
        hit = _JSON_CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    try:
        coco = read_json(json_file, "annotation file", error=DatasetLoadError, missing=DatasetLoadError)
    except DatasetLoadError as e:
        raise DatasetLoadError(f"{who}{e}") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DatasetLoadError(f"{who}{json_file} is not a COCO JSON (no 'images' list)")
    cats = coco.get("categories") or []
    if not cats:
        raise DatasetLoadError(f"{who}{json_file} has no categories")
    with _LOCK:
        if len(_JSON_CACHE) >= _CACHE_SIZE:
            _JSON_CACHE.pop(next(iter(_JSON_CACHE)))
        _JSON_CACHE[key] = (stamp, coco)
    return coco


def _categories(coco: dict[str, Any]) -> tuple[list[str], dict[int, int]]:
    cats = sorted(coco["categories"], key=lambda c: int(c["id"]))
    return [str(c["name"]) for c in cats], {int(c["id"]): i for i, c in enumerate(cats)}


def _image_base(coco: dict[str, Any], json_file: Path, image_root: str | os.PathLike | None) -> Path:
    """Folder for relative file names: the given image_root, else the converter's record, else the JSON's folder."""
    if image_root is not None:
        return Path(image_root)
    info = coco.get("info")
    ours = info.get("nuclei_d2") if isinstance(info, dict) else None
    stored = ours.get("image_root") if isinstance(ours, dict) else None
    return Path(stored) if stored else json_file.parent


def load_nuclei_json(json_file: str | os.PathLike, image_root: str | os.PathLike | None = None,
                     organs: Sequence[str] | None = None, dataset_name: str | None = None,
                     check_files: bool = True, missing_hint: str | None = None,
                     thing_classes: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Detectron2 dataset dicts (with ``organ``) of a nuclei COCO JSON.

    Args:
        image_root: folder that relative file names are joined to (default: the ``image_root`` recorded in the
            JSON by the converter, else the JSON's folder). Absolute file names are used as they are.
        organs: keep only images of these organs.
        check_files: check that every image file exists (one ``stat`` each) and fail naming the missing ones.
        missing_hint: appended to the error when the JSON itself is missing (e.g. the command that creates it).
        thing_classes: if given, the JSON's category names (by id) must equal these.
    """
    from detectron2.structures import BoxMode

    json_file = Path(json_file)
    who = f"dataset {dataset_name!r}: " if dataset_name else ""
    coco = _read_json(json_file, dataset_name, missing_hint)
    names, id_map = _categories(coco)
    if thing_classes is not None and list(thing_classes) != names:
        raise DatasetLoadError(f"{who}{json_file} has categories {names} but the dataset was registered with "
                               f"thing_classes {list(thing_classes)}")
    base = _image_base(coco, json_file, image_root)
    wanted = {o.lower() for o in organs} if organs else None
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for anno in coco.get("annotations", []):
        by_image.setdefault(anno["image_id"], []).append(anno)
    dicts = []
    missing = []
    for img in coco["images"]:
        organ = img.get("organ")
        if wanted is not None and (organ is None or str(organ).lower() not in wanted):
            continue
        file_name = os.path.join(base, img["file_name"])
        if check_files and not os.path.isfile(file_name):
            missing.append(file_name)
        annos = []
        for a in by_image.get(img["id"], ()):
            cat = id_map.get(int(a["category_id"]))
            if cat is None:
                raise DatasetLoadError(f"{who}{json_file}: annotation {a.get('id')} has category id "
                                       f"{a['category_id']}, not among the categories {sorted(id_map)}")
            annos.append({"bbox": a["bbox"], "bbox_mode": BoxMode.XYWH_ABS, "category_id": cat,
                          "segmentation": a["segmentation"], "iscrowd": int(a.get("iscrowd", 0))})
        dicts.append({"file_name": file_name, "height": int(img["height"]), "width": int(img["width"]),
                      "image_id": img["id"], "organ": organ, "annotations": annos})
    if missing:
        raise DatasetLoadError(f"{who}{len(missing)} image file(s) listed in {json_file} are missing, e.g. "
                               f"{missing[0]} (image root: {base})")
    if wanted is not None and not dicts:
        raise DatasetLoadError(f"{who}{json_file} has no image of organ(s) {sorted(wanted)}")
    return dicts


# ---- metadata ----------------------------------------------------------------------------------------------------

class NucleiMetadata(Metadata):
    """Detectron2 ``Metadata`` whose class names are read from the JSON on first use (not at registration)."""

    _LAZY = ("thing_classes", "thing_dataset_id_to_contiguous_id")

    def __getattr__(self, key: str) -> Any:
        if key in NucleiMetadata._LAZY and "_lazy_json" in self.__dict__:
            self._resolve()
            if key in self.__dict__:
                return self.__dict__[key]
        return super().__getattr__(key)

    def _resolve(self) -> None:
        json_file, hint = self.__dict__["_lazy_json"]
        coco = _read_json(Path(json_file), self.name, hint)
        names, id_map = _categories(coco)
        for key, value in (("thing_classes", names), ("thing_dataset_id_to_contiguous_id", id_map)):
            if key in self.__dict__ and self.__dict__[key] != value:
                raise DatasetLoadError(f"dataset {self.name!r}: {json_file} has categories {names} but the dataset "
                                       f"was registered with {key} {self.__dict__[key]}")
            self.__dict__[key] = value
        del self.__dict__["_lazy_json"]

    def as_dict(self) -> dict[str, Any]:
        if "_lazy_json" in self.__dict__:
            try:
                self._resolve()
            except DatasetLoadError:
                pass
        return {k: v for k, v in self.__dict__.items() if k != "_lazy_json"}


# ---- registration ------------------------------------------------------------------------------------------------

def _norm_path(p: str | os.PathLike | None) -> str | None:
    return None if p is None else str(Path(os.path.expanduser(str(p))).absolute())


def register_nuclei_dataset(name: str, json_file: str | os.PathLike, image_root: str | os.PathLike | None = None,
                            organs: Sequence[str] | None = None, *, train_organs: Sequence[str] | None = None,
                            thing_classes: Sequence[str] | None = None, check_files: bool = True,
                            missing_hint: str | None = None, overwrite: bool = False, **metadata: Any) -> None:
    """Register a nuclei COCO JSON (as written by ``tools/convert_dataset.py``) under ``name``.

    Args:
        json_file: the COCO JSON (read when the dataset is first loaded, not now).
        image_root: folder for relative file names (default: as recorded by the converter, else the JSON's
            folder).
        organs: keep only images of these organs (e.g. a per-organ test set).
        train_organs: organs seen in training, so the evaluator can report seen vs unseen organs.
        thing_classes: the category names, if known (default: read from the JSON when first asked for).
        check_files: at load, check every image file exists.
        missing_hint: text added to the error when the JSON is missing (how to create it).
        overwrite: replace an existing registration of ``name`` instead of failing.
        metadata: extra ``MetadataCatalog`` entries.

    Registering the same name again with the same arguments does nothing; with different arguments it raises
    ``ValueError`` (unless ``overwrite``).
    """
    json_path = _norm_path(json_file)
    root = _norm_path(image_root)
    definition = (json_path, root, tuple(organs) if organs else None, tuple(train_organs) if train_organs else None,
                  tuple(thing_classes) if thing_classes else None, bool(check_files),
                  tuple(sorted((k, repr(v)) for k, v in metadata.items())))
    with _LOCK:
        if name not in DatasetCatalog:
            _DEFINITIONS.pop(name, None)  # removed from the catalog by other code: register afresh
        elif overwrite:
            _remove(name)
        elif _DEFINITIONS.get(name) == definition:
            return
        else:
            old = _DEFINITIONS.get(name)
            what = (f"json_file={old[0]}, image_root={old[1]}, organs={old[2]}" if old else
                    "a dataset registered outside nuclei_d2")
            raise ValueError(f"dataset {name!r} is already registered ({what}); now asked for json_file="
                             f"{json_path}, image_root={root}, organs={definition[2]}. Use another name, or "
                             "overwrite=True to replace it")
        _DEFINITIONS[name] = definition
        _HINTS[name] = missing_hint

    def load() -> list[dict[str, Any]]:
        return load_nuclei_json(json_path, image_root=root, organs=organs, dataset_name=name,
                                check_files=check_files, missing_hint=missing_hint, thing_classes=thing_classes)

    DatasetCatalog.register(name, load)
    meta = NucleiMetadata(name=name)
    MetadataCatalog[name] = meta
    meta.__dict__["_lazy_json"] = (json_path, missing_hint)
    if thing_classes:
        meta.__dict__["thing_classes"] = list(thing_classes)
    meta.set(json_file=json_path, evaluator_type="nuclei", **metadata)
    if root is not None:
        meta.set(image_root=root)
    if train_organs is not None:
        meta.set(train_organs=list(train_organs))
    if organs:
        meta.set(organs=list(organs))


def _remove(name: str) -> None:
    if name in DatasetCatalog:
        DatasetCatalog.remove(name)
    if name in MetadataCatalog:
        MetadataCatalog.remove(name)
    _DEFINITIONS.pop(name, None)
    _HINTS.pop(name, None)


def unregister_nuclei_dataset(name: str) -> None:
    """Remove ``name`` from both catalogs (no error if it is not registered)."""
    with _LOCK:
        _remove(name)


def unprepared_dataset_message(name: str) -> str | None:
    """Why ``name``, registered through :func:`register_nuclei_dataset`, cannot be loaded yet: its JSON does not
    exist (one line naming the file and how to create it), else None. Checked before a run starts (``setup_cfg``),
    so a dataset never prepared is not a traceback from the data loader minutes later. One ``stat``; datasets
    registered otherwise (synthetic, Detectron2's, a user's own loader) are not checked (None)."""
    with _LOCK:
        definition, hint = _DEFINITIONS.get(name), _HINTS.get(name)
    if definition is None or name not in DatasetCatalog or os.path.isfile(definition[0]):
        return None
    hint = hint or ("Convert your data with tools/convert_dataset.py (see datasets/README.md) or register the "
                    "dataset with its JSON's path")
    return f"dataset {name!r} is not prepared: {definition[0]} not found. {hint}"


def dataset_names_by_origin() -> tuple[list[str], list[str]]:
    """``(ours, detectron2s)``: the registered dataset names, split into Detectron2's built-ins (COCO, LVIS, VOC, ...,
    registered when ``detectron2.data`` is imported: of no use for nuclei) and all the others (nuclei-d2's built-ins,
    synthetic tiles, the user's), each in registration order. A dataset's origin is the module its loader lives in."""
    ours, detectron2s = [], []
    for name in DatasetCatalog.list():
        module = getattr(DatasetCatalog[name], "__module__", None) or ""
        (detectron2s if module.split(".")[0] == "detectron2" else ours).append(name)
    return ours, detectron2s


def get_image_organs(dataset_name: str) -> dict[Any, str | None]:
    """``{image_id: organ}`` of a registered dataset (loads it): what the evaluator groups results by."""
    return {d["image_id"]: d.get("organ") for d in DatasetCatalog.get(dataset_name)}


# ---- config ------------------------------------------------------------------------------------------------------

def parse_register_entry(entry: Any) -> tuple[str, str, str | None]:
    """``(name, json_file, image_root)`` of one ``cfg.DATASETS.REGISTER`` entry.

    An entry is ``"name:json_file"`` or ``"name:json_file:image_root"``, or a list/tuple ``[name, json_file]`` /
    ``[name, json_file, image_root]`` (for paths that contain ``:``).
    """
    if isinstance(entry, str):
        parts = entry.split(":")
    elif isinstance(entry, (list, tuple)):
        parts = [str(p) for p in entry]
    else:
        raise ValueError(f"DATASETS.REGISTER entry {entry!r}: expected 'name:json_file[:image_root]' or "
                         "[name, json_file, image_root]")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise ValueError(f"DATASETS.REGISTER entry {entry!r}: expected 'name:json_file[:image_root]' (or the list "
                         "form [name, json_file, image_root] for paths containing ':')")
    parts = [p.strip() for p in parts]
    return parts[0], parts[1], parts[2] if len(parts) == 3 else None


def register_datasets_from_config(cfg: Any) -> list[str]:
    """Register every dataset listed in ``cfg.DATASETS.REGISTER``; returns their names.

    Call before building data loaders (``tools/train_net.py`` does), so a config can train and test on any converted
    JSON with no code: ``DATASETS.REGISTER: ["mine_train:/data/mine/train.json", "mine_test:/data/mine/test.json"]``,
    ``DATASETS.TRAIN: ("mine_train",)``. Re-running it (e.g. in each process) is harmless.
    """
    entries = cfg.DATASETS.get("REGISTER", []) if hasattr(cfg.DATASETS, "get") else cfg.DATASETS.REGISTER
    names = []
    for entry in entries or []:
        name, json_file, image_root = parse_register_entry(entry)
        register_nuclei_dataset(name, json_file, image_root)
        names.append(name)
    return names

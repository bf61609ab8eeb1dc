"""Built-in dataset names for the standard nuclei protocols, registered at import when nothing is read yet.

Every built-in dataset is one JSON under the datasets root (``$NUCLEI_D2_DATASETS``, default ``./datasets``),
written by ``python tools/convert_dataset.py prepare-builtin <family> --source <download>``:

* ``monuseg2018/{monuseg2018_train,monuseg2018_test}.json`` and ``kumar/{kumar_train,kumar_test_same,
  kumar_test_diff,kumar_test}.json`` (family ``monuseg2018``; Kumar et al. 2017's 16/8/6 split);
* ``cpm17/{cpm17_train,cpm17_test}.json`` (``cpm17``), ``tnbc/tnbc.json`` (``tnbc``);
* ``pannuke/pannuke_fold{1,2,3}.json`` (one ``nucleus`` class) and ``pannuke_fold{k}_types.json`` (5 types)
  (``pannuke``);
* ``dsb2018/{dsb2018_stage1_train,dsb2018_stage1_test}.json`` (``dsb2018``).

Image records point at the source images by absolute path (nothing is copied), except PanNuke, whose images only
exist as arrays and are written as PNG under ``pannuke/``. ``datasets/README.md`` has the download links and commands.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .protocols import KUMAR_TRAIN_ORGANS, MONUSEG2018_TRAIN_ORGANS, PANNUKE_TYPES
from .register import register_nuclei_dataset

__all__ = ["BUILTIN_DATASETS", "BuiltinDataset", "builtin_json_path", "datasets_root", "register_all_builtin"]

logger = logging.getLogger("nuclei_d2.data.datasets")


@dataclass(frozen=True)
class BuiltinDataset:
    """One built-in dataset: its JSON is ``<root>/<folder>/<name>.json``, made by ``prepare-builtin <prepare>``."""

    name: str
    folder: str
    prepare: str
    thing_classes: tuple[str, ...] = ("nucleus",)
    train_organs: tuple[str, ...] | None = None

    def hint(self, root: Path) -> str:
        return (f"Create it with: python tools/convert_dataset.py prepare-builtin {self.prepare} "
                f"--source <{self.prepare} download> --root {root}  (datasets/README.md: downloads and commands)")


def _builtins() -> list[BuiltinDataset]:
    out = [
        BuiltinDataset("monuseg2018_train", "monuseg2018", "monuseg2018", train_organs=MONUSEG2018_TRAIN_ORGANS),
        BuiltinDataset("monuseg2018_test", "monuseg2018", "monuseg2018", train_organs=MONUSEG2018_TRAIN_ORGANS),
    ]
    out += [BuiltinDataset(n, "kumar", "monuseg2018", train_organs=KUMAR_TRAIN_ORGANS)
            for n in ("kumar_train", "kumar_test_same", "kumar_test_diff", "kumar_test")]
    out += [BuiltinDataset(n, "cpm17", "cpm17") for n in ("cpm17_train", "cpm17_test")]
    out += [BuiltinDataset("tnbc", "tnbc", "tnbc")]
    for k in (1, 2, 3):
        out.append(BuiltinDataset(f"pannuke_fold{k}", "pannuke", "pannuke"))
        out.append(BuiltinDataset(f"pannuke_fold{k}_types", "pannuke", "pannuke", thing_classes=PANNUKE_TYPES))
    out += [BuiltinDataset(n, "dsb2018", "dsb2018") for n in ("dsb2018_stage1_train", "dsb2018_stage1_test")]
    return out


#: Every built-in dataset, by name.
BUILTIN_DATASETS: dict[str, BuiltinDataset] = {d.name: d for d in _builtins()}


def datasets_root(root: str | os.PathLike | None = None) -> Path:
    """The datasets root: ``root`` if given, else ``$NUCLEI_D2_DATASETS``, else ``./datasets`` (made absolute)."""
    if root is None:
        root = os.environ.get("NUCLEI_D2_DATASETS") or "datasets"
    return Path(os.path.expanduser(str(root))).absolute()


def builtin_json_path(name: str, root: str | os.PathLike | None = None) -> Path:
    """Where the JSON of built-in dataset ``name`` lives under the datasets root."""
    if name not in BUILTIN_DATASETS:
        raise KeyError(f"no built-in dataset {name!r}; built-ins: {', '.join(BUILTIN_DATASETS)}")
    d = BUILTIN_DATASETS[name]
    return datasets_root(root) / d.folder / f"{d.name}.json"


def register_all_builtin(root: str | os.PathLike | None = None, overwrite: bool = False) -> list[str]:
    """Register every built-in dataset under ``root`` (no file is read or checked now). Returns the names registered.

    Called when :mod:`nuclei_d2.data.datasets` is imported. A name already registered differently (by other code) is
    skipped with a warning, so importing nuclei_d2 never fails; ``overwrite=True`` replaces such registrations, e.g.
    to point the built-ins at another root after import.
    """
    base = datasets_root(root)
    names = []
    for d in BUILTIN_DATASETS.values():
        try:
            register_nuclei_dataset(d.name, base / d.folder / f"{d.name}.json", thing_classes=d.thing_classes,
                                    train_organs=d.train_organs, missing_hint=d.hint(base), overwrite=overwrite)
        except ValueError as e:
            logger.warning("built-in dataset %r not registered: %s", d.name, e)
            continue
        names.append(d.name)
    return names

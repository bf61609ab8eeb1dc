"""The zoo's manifest: which trained models exist, their files, hashes and model cards (no torch needed here).

A zoo is a folder holding ``manifest.yaml`` and the files it names. The shipped one is this package's folder; the
environment variable ``NUCLEI_D2_MODEL_ZOO`` points to another (a lab's own models, the tests' small zoo). An entry::

    entries:
      <name>:
        kind: model                       # or "ensemble" (then "members" and "overrides" instead of files)
        description: one line
        config: configs/<name>.yaml        # the full config it was trained with (sub-model weights keys emptied)
        config_sha256: ...
        weights: weights/<name>.pth        # {"model": state dict}, float16 where predictions stay equal
        sha256: ...
        submodel_configs:                  # configs of sub-models (their weights are inside the entry's weights)
          MODEL.MASKRCNN_PLUS.DISTANCE_NET.CONFIG: {file: configs/<name>.distance.yaml, sha256: ...}
        overrides: {TEST.MERGE.MIN_VOTES: 2}   # ensembles: config keys set on the first member's config
        card: {...}                        # trained_on, training, held_out scores, seconds_per_tile, licence, check
    flagship: <name>                       # optional: the entry the demo runs and tools suggest first

Every file an entry names is checked against its sha256 before anything loads it (:func:`verify_entry`), so an
altered or truncated file is one line naming it, not a model that silently predicts something else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError
from ..utils.io import file_sha256

__all__ = ["ZOO_ENV", "ZOO_PREFIX", "ZooEntry", "file_sha256", "flagship", "get_entry", "load_manifest",
           "resolve_zoo_config", "verify_entry", "zoo_dir"]

#: ``--config-file zoo:NAME`` (any tool that takes a config) names a zoo entry.
ZOO_PREFIX = "zoo:"
#: Environment variable naming another zoo folder (one with its own manifest.yaml).
ZOO_ENV = "NUCLEI_D2_MODEL_ZOO"
#: The shipped zoo: this package's folder.
PACKAGE_ZOO = Path(__file__).resolve().parent


def zoo_dir() -> Path:
    """The zoo in use: ``$NUCLEI_D2_MODEL_ZOO`` if set, else the shipped one."""
    env = os.environ.get(ZOO_ENV, "")
    return Path(env).expanduser().resolve() if env else PACKAGE_ZOO


@dataclass(frozen=True)
class ZooEntry:
    """One manifest entry: a trained model (``kind`` "model") or an ensemble of other entries ("ensemble")."""

    name: str
    kind: str
    root: Path
    description: str = ""
    config: str = ""
    config_sha256: str = ""
    weights: str = ""
    sha256: str = ""
    submodel_configs: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    members: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    card: Mapping[str, Any] = field(default_factory=dict)

    @property
    def config_path(self) -> Path:
        return self.root / self.config

    @property
    def weights_path(self) -> Path:
        return self.root / self.weights

    def files(self) -> list[tuple[str, Path, str]]:
        """(what, path, expected sha256) of every file of this entry itself (not its members')."""
        if self.kind == "ensemble":
            return []
        out = [("config", self.config_path, self.config_sha256), ("weights", self.weights_path, self.sha256)]
        out += [(key, self.root / str(f.get("file", "")), str(f.get("sha256", "")))
                for key, f in self.submodel_configs.items()]
        return out


def _entry(name: str, raw: Mapping[str, Any], root: Path, where: Path) -> ZooEntry:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: entry {name!r} is not a mapping")
    kind = raw.get("kind", "model")
    if kind not in ("model", "ensemble"):
        raise ConfigError(f"{where}: entry {name!r}: kind must be 'model' or 'ensemble', got {kind!r}")
    need = ("members",) if kind == "ensemble" else ("config", "weights", "sha256", "config_sha256")
    missing = [k for k in need if not raw.get(k)]
    if missing:
        raise ConfigError(f"{where}: entry {name!r} lacks {', '.join(missing)}")
    return ZooEntry(name=name, kind=kind, root=root, description=str(raw.get("description", "")),
                    config=str(raw.get("config", "")), config_sha256=str(raw.get("config_sha256", "")),
                    weights=str(raw.get("weights", "")), sha256=str(raw.get("sha256", "")),
                    submodel_configs={str(k): dict(v) for k, v in (raw.get("submodel_configs") or {}).items()},
                    members=tuple(raw.get("members") or ()), overrides=dict(raw.get("overrides") or {}),
                    card=dict(raw.get("card") or {}))


def _read_manifest(root: str | os.PathLike | None) -> tuple[Path, dict[str, ZooEntry], str | None]:
    """(manifest path, entries by name in manifest order, flagship name or None), all checked."""
    import yaml

    root = Path(root) if root is not None else zoo_dir()
    path = root / "manifest.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: model zoo manifest not found" + (f" (set by ${ZOO_ENV})" if os.environ.get(ZOO_ENV)
                                                                      else ""))
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: a manifest is a mapping with 'entries' (and optionally 'flagship')")
    raw = data.get("entries")
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{path}: 'entries' must map names to entries")
    entries = {str(n): _entry(str(n), e, root, path) for n, e in raw.items()}
    for e in entries.values():
        unknown = [m for m in e.members if m not in entries or entries[m].kind != "model"]
        if unknown:
            raise ConfigError(f"{path}: ensemble {e.name!r} names members that are not model entries: {unknown}")
    lead = data.get("flagship")
    if lead is not None and str(lead) not in entries:
        raise ConfigError(f"{path}: flagship {lead!r} is not an entry; entries: {', '.join(entries) or 'none'}")
    return path, entries, None if lead is None else str(lead)


def load_manifest(root: str | os.PathLike | None = None) -> dict[str, ZooEntry]:
    """The entries of the zoo in ``root`` (default :func:`zoo_dir`), by name, in manifest order.

    Raises:
        ConfigError: the manifest is missing or not a valid manifest (one line naming it).
    """
    return _read_manifest(root)[1]


def flagship(root: str | os.PathLike | None = None) -> str | None:
    """The zoo's flagship entry (the manifest's ``flagship``: what the demo runs), or None when it names none."""
    return _read_manifest(root)[2]


def get_entry(name: str, root: str | os.PathLike | None = None) -> ZooEntry:
    """The entry ``name``; ConfigError listing the available names when there is none."""
    entries = load_manifest(root)
    if name not in entries:
        avail = ", ".join(entries) or "none (this zoo has no entries yet)"
        raise ConfigError(f"unknown model zoo entry {name!r}; available: {avail}")
    return entries[name]


def verify_entry(entry: ZooEntry, root: str | os.PathLike | None = None) -> None:
    """Check every file of ``entry`` (and of its members) against the manifest's sha256 before anything reads it.

    Raises:
        CheckpointError: a file is missing or its bytes differ from the manifest (altered, truncated, replaced),
            one line naming the file and how to rebuild it.
    """
    entries = [get_entry(m, root) for m in entry.members] if entry.kind == "ensemble" else [entry]
    for e in entries:
        for what, path, expected in e.files():
            if not path.is_file():
                raise CheckpointError(f"{path}: model zoo file not found ({e.name}'s {what}); reinstall nuclei-d2 or "
                                      "rebuild the entry (docs/model_zoo.md)")
            if not expected:
                raise CheckpointError(f"{path}: the manifest gives no sha256 for {e.name}'s {what}: refusing to load "
                                      "an unchecked file")
            got = file_sha256(path)
            if got != expected:
                raise CheckpointError(f"{path}: sha256 {got[:12]}... differs from the manifest's {expected[:12]}... "
                                      f"({e.name}'s {what} was altered, truncated or replaced); reinstall nuclei-d2 "
                                      "or rebuild the entry (docs/model_zoo.md)")


def _submodel_overrides(entry: ZooEntry) -> list[str]:
    """Config overrides that point a model entry's sub-models at the config files shipped beside it."""
    opts = []
    for key, f in entry.submodel_configs.items():
        opts += [key, str(entry.root / str(f.get("file", "")))]
    return opts


def _member_overrides(entry: ZooEntry) -> list[str]:
    """Config overrides that load a model entry's own files: its weights, its sub-model configs."""
    return ["MODEL.WEIGHTS", str(entry.weights_path), *_submodel_overrides(entry)]


def resolve_zoo_config(spec: str, root: str | os.PathLike | None = None) -> tuple[str, list[str]]:
    """``zoo:NAME`` -> (config file, overrides) after :func:`verify_entry`: the file to merge and the ``KEY VALUE``
    pairs that point the config at the entry's verified files (an ensemble: its first member's config, the others
    as ``TEST.ENSEMBLE.WEIGHTS`` / ``CONFIGS`` / ``OPTS`` (their sub-model config files), then its ``overrides``,
    e.g. ``TEST.MERGE`` settings). User overrides go after these."""
    name = spec[len(ZOO_PREFIX):] if spec.startswith(ZOO_PREFIX) else spec
    entry = get_entry(name, root)
    verify_entry(entry, root)
    if entry.kind == "model":
        return str(entry.config_path), _member_overrides(entry)
    first, *others = [get_entry(m, root) for m in entry.members]
    opts = _member_overrides(first)
    opts += ["TEST.ENSEMBLE.WEIGHTS", repr([str(o.weights_path) for o in others]),
             "TEST.ENSEMBLE.CONFIGS", repr([str(o.config_path) for o in others]),
             "TEST.ENSEMBLE.OPTS", repr([_submodel_overrides(o) for o in others])]
    for key, value in entry.overrides.items():
        opts += [str(key), str(value)]
    return str(first.config_path), opts

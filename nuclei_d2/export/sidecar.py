"""``export.json``: what makes an export folder a complete segmenter, and its checks on load.

An export folder holds one file per network (``<name>.onnx`` or ``<name>.pt``), ``config.yaml`` (the model's whole
config with its weights keys emptied: the files are the weights) and this sidecar::

    {"format_version": 1, "format": "onnx" | "torchscript", "meta_architecture": "TwoStageUNet",
     "method": "two_stage_unet", "nuclei_d2_version": "...", "torch_version": "...",
     "config": {"file": "config.yaml", "sha256": "..."},
     "preprocessing": {"input_range": [0, 255], "channel_order": ["red", "green", "blue"], "layout": "NCHW",
                       "dtype": "float32", "pixel_mean": [...], "pixel_std": [...], "normalize": "..."},
     "tiling": {...MODEL.TILING and INFERENCE tile keys...}, "postprocess": {...the method's keys...},
     "networks": {"stage1": {"file": "stage1.onnx", "sha256": "...", "inputs": [...], "outputs": [...],
                             "size_multiple": 16, "pad_mode": "reflect", ...}}}

:func:`read_sidecar` checks every field a runtime reads and every file's sha256; each failure is one line naming the
file and the problem (:class:`ExportError`, a :class:`~nuclei_d2.errors.ConfigError`: tools exit with status 2).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..utils.io import file_sha256, read_json, write_json_atomic

__all__ = ["FORMATS", "FORMAT_VERSION", "METHODS", "SIDECAR", "ExportError", "build_sidecar", "read_sidecar",
           "write_sidecar"]

#: The sidecar's file name in an export folder.
SIDECAR = "export.json"
FORMAT_VERSION = 1
#: Export format -> network file suffix.
FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
#: Meta-architecture -> method name (the sidecar's "method"; the configs' stems).
METHODS = {"NucleusBoundaryUNet": "nb_unet", "TwoStageUNet": "two_stage_unet", "BRPNet": "brpnet",
           "MaskRCNNPlus": "maskrcnn_plus", "PanopticFusionRCNN": "panoptic_fusion", "NucleiRCNN": "maskrcnn_baseline",
           "ClassicalWatershed": "classical_watershed"}

_TOP_KEYS = {"format_version": int, "format": str, "meta_architecture": str, "config": dict, "preprocessing": dict,
             "networks": dict}
_NETWORK_KEYS = {"file": str, "sha256": str, "inputs": list, "outputs": list, "size_multiple": int, "pad_mode": str}
_PREPROCESSING_KEYS = {"pixel_mean": list, "pixel_std": list, "channel_order": list, "input_range": list}


class ExportError(ConfigError):
    """An export that cannot be made, or an export folder that cannot be used; one line naming what and why."""


def _plain(value: Any) -> Any:
    """A config value as JSON (yacs tuples -> lists)."""
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _config_value(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return _plain(node)


def build_sidecar(model: Any, cfg: Any, fmt: str, networks: Mapping[str, Any], config_file: str,
                  config_sha256: str) -> dict[str, Any]:
    """The sidecar of ``model`` (built from ``cfg``) exported to ``fmt`` with the ``networks`` entries of
    :func:`nuclei_d2.export.exporter.export_networks`; ``config_file`` / ``config_sha256``: the folder's config."""
    import torch

    from ..config import input_channel_names
    from ..version import __version__

    arch = str(cfg.MODEL.META_ARCHITECTURE)
    post_keys = list(getattr(model, "postprocess_keys", ()))
    # keys baked into the exported networks or read around them (an R-CNN's score / NMS thresholds), for the reader
    post_keys += [k for k in getattr(model, "export_keys", ()) if k not in post_keys]
    # a model whose network takes the raw 0-255 image and normalises it itself (the R-CNNs' "rcnn")
    inside = bool(getattr(model, "normalizes_inside", False))
    method_node = {"NucleusBoundaryUNet": "MODEL.NB", "TwoStageUNet": "MODEL.TWO_STAGE",
                   "BRPNet": "MODEL.BRPNET"}.get(arch)
    for extra in ("INFERENCE", "DISTANCE_ACTIVATION", "HV_HEAD"):
        key = f"{method_node}.{extra}" if method_node else ""
        if key and key not in post_keys and extra in _config_value(cfg, method_node):
            post_keys.append(key)
    tiling = {f"MODEL.TILING.{k}": _plain(v) for k, v in cfg.MODEL.TILING.items()}
    tiling.update({f"INFERENCE.{k}": _plain(cfg.INFERENCE[k]) for k in ("TILE_SIZE", "OVERLAP", "BATCH_SIZE")})
    return {
        "format_version": FORMAT_VERSION,
        "format": fmt,
        "meta_architecture": arch,
        "method": METHODS.get(arch, arch),
        "nuclei_d2_version": __version__,
        "torch_version": torch.__version__,
        "config": {"file": config_file, "sha256": config_sha256},
        "preprocessing": {
            "input_range": [0, 255],
            "channel_order": input_channel_names(cfg),
            "layout": "CHW" if inside else "NCHW",
            "dtype": "float32",
            "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
            "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
            "normalize": ("done inside the network: give it the 0-255 pixels as float32 (pixel_mean / pixel_std "
                          "listed for reference)") if inside else
                         "x = (pixel - pixel_mean[c]) / pixel_std[c] per channel c, pixels 0-255 as float32",
            "extra_channels": list(cfg.INPUT.EXTRA_CHANNELS),
            # INPUT.NUCLEI.SCALE: resize the image by this factor first (bilinear), bring the label map back after
            "scale": float(cfg.INPUT.NUCLEI.SCALE),
        },
        "tiling": tiling,
        "postprocess": {k: _config_value(cfg, k) for k in post_keys},
        "outputs": list(getattr(model, "prob_names", ()) or getattr(model, "output_names", ())),
        "networks": dict(networks),
    }


def write_sidecar(folder: str | os.PathLike, sidecar: Mapping[str, Any]) -> Path:
    """Write ``export.json`` into ``folder`` atomically."""
    return write_json_atomic(Path(folder) / SIDECAR, dict(sidecar), indent=2)


def _check_fields(obj: Mapping[str, Any], keys: Mapping[str, type], where: str, path: Path) -> None:
    for key, kind in keys.items():
        if key not in obj:
            raise ExportError(f"{path}: {where}has no {key!r} (not an export of tools/export_model.py, or damaged)")
        if not isinstance(obj[key], kind) or (kind is int and isinstance(obj[key], bool)):
            raise ExportError(f"{path}: {where}{key!r} must be a {kind.__name__}, got {type(obj[key]).__name__}")


def _own_file(folder: Path, name: str, path: Path, what: str) -> Path:
    """``folder/name`` for a bare file name (no folder part: an export never points outside itself)."""
    if not name or name != os.path.basename(name) or name in (".", ".."):
        raise ExportError(f"{path}: {what} file {name!r} must be a plain file name inside the export folder")
    return folder / name


def _check_sha256(file: Path, expected: str, path: Path, what: str) -> None:
    if not file.is_file():
        raise ExportError(f"{file}: {what} file missing (listed in {path}); export again with tools/export_model.py")
    got = file_sha256(file)
    if got != expected:
        raise ExportError(f"{file}: sha256 {got[:12]}... does not match {path} ({expected[:12]}...): the file was "
                          "changed or damaged after export; export again with tools/export_model.py")


def read_sidecar(folder: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """The checked ``export.json`` of an export folder (``verify``: also every file's sha256).

    Raises:
        ExportError: a missing folder or sidecar, bad JSON, a missing or mistyped field, an unknown format or version,
            a network or config file that is missing or whose sha256 differs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: export folder not found (make one with tools/export_model.py; "
                          "INFERENCE.EXPORTED / --exported)")
    path = folder / SIDECAR
    sidecar = read_json(path, "export sidecar", error=ExportError, missing=ExportError)
    if not isinstance(sidecar, dict):
        raise ExportError(f"{path}: must hold a JSON object, got {type(sidecar).__name__}")
    _check_fields(sidecar, _TOP_KEYS, "", path)
    if sidecar["format_version"] != FORMAT_VERSION:
        raise ExportError(f"{path}: format_version {sidecar['format_version']} is not the {FORMAT_VERSION} this "
                          "nuclei-d2 reads; export again with this version's tools/export_model.py")
    if sidecar["format"] not in FORMATS:
        raise ExportError(f"{path}: unknown format {sidecar['format']!r} (one of {sorted(FORMATS)})")
    _check_fields(sidecar["preprocessing"], _PREPROCESSING_KEYS, "preprocessing ", path)
    pre = sidecar["preprocessing"]
    if not len(pre["pixel_mean"]) == len(pre["pixel_std"]) == len(pre["channel_order"]):
        raise ExportError(f"{path}: preprocessing pixel_mean, pixel_std and channel_order differ in length")
    _check_fields(sidecar["config"], {"file": str, "sha256": str}, "config ", path)
    if not sidecar["networks"]:
        raise ExportError(f"{path}: lists no networks")
    suffix = FORMATS[sidecar["format"]]
    for name, spec in sidecar["networks"].items():
        if not isinstance(spec, dict):
            raise ExportError(f"{path}: network {name!r} must be a JSON object")
        _check_fields(spec, _NETWORK_KEYS, f"network {name!r} ", path)
        if not spec["file"].endswith(suffix):
            raise ExportError(f"{path}: network {name!r} file {spec['file']!r} is not a {suffix} file, as format "
                              f"{sidecar['format']!r} needs")
        if spec["size_multiple"] < 1 or spec["pad_mode"] not in ("reflect", "replicate", "constant"):
            raise ExportError(f"{path}: network {name!r} has size_multiple {spec['size_multiple']} / pad_mode "
                              f"{spec['pad_mode']!r} (need >= 1 / reflect, replicate or constant)")
        for kind in ("inputs", "outputs"):
            if not spec[kind] or not all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                         and isinstance(t.get("shape"), list) for t in spec[kind]):
                raise ExportError(f"{path}: network {name!r} {kind} must be a non-empty list of {{name, shape}}")
        file = _own_file(folder, spec["file"], path, f"network {name!r}")
        if verify:
            _check_sha256(file, spec["sha256"], path, f"network {name!r}")
    config = _own_file(folder, sidecar["config"]["file"], path, "config")
    if verify:
        _check_sha256(config, sidecar["config"]["sha256"], path, "config")
    return sidecar

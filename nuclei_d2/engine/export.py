"""What ``tools/export_model.py`` does, and the runtime switch for the tools that run models.

:func:`export_from_config` builds a model from a config (or a model zoo entry) and its weights and writes an export
folder through :func:`export_model`: the networks' files, ``config.yaml`` (the config with its weights keys emptied:
the files are the weights) and ``export.json`` (:mod:`nuclei_d2.export.sidecar`). The folder is made under a temporary
name beside ``output`` and renamed into place only when everything was written and read back: a failed export leaves
nothing half-written. With ``quantize="int8"`` the ONNX files are quantised (:mod:`nuclei_d2.export.quantize`) on the
network inputs :func:`calibration_inputs` records while the model segments real images. :func:`install_runtime` is
:func:`nuclei_d2.export.runtime.install_runtime` (re-exported for the tools).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..export.exporter import export_networks, exportable_networks
from ..export.quantize import QUANTIZATIONS, quantize_onnx
from ..export.runtime import install_runtime
from ..export.sidecar import FORMATS, SIDECAR, ExportError, build_sidecar, read_sidecar, write_sidecar
from ..model_zoo.manifest import ZOO_PREFIX
from ..utils.io import IMAGE_SUFFIXES, file_sha256, read_image_rgb
from .defaults import RANDOM_INIT_OPTS, setup_cfg

__all__ = ["EXPORTED_CONFIG", "calibration_images", "calibration_inputs", "export_from_config", "export_model",
           "exported_config", "install_runtime"]

logger = logging.getLogger(__name__)

#: The config file of an export folder.
EXPORTED_CONFIG = "config.yaml"
#: Keys emptied in an export's config: the exported files hold every weight (sub-models included).
_NO_WEIGHTS = (*RANDOM_INIT_OPTS, "MODEL.BRPNET.DENSENET_WEIGHTS", "", "TEST.ENSEMBLE.WEIGHTS", "[]",
               "TEST.ENSEMBLE.CONFIGS", "[]", "INFERENCE.RUNTIME", "torch", "INFERENCE.EXPORTED", "")


def exported_config(cfg: Any) -> Any:
    """``cfg`` as an export folder keeps it: weights keys emptied, runtime "torch" (the loader sets its own)."""
    out = cfg.clone()
    out.defrost()
    out.merge_from_list(list(_NO_WEIGHTS))
    return out


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise ExportError(f"{output}: exists and is not a folder; give --output a new or an export folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ExportError(f"{output}: folder exists and is not empty; give another --output or --overwrite")
        if not (output / SIDECAR).is_file():
            raise ExportError(f"{output}: not an export folder (no {SIDECAR}); --overwrite replaces export folders "
                              "only, so nothing else is deleted by mistake")


def _check_quantize(model: Any, fmt: str, quantize: str) -> None:
    """A quantisation this model and format can have, or a one-line :class:`ExportError`."""
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantisation {quantize!r}; use one of {list(QUANTIZATIONS)}")
    if quantize == "none":
        return
    if fmt != "onnx":
        raise ExportError(f"int8 quantisation is made for ONNX Runtime: use --format onnx, not {fmt}")
    if getattr(model, "normalizes_inside", False):
        raise ExportError(f"{type(model).__name__} cannot be quantised to int8: its 'rcnn' graph holds the "
                          "detection post-processing (box decoding, NMS, RoIAlign), which is not quantised; "
                          "export it in float32 (--quantize none)")


def calibration_images(cfg: Any, source: str | None, count: int) -> list[tuple[str, np.ndarray]]:
    """Up to ``count`` (name, RGB image) pairs to calibrate int8 quantisation with: from ``source``, a folder of
    images (sorted by name) or a registered dataset name, by default the config's first ``DATASETS.TRAIN``."""
    if count < 1:
        raise ConfigError(f"--calibration-images must be at least 1, got {count}")
    if not source:
        if not cfg.DATASETS.TRAIN:
            raise ConfigError("int8 quantisation needs calibration images: give --calibration DIR (a folder of "
                              "images like the ones the model will segment) or a dataset name; the config has no "
                              "DATASETS.TRAIN to default to")
        source = str(cfg.DATASETS.TRAIN[0])
    folder = Path(source)
    if folder.is_dir():
        files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                       and not f.name.startswith("."))
        if not files:
            raise ConfigError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) to calibrate with")
    else:
        from detectron2.data import DatasetCatalog

        if source not in DatasetCatalog.list():
            raise ConfigError(f"calibration source {source!r} is neither a folder of images nor a registered dataset "
                              "(NUCLEI_D2_DATASETS; docs/datasets.md)")
        files = [Path(d["file_name"]) for d in DatasetCatalog.get(source)]
    return [(f.name, read_image_rgb(f)) for f in files[:count]]


def calibration_inputs(model: Any, cfg: Any, images: list[tuple[str, np.ndarray]], max_batches: int = 64
                       ) -> dict[str, list[tuple[Any, ...]]]:
    """The inputs each network of ``model`` receives while it segments ``images`` the way inference does (the test
    mapper, the model's tiling and test-time augmentation): ``{name: [input tuple per call]}``, at most
    ``max_batches`` calls kept per network (memory)."""
    import torch

    from ..data.mapper import NucleiDatasetMapper

    modules = model.network_modules()
    recorded: dict[str, list[tuple[Any, ...]]] = {name: [] for name in modules}

    def recorder(name: str):
        def run(*inputs):
            if len(recorded[name]) < max_batches:
                recorded[name].append(tuple(t.detach().to("cpu").float().clone() for t in inputs))
            return modules[name](*inputs)
        return run

    mapper = NucleiDatasetMapper(cfg, is_train=False)
    previous = model.runtime
    model.set_runtime({name: recorder(name) for name in modules})
    try:
        with torch.no_grad():
            for i, (name, image) in enumerate(images, 1):
                logger.info("calibration image %d/%d: %s (%d x %d)", i, len(images), name, *image.shape[:2])
                h, w = image.shape[:2]
                model([mapper({"image": image, "height": h, "width": w})])
    finally:
        model.set_runtime(previous)
    logger.info("recorded calibration inputs on %d image(s): %s", len(images),
                ", ".join(f"{n} {len(v)} batch(es)" for n, v in recorded.items()))
    return recorded


def export_model(model: Any, cfg: Any, output: str | os.PathLike, fmt: str, *, overwrite: bool = False,
                 quantize: str = "none", calibration: list[tuple[str, np.ndarray]] | None = None,
                 calibrate_method: str = "minmax") -> Path:
    """Export ``model`` (built from ``cfg``, weights loaded) to the folder ``output`` in ``fmt`` ("onnx" or
    "torchscript"); returns the folder. Atomic: written under a temporary name beside ``output``, read back and checked
    (:func:`read_sidecar`), then renamed into place. ``quantize="int8"`` (ONNX only): each network quantised on the
    inputs it receives while the model segments the ``calibration`` images (:func:`calibration_images`).

    Raises:
        ExportError: an unknown format, a method that cannot be exported (the message says why), a network whose
            exported outputs differ from PyTorch's, an unusable ``output``, a quantisation that cannot be made.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    _check_quantize(model, fmt, quantize)
    if quantize != "none" and not calibration:
        raise ExportError("int8 quantisation needs calibration images (calibration_images(); --calibration)")
    output = Path(output)
    _check_output(output, overwrite)
    exportable_networks(model)  # a method that cannot be exported says so before any file is written
    if cfg.TEST.ENSEMBLE.WEIGHTS:
        logger.warning("TEST.ENSEMBLE members are not exported: the export holds the main model only")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        model.eval()
        networks = export_networks(model, tmp, fmt)
        if quantize == "int8":
            samples = calibration_inputs(model, cfg, calibration)
            nets = exportable_networks(model)
            for name, spec in networks.items():
                if not samples.get(name):  # e.g. BRP-Net's refinement nets when the images gave no proposal
                    logger.warning("%s: the %d calibration image(s) never reached this network; it stays float32 "
                                   "(calibrate on more or other images to quantise it)", name, len(calibration))
                    spec["quantization"] = {"type": "none", "reason": "no calibration inputs reached it"}
                    continue
                spec["quantization"] = quantize_onnx(tmp / spec["file"], nets[name], name, samples[name],
                                                     calibrate_method=calibrate_method)
                spec["quantization"]["calibration_images"] = len(calibration)
                spec["sha256"] = file_sha256(tmp / spec["file"])
        config_path = tmp / EXPORTED_CONFIG
        config_path.write_text(exported_config(cfg).dump())
        write_sidecar(tmp, build_sidecar(model, cfg, fmt, networks, EXPORTED_CONFIG, file_sha256(config_path)))
        read_sidecar(tmp)  # what a runtime will check, before the folder takes its name
        os.chmod(tmp, 0o755)
        old = None
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
        os.replace(tmp, output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %s (%s) to %s: %s", type(model).__name__, fmt, output, ", ".join(sorted(networks)))
    return output


def export_from_config(config_file: str | None, fmt: str, output: str | os.PathLike, *, weights: str | None = None,
                       model_name: str | None = None, opts: Sequence[str] = (), allow_untrained: bool = False,
                       overwrite: bool = False, quantize: str = "none", calibration: str | None = None,
                       calibration_count: int = 4, calibrate_method: str = "minmax") -> Path:
    """Build the model of ``config_file`` (or of the model zoo entry ``model_name``), load ``weights`` (or the
    config's / entry's ``MODEL.WEIGHTS``) and :func:`export_model` it. ``opts``: ``KEY VALUE`` overrides;
    ``allow_untrained``: export random weights when there are none (speed tests only); ``quantize="int8"``: calibrated
    on ``calibration_count`` images of ``calibration`` (a folder or a dataset; default the first training set)."""
    from ..checkpoint import NucleiCheckpointer
    from ..modeling.build import build_nuclei_model

    if bool(config_file) == bool(model_name):
        raise ConfigError("give a config file or a model zoo name (not both)")
    source = f"{ZOO_PREFIX}{model_name}" if model_name else str(config_file)
    opts = list(opts) + (["MODEL.WEIGHTS", weights] if weights else []) + ["INFERENCE.RUNTIME", "torch"]
    cfg = setup_cfg(source, opts, eval_only=True)
    if not cfg.MODEL.WEIGHTS and not allow_untrained and cfg.MODEL.META_ARCHITECTURE != "ClassicalWatershed":
        raise ConfigError(f"{source}: no weights to export (MODEL.WEIGHTS is empty): give --weights, or "
                          "--allow-untrained to export random weights (speed tests only)")
    model = build_nuclei_model(cfg)
    exportable_networks(model)  # before loading weights: a method that cannot be exported says so at once
    images = None
    _check_quantize(model, fmt, quantize)
    if quantize == "int8":
        _check_output(Path(output), overwrite)  # before reading the calibration images
        images = calibration_images(cfg, calibration, calibration_count)
    if cfg.MODEL.WEIGHTS:
        NucleiCheckpointer.from_config(model, cfg, config_file=source).load(cfg.MODEL.WEIGHTS)
    return export_model(model.eval(), cfg, output, fmt, overwrite=overwrite, quantize=quantize, calibration=images,
                        calibrate_method=calibrate_method)

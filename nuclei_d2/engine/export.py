"""What ``tools/export_model.py`` does, and the runtime switch for the tools that run models.

:func:`export_from_config` builds a model from a config (or a model zoo entry) and its weights and writes an export
folder through :func:`export_model`: the networks' files, ``config.yaml`` (the config with its weights keys emptied:
the files are the weights) and ``export.json`` (:mod:`nuclei_d2.export.sidecar`). The folder is made under a temporary
name beside ``output`` and renamed into place only when everything was written and read back: a failed export leaves
nothing half-written. :func:`install_runtime` is :func:`nuclei_d2.export.runtime.install_runtime` (re-exported for
the tools).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..export.exporter import export_networks, exportable_networks
from ..export.runtime import install_runtime
from ..export.sidecar import FORMATS, SIDECAR, ExportError, build_sidecar, read_sidecar, write_sidecar
from ..model_zoo.manifest import ZOO_PREFIX
from ..utils.io import file_sha256
from .defaults import RANDOM_INIT_OPTS, setup_cfg

__all__ = ["EXPORTED_CONFIG", "export_from_config", "export_model", "exported_config", "install_runtime"]

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


def export_model(model: Any, cfg: Any, output: str | os.PathLike, fmt: str, *, overwrite: bool = False) -> Path:
    """Export ``model`` (built from ``cfg``, weights loaded) to the folder ``output`` in ``fmt`` ("onnx" or
    "torchscript"); returns the folder. Atomic: written under a temporary name beside ``output``, read back and checked
    (:func:`read_sidecar`), then renamed into place.

    Raises:
        ExportError: an unknown format, a method that cannot be exported (the message says why), a network whose
            exported outputs differ from PyTorch's, an unusable ``output``.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
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
                       overwrite: bool = False) -> Path:
    """Build the model of ``config_file`` (or of the model zoo entry ``model_name``), load ``weights`` (or the
    config's / entry's ``MODEL.WEIGHTS``) and :func:`export_model` it. ``opts``: ``KEY VALUE`` overrides;
    ``allow_untrained``: export random weights when there are none (speed tests only)."""
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
    if cfg.MODEL.WEIGHTS:
        NucleiCheckpointer.from_config(model, cfg, config_file=source).load(cfg.MODEL.WEIGHTS)
    return export_model(model.eval(), cfg, output, fmt, overwrite=overwrite)

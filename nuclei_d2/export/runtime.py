"""Run an export folder's networks: ONNX Runtime sessions or TorchScript modules behind the model's ``set_runtime``.

:func:`load_runtime` checks the folder (:func:`~.sidecar.read_sidecar`: fields, sha256 of every file) and returns
``{name: callable}``; each callable takes and returns torch tensors exactly like the eager network it replaces, any
input size included (it pads to the network's ``size_multiple`` as the eager U-Net does, and crops back).
:func:`install_runtime` does this for a model built from a config whose ``INFERENCE.RUNTIME`` is not "torch", after
checking that the export is of that model (meta-architecture, normalisation, networks).

Loading never runs Python code from the folder: ONNX files are graphs; a TorchScript file is a TorchScript program
that ``torch.jit.load`` interprets (no pickle of Python objects), and both are sha256-checked against the sidecar
first.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .sidecar import SIDECAR, ExportError, read_sidecar

__all__ = ["RUNTIMES", "RUNTIME_FORMAT", "ExportedNetwork", "check_runtime_config", "install_runtime",
           "load_runtime", "runtime_of_export"]

logger = logging.getLogger(__name__)

#: INFERENCE.RUNTIME values.
RUNTIMES = ("torch", "onnxruntime", "torchscript")
#: Runtime -> the export format it runs.
RUNTIME_FORMAT = {"onnxruntime": "onnx", "torchscript": "torchscript"}


def _pad_mode(mode: str, ph: int, pw: int, h: int, w: int) -> str:
    """The eager U-Net's rule: reflection needs the pad smaller than the side; replication otherwise."""
    return "replicate" if mode == "reflect" and (ph >= h or pw >= w) else mode


class ExportedNetwork:
    """One exported network as a callable on torch tensors (see the module docstring)."""

    def __init__(self, name: str, spec: Mapping[str, Any], run: Callable[[list[torch.Tensor]], list[torch.Tensor]],
                 where: str):
        self.name = name
        self.spec = dict(spec)
        self._run = run
        self.where = where
        self.shapes = [list(t["shape"]) for t in spec["inputs"]]
        self.fixed_size = tuple(spec["fixed_size"]) if spec.get("fixed_size") else None

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self.shapes):
            raise ValueError(f"{self.where}: network {self.name!r} takes {len(self.shapes)} inputs, got "
                             f"{len(inputs)}")
        for t, shape in zip(inputs, self.shapes, strict=True):
            if t.dim() != len(shape) or any(isinstance(d, int) and i > 0 and t.shape[i] != d
                                            for i, d in enumerate(shape)):
                raise ValueError(f"{self.where}: network {self.name!r} takes {' x '.join(map(str, shape))}, got "
                                 f"{tuple(t.shape)}")
        device = inputs[0].device
        m = int(self.spec["size_multiple"]) if len(self.shapes[0]) == 4 else 1  # images: sides to a multiple of m
        h, w = (int(s) for s in inputs[0].shape[-2:])
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            mode = _pad_mode(self.spec["pad_mode"], ph, pw, h, w)
            inputs = tuple(F.pad(t.float(), (0, pw, 0, ph), mode=mode) for t in inputs)
        outs = self._run([t.detach().to("cpu").contiguous() for t in inputs])
        outs = [o[..., :h, :w] if (ph or pw) else o for o in outs]
        outs = [o.to(device) for o in outs]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __repr__(self) -> str:
        return f"ExportedNetwork({self.name!r}, {self.where})"


def _onnx_runner(path: Path, spec: Mapping[str, Any], threads: int
                 ) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types; a damaged file passing sha256 cannot happen
        raise ExportError(f"{path}: ONNX Runtime cannot load it ({str(e).strip().splitlines()[0]})") from e
    in_names = [t["name"] for t in spec["inputs"]]
    out_names = [t["name"] for t in spec["outputs"]]
    have = [i.name for i in sess.get_inputs()]
    if have != in_names:
        raise ExportError(f"{path}: its inputs are {have}, the sidecar says {in_names}")

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        outs = sess.run(out_names, {n: t.numpy() for n, t in zip(in_names, inputs, strict=True)})
        return [torch.from_numpy(np.asarray(o)) for o in outs]

    return run


def _torchscript_runner(path: Path) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": the format QuPath reads
            module = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise ExportError(f"{path}: torch.jit.load cannot load it ({str(e).strip().splitlines()[0]})") from e

    def run(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.no_grad():
            out = module(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    return run


def load_runtime(folder: str | os.PathLike, runtime: str, threads: int = 0
                 ) -> tuple[dict[str, Any], dict[str, ExportedNetwork]]:
    """(the checked sidecar, ``{name: callable}``) of an export folder for ``runtime`` ("onnxruntime" or
    "torchscript"; it must match the folder's format). ``threads``: ONNX Runtime's intra-op threads (0 =
    ``torch.get_num_threads()``, so the two runtimes compare at equal threads)."""
    if runtime not in RUNTIME_FORMAT:
        raise ExportError(f"runtime {runtime!r} does not run exported files; use one of {sorted(RUNTIME_FORMAT)}")
    sidecar = read_sidecar(folder)
    folder = Path(folder)
    if sidecar["format"] != RUNTIME_FORMAT[runtime]:
        want = next(r for r, f in RUNTIME_FORMAT.items() if f == sidecar["format"])
        raise ExportError(f"{folder / SIDECAR}: the folder holds {sidecar['format']} files, which runtime {runtime!r} "
                          f"does not run: use INFERENCE.RUNTIME {want} (--runtime {want}), or export to "
                          f"{RUNTIME_FORMAT[runtime]}")
    threads = int(threads) if threads and threads > 0 else max(1, torch.get_num_threads())
    fns: dict[str, ExportedNetwork] = {}
    for name, spec in sidecar["networks"].items():
        path = folder / spec["file"]
        run = _onnx_runner(path, spec, threads) if runtime == "onnxruntime" else _torchscript_runner(path)
        fns[name] = ExportedNetwork(name, spec, run, str(path))
    int8 = sorted(n for n, spec in sidecar["networks"].items()
                  if isinstance(spec.get("quantization"), dict) and spec["quantization"].get("type") == "int8")
    logger.info("loaded %d exported network(s) from %s for %s (%s)%s", len(fns), folder, runtime,
                f"{threads} threads" if runtime == "onnxruntime" else "torch threads",
                f"; int8: {', '.join(int8)}" if int8 else "")
    return sidecar, fns


def runtime_of_export(folder: str | os.PathLike) -> str:
    """The runtime that runs an export folder's files ("onnxruntime" for ONNX, "torchscript"), from its sidecar."""
    fmt = read_sidecar(folder, verify=False)["format"]
    return next(r for r, f in RUNTIME_FORMAT.items() if f == fmt)


def check_runtime_config(cfg: Any) -> bool:
    """Check ``INFERENCE.RUNTIME`` / ``EXPORTED`` (one line on a bad value or a missing folder); True when an exported
    runtime replaces the weights."""
    runtime = str(cfg.INFERENCE.RUNTIME)
    if runtime not in RUNTIMES:
        raise ConfigError(f"INFERENCE.RUNTIME must be one of {list(RUNTIMES)}, got {runtime!r}")
    if runtime == "torch":
        return False
    exported = str(cfg.INFERENCE.EXPORTED)
    if not exported:
        raise ConfigError(f"INFERENCE.RUNTIME is {runtime!r} but INFERENCE.EXPORTED is empty: give the export folder "
                          "(tools/export_model.py --output DIR; --exported DIR)")
    if not (Path(exported) / SIDECAR).is_file():
        raise ConfigError(f"INFERENCE.EXPORTED: {exported}: no {SIDECAR} there (not an export folder of "
                          "tools/export_model.py)")
    return True


def _same_floats(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-6 * max(1.0, abs(float(y))) for x, y in zip(a, b))


def install_runtime(model: torch.nn.Module, cfg: Any) -> dict[str, Any] | None:
    """Install ``cfg``'s exported runtime into ``model`` (built from ``cfg``, not wrapped); returns the sidecar, or
    None when ``INFERENCE.RUNTIME`` is "torch". The export must be of this model: same meta-architecture, input
    channels and normalisation, and exactly the networks the model's configured inference runs."""
    if not check_runtime_config(cfg):
        return None
    from ..modeling.networks import NotExportableError

    name = type(model).__name__
    if not callable(getattr(model, "set_runtime", None)):
        raise ConfigError(f"INFERENCE.RUNTIME {cfg.INFERENCE.RUNTIME}: {name} cannot run exported networks (it has "
                          "no set_runtime(); nuclei_d2/modeling/networks.py)")
    sidecar, fns = load_runtime(cfg.INFERENCE.EXPORTED, cfg.INFERENCE.RUNTIME, int(cfg.INFERENCE.RUNTIME_THREADS))
    where = Path(cfg.INFERENCE.EXPORTED) / SIDECAR
    if sidecar["meta_architecture"] != cfg.MODEL.META_ARCHITECTURE:
        raise ConfigError(f"{where}: exported from a {sidecar['meta_architecture']}, but the config's "
                          f"MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE}")
    pre = sidecar["preprocessing"]
    if not (_same_floats(pre["pixel_mean"], cfg.MODEL.PIXEL_MEAN) and _same_floats(pre["pixel_std"],
                                                                                     cfg.MODEL.PIXEL_STD)):
        raise ConfigError(f"{where}: exported with PIXEL_MEAN {pre['pixel_mean']} / PIXEL_STD {pre['pixel_std']}, "
                          f"the config has {list(cfg.MODEL.PIXEL_MEAN)} / {list(cfg.MODEL.PIXEL_STD)}")
    from ..config import input_channel_names

    if list(pre["channel_order"]) != input_channel_names(cfg):
        raise ConfigError(f"{where}: exported for input channels {pre['channel_order']}, the config gives "
                          f"{input_channel_names(cfg)}")
    try:
        wanted = set(model.network_modules()) if hasattr(model, "network_modules") else set(model.networks())
    except NotExportableError as e:
        raise ConfigError(str(e)) from e
    if set(fns) != wanted:
        raise ConfigError(f"{where}: holds networks {sorted(fns)}, but this config's {name} runs {sorted(wanted)} "
                          "(another inference mode than the one exported?)")
    model.set_runtime(fns)
    logger.info("%s runs its networks %s through %s from %s", name, sorted(fns), cfg.INFERENCE.RUNTIME,
                cfg.INFERENCE.EXPORTED)
    return sidecar

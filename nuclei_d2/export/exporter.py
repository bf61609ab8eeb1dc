"""Export the networks of a built, loaded model to ONNX or TorchScript: one file per network, each checked.

What is exported is the model's :meth:`~nuclei_d2.modeling.networks.ExportableNetworks.networks` (tensor-in /
tensor-out, eval mode), never the tiling or post-processing around them, which stay nuclei-d2 code (or the reader's,
following docs/export.md). Each file is checked after writing: loaded in its runtime and run on inputs of another size
(and batch) than the example it was traced with; outputs must equal PyTorch's within ``atol + rtol * |eager|``, so a
graph that baked in the example's shape fails here and not in a user's hands.

* ONNX: ``torch.onnx.export`` through the TorchScript tracer (``dynamo=False``: seconds, not minutes, for a DenseNet),
  opset :data:`ONNX_OPSET`, dynamic batch / height / width where the network allows them.
* TorchScript: ``torch.jit.trace`` (the networks are shape-generic convolutions; the check on another size confirms
  the trace did not bake one in), saved with ``torch.jit.save``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..modeling.networks import NetworkIO, NotExportableError, network_io
from ..utils.io import file_sha256
from .sidecar import FORMATS, ExportError

__all__ = ["ONNX_OPSET", "exportable_networks", "export_network", "export_networks"]

logger = logging.getLogger(__name__)

#: ONNX opset of exported files (ONNX Runtime 1.16 and later run it; the pinned 1.31 does).
ONNX_OPSET = 17
#: Tolerance of the check after export: ``|exported - eager| <= ATOL + RTOL * |eager|`` (float32 kernels differ).
ATOL, RTOL = 1e-4, 1e-3


def exportable_networks(model: nn.Module) -> dict[str, nn.Module]:
    """The model's networks (eval mode), or an :class:`ExportError` naming the method and why it cannot be exported."""
    name = type(model).__name__
    reason = getattr(model, "export_unsupported", None)
    if reason:
        raise ExportError(f"{name} cannot be exported: {reason}")
    if not callable(getattr(model, "networks", None)):
        raise ExportError(f"{name} cannot be exported: it does not expose its networks (networks(), run_network(), "
                          "set_runtime(): the contract of nuclei_d2/modeling/networks.py)")
    try:
        nets = model.networks()
    except NotExportableError as e:
        raise ExportError(str(e)) from e
    if not nets:
        raise ExportError(f"{name} cannot be exported: it lists no networks")
    return nets


def _check_inputs(io: NetworkIO, module: nn.Module | None = None
                  ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """(the example traced with, the check input of another batch and size): the module's ``export_examples()`` when
    it has one."""
    if module is not None and callable(getattr(module, "export_examples", None)):
        traced, check = module.export_examples()
        return tuple(traced), tuple(check)
    example = io.example_inputs(batch=1, seed=0)
    h, w = example[0].shape[-2:]
    m = max(1, io.size_multiple)
    other = None if io.fixed_size is not None else (h + 2 * m * max(1, 8 // m), w + 3 * m * max(1, 8 // m))
    return example, io.example_inputs(batch=3 if io.dynamic_batch else 1, size=other, seed=1)


def _as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _export_onnx(module: nn.Module, io: NetworkIO, example: tuple[torch.Tensor, ...], path: Path) -> None:
    ins, outs = io.shapes()
    dynamic = {n: {i: d for i, d in enumerate(shape) if isinstance(d, str)}
               for n, shape in zip((*io.inputs, *io.outputs), (*ins, *outs), strict=True)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python checks on shapes, the exporter's deprecation
        torch.onnx.export(module, example, str(path), input_names=list(io.inputs), output_names=list(io.outputs),
                          dynamic_axes=dynamic, opset_version=ONNX_OPSET, do_constant_folding=True, dynamo=False)


def _export_torchscript(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))  # ("deprecated" in favour of torch.export: but the format libtorch reads)


def _run_exported(path: Path, fmt: str, io: NetworkIO, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        outs = sess.run(list(io.outputs), {n: t.numpy() for n, t in zip(io.inputs, inputs, strict=True)})
        return tuple(torch.from_numpy(np.asarray(o)) for o in outs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    return _as_tuple(loaded(*inputs))


def export_network(module: nn.Module, name: str, folder: str | Path, fmt: str) -> dict[str, Any]:
    """Export one network into ``folder/<name><suffix>``, check it on another input size, and return its sidecar entry
    (file, sha256, inputs / outputs, padding rule, the check's largest difference)."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; use one of {sorted(FORMATS)}")
    io = network_io(module, name)
    path = Path(folder) / f"{name}{FORMATS[fmt]}"
    module = module.eval()
    example, check = _check_inputs(io, module)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            module = module.to("cpu")
            if fmt == "onnx":
                _export_onnx(module, io, example, path)
            else:
                _export_torchscript(module, example, path)
            eager = _as_tuple(module(*check))
            got = _run_exported(path, fmt, io, check)
    except ExportError:
        raise
    except Exception as e:  # the exporters' own errors are long; say which network and keep the first line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"{name}: {fmt} export failed ({type(e).__name__}: {first})") from e
    finally:
        module.to(device)
    if len(got) != len(eager):
        raise ExportError(f"{name}: the exported {fmt} file gives {len(got)} outputs, PyTorch {len(eager)}")
    worst = 0.0
    for out_name, a, b in zip(io.outputs, got, eager, strict=True):
        if tuple(a.shape) != tuple(b.shape):
            raise ExportError(f"{name}: exported output {out_name!r} has shape {tuple(a.shape)} on a "
                              f"{tuple(check[0].shape)} input, PyTorch {tuple(b.shape)}: the export baked in the "
                              "example's shape")
        if not a.is_floating_point():  # (indices, classes: equal or not)
            if not torch.equal(a, b):
                raise ExportError(f"{name}: exported output {out_name!r} differs from PyTorch's")
            continue
        diff = (a.float() - b.float()).abs()
        excess = float((diff - RTOL * b.float().abs()).max()) if diff.numel() else 0.0
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
        if excess > ATOL:
            raise ExportError(f"{name}: exported output {out_name!r} differs from PyTorch by up to "
                              f"{float(diff.max()):.3g} on a {tuple(check[0].shape)} input (tolerance {ATOL} + "
                              f"{RTOL} x |value|): this network does not export faithfully to {fmt}")
    logger.info("exported %s -> %s (checked on %s: max |diff| %.2e)", name, path.name, tuple(check[0].shape), worst)
    return {"file": path.name, "sha256": file_sha256(path), **io.to_json(),
            "check": {"input_shape": list(check[0].shape), "max_abs_diff": worst, "atol": ATOL, "rtol": RTOL}}


def export_networks(model: nn.Module, folder: str | Path, fmt: str) -> dict[str, dict[str, Any]]:
    """Every network of ``model`` exported into ``folder`` (:func:`export_network`); the sidecar's "networks"."""
    return {name: export_network(module, name, folder, fmt) for name, module in exportable_networks(model).items()}

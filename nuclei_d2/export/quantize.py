"""Static int8 quantisation of exported ONNX networks, calibrated on the inputs the model really sees (issue 27).

ONNX Runtime's float32 convolutions are barely faster than eager PyTorch's channels-last ones for ReLU U-Nets
(docs/export.md, "Speed"); its int8 convolutions (VNNI on recent x86 CPUs) are 2-3x faster. Static quantisation
needs the activations' ranges, so :func:`quantize_onnx` takes calibration inputs: the tensors the network received
while the model segmented real images (:func:`nuclei_d2.engine.export.calibration_inputs` records them through the
network contract's runtime hook), never random ones, whose ranges are not the network's.

Scheme: ONNX Runtime's ``quantize_static`` in the QDQ format (the graph stays a float32 graph with
QuantizeLinear / DequantizeLinear pairs, readable by any ONNX runtime), int8 weights per output channel, uint8
activations per tensor, ranges by ``calibrate_method`` (MinMax: the observed range). Networks keep their inputs and
outputs in float32, so nothing around them changes.

The result is checked against eager PyTorch on held-out calibration inputs: the outputs' mean absolute difference
relative to the range of eager outputs (max - min) must stay within :data:`INT8_RELATIVE_TOLERANCE` (int8 cannot meet
the float32 check's 1e-4; a broken quantisation is off by a quarter of the range or more). The AJI cost is measured
by ``benchmarks/export_speed.py`` and given in docs/export.md.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..modeling.networks import NetworkIO, network_io
from .exporter import _as_tuple, _run_exported
from .sidecar import ExportError

__all__ = ["CALIBRATE_METHODS", "INT8_RELATIVE_TOLERANCE", "QUANTIZATIONS", "quantize_onnx"]

logger = logging.getLogger(__name__)

#: ``--quantize`` values: "none" (float32) or "int8" (static, calibrated).
QUANTIZATIONS = ("none", "int8")
#: Calibration methods of ``onnxruntime.quantization.CalibrationMethod`` offered by the export tool.
CALIBRATE_METHODS = ("minmax", "percentile", "entropy")
#: The check after quantisation: mean |int8 - eager| <= this x (max - min of eager) on held-out calibration inputs.
INT8_RELATIVE_TOLERANCE = 0.05


def _split(samples: Sequence[tuple[torch.Tensor, ...]]) -> tuple[list, list]:
    """(calibration, check) samples: every fourth batch held out for the check (at least one), the rest calibrate."""
    if len(samples) < 2:
        return list(samples), list(samples)
    check = [s for i, s in enumerate(samples) if i % 4 == 3] or [samples[-1]]
    calib = [s for i, s in enumerate(samples) if i % 4 != 3]
    return calib, check


class _Reader:
    """``onnxruntime.quantization.CalibrationDataReader`` over recorded input tuples (duck-typed: ``get_next``)."""

    def __init__(self, names: Sequence[str], samples: Sequence[tuple[torch.Tensor, ...]]):
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            [{n: t.detach().cpu().float().numpy() for n, t in zip(names, s, strict=True)} for s in samples])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _relative_error(path: Path, module: torch.nn.Module, io: NetworkIO,
                    samples: Sequence[tuple[torch.Tensor, ...]]) -> tuple[float, float]:
    """(mean |int8 - eager| / (max - min of eager), max |int8 - eager|) over ``samples``, all outputs pooled."""
    err, count, worst = 0.0, 0, 0.0
    lo, hi = float("inf"), float("-inf")
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    with torch.no_grad():
        for s in samples:
            eager = _as_tuple(module(*(t.to(device) for t in s)))
            got = _run_exported(path, "onnx", io, s)
            for a, b in zip(got, eager, strict=True):
                ref = b.detach().cpu().double().numpy()
                d = np.abs(a.double().numpy() - ref)
                err, count = err + float(d.sum()), count + d.size
                if d.size:
                    worst = max(worst, float(d.max()))
                    lo, hi = min(lo, float(ref.min())), max(hi, float(ref.max()))
    return (err / max(count, 1)) / max(hi - lo, 1e-12), worst


def quantize_onnx(path: str | os.PathLike, module: torch.nn.Module, name: str,
                  samples: Sequence[tuple[torch.Tensor, ...]], *, calibrate_method: str = "minmax") -> dict[str, Any]:
    """Replace the float32 ONNX file ``path`` of network ``name`` (eager ``module``, its ``NetworkIO`` naming the
    tensors) by its int8 version, calibrated on three quarters of ``samples`` (input tuples) and checked on the rest;
    returns the sidecar's ``quantization`` entry. Raises :class:`ExportError` (nothing replaced) on no samples, an
    unknown method, a failed quantisation or outputs too far from eager PyTorch's."""
    path = Path(path)
    io = network_io(module, name)
    if not samples:
        raise ExportError(f"{name}: no calibration inputs recorded for int8 quantisation (the calibration images never "
                          "reached this network: too few images, or an inference mode that does not run it)")
    if calibrate_method not in CALIBRATE_METHODS:
        raise ExportError(f"unknown calibration method {calibrate_method!r}; use one of {list(CALIBRATE_METHODS)}")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
              "entropy": CalibrationMethod.Entropy}[calibrate_method]
    calib, check = _split(samples)
    module = module.eval()
    with tempfile.TemporaryDirectory(prefix=f".{name}.quant.", dir=path.parent) as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            # shape inference and constant folding first, as ONNX Runtime advises (symbolic shape inference cannot
            # follow the dynamic height / width of these graphs, the ONNX one can)
            quant_pre_process(str(path), str(pre), skip_symbolic_shape=True)
            quantize_static(str(pre), str(out), _Reader(io.inputs, calib), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=method)
        except Exception as e:  # onnxruntime's own errors are long: say which network and keep the first line
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"{name}: int8 quantisation failed ({type(e).__name__}: {first})") from e
        rel, worst = _relative_error(out, module, io, check)
        if not rel <= INT8_RELATIVE_TOLERANCE:
            raise ExportError(f"{name}: int8 outputs differ from PyTorch's by {rel:.1%} of their range on average on "
                              f"held-out calibration inputs (tolerance {INT8_RELATIVE_TOLERANCE:.0%}): export it in "
                              "float32 (--quantize none) or calibrate on more images")
        os.replace(out, path)
    logger.info("quantised %s to int8 (%s, %d calibration / %d check batches): mean |diff| %.2f%% of the "
                "outputs' range, max %.3g", name, calibrate_method, len(calib), len(check), 100 * rel, worst)
    return {"type": "int8", "format": "QDQ", "weights": "int8, per output channel", "activations": "uint8, per tensor",
            "calibrate_method": calibrate_method, "calibration_batches": len(calib), "check_batches": len(check),
            "check": {"mean_abs_diff_of_range": rel, "max_abs_diff": worst, "tolerance": INT8_RELATIVE_TOLERANCE}}

"""Mixed-precision training loops for ``SOLVER.AMP``: bfloat16 autocast on CPU, Detectron2's AMPTrainer on CUDA.

Detectron2's ``AMPTrainer`` needs CUDA (float16 with a gradient scaler). On a CPU with native bfloat16 (AVX512-BF16 /
AMX), autocasting the forward pass to bfloat16 makes the convolutions of our CPU configs markedly faster; bfloat16
has float32's exponent range, so no loss scaling is needed. Losses are summed in float32; weights, gradients and
the optimizer stay float32.
"""

from __future__ import annotations

import logging
import time

import torch
from detectron2.engine import AMPTrainer, SimpleTrainer

__all__ = ["AutocastTrainer", "amp_dtype", "build_train_loop", "cpu_has_native_bfloat16"]

logger = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_dtype(precision: str, device_type: str) -> torch.dtype:
    """The autocast dtype ``SOLVER.AMP.PRECISION`` asks for on ``device_type`` ("auto": bf16 on CPU, fp16 on CUDA)."""
    key = precision.lower()
    if key == "auto":
        return torch.bfloat16 if device_type == "cpu" else torch.float16
    if key not in _DTYPES:
        raise ValueError(f"SOLVER.AMP.PRECISION must be 'auto', 'bfloat16' or 'float16'; got {precision!r}")
    if device_type == "cpu" and key == "float16":
        raise ValueError("SOLVER.AMP.PRECISION float16 needs CUDA; on CPU use 'bfloat16' (or 'auto')")
    return _DTYPES[key]


class AutocastTrainer(SimpleTrainer):
    """``SimpleTrainer`` whose forward pass (model and losses) runs under ``torch.autocast(device_type, dtype)``.

    For dtypes that need no gradient scaling (bfloat16): the backward pass and the optimizer step are unchanged.
    """

    def __init__(self, model, data_loader, optimizer, device_type: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                 **kwargs):
        super().__init__(model, data_loader, optimizer, **kwargs)
        self.device_type = device_type
        self.dtype = dtype

    def run_step(self):
        assert self.model.training, "[AutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
        if isinstance(loss_dict, torch.Tensor):
            loss_dict = {"total_loss": loss_dict}
        loss_dict = {k: v.float() for k, v in loss_dict.items()}
        losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


def build_train_loop(cfg, model, data_loader, optimizer) -> SimpleTrainer:
    """The loop ``SOLVER.AMP`` asks for: plain float32, bfloat16 autocast, or Detectron2's float16 ``AMPTrainer``."""
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    device_type = next(model.parameters()).device.type
    dtype = amp_dtype(cfg.SOLVER.AMP.PRECISION, device_type)
    if dtype == torch.float16:
        return AMPTrainer(model, data_loader, optimizer, precision=dtype)
    if device_type == "cpu" and not cpu_has_native_bfloat16():
        if cfg.SOLVER.AMP.PRECISION.lower() == "auto":
            # The CPU configs turn AMP on for CPUs like the one they were measured on; elsewhere bfloat16 is emulated
            # and slower than float32, so "auto" falls back instead of slowing the user down.
            logger.warning("SOLVER.AMP: this CPU has no native bfloat16 (AVX512-BF16/AMX), where bfloat16 autocast "
                           "is slower than float32: training in float32 (SOLVER.AMP.PRECISION bfloat16 forces it)")
            return SimpleTrainer(model, data_loader, optimizer)
        logger.warning("SOLVER.AMP: this CPU has no native bfloat16 (AVX512-BF16/AMX): training will be slower, "
                       "not faster; set SOLVER.AMP.ENABLED False")
    return AutocastTrainer(model, data_loader, optimizer, device_type=device_type, dtype=dtype)


def cpu_has_native_bfloat16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX), i.e. whether autocast pays."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())

"""BRP-Net's learning-rate schedule: cosine annealing with warm restarts (Chen et al., MICCAI 2020, Sec. 3).

The paper trains TAFE with AdamW (lr 3e-4) under cosine annealing with warm restarts (Loshchilov & Hutter, SGDR):
the first period lasts 40 epochs, each next period is twice as long, and each restart begins at half the previous
peak. Here periods are in iterations (``SOLVER.WARM_RESTARTS.FIRST_PERIOD``; epochs x images / IMS_PER_BATCH).

:class:`CosineWarmRestartsParamScheduler` is an fvcore ``ParamScheduler`` (a multiplier of ``SOLVER.BASE_LR``), so
:func:`build_brpnet_lr_scheduler` wraps it in Detectron2's ``LRMultiplier`` + warm-up exactly like Detectron2's own
schedulers, and checkpoints/resumes the same way.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from fvcore.common.param_scheduler import ParamScheduler

__all__ = ["CosineWarmRestartsParamScheduler", "SCHEDULER_NAME", "build_brpnet_lr_scheduler"]

#: ``SOLVER.LR_SCHEDULER_NAME`` that selects this schedule (NucleiTrainer.build_lr_scheduler).
SCHEDULER_NAME = "CosineWarmRestarts"


class CosineWarmRestartsParamScheduler(ParamScheduler):
    """Multiplier at iteration ``t`` (``where = t / max_iter``): cosine from ``peak`` down to ``min_value`` over each
    period; periods ``first_period * period_mult ** k`` iterations; the peak of period ``k`` is ``peak_decay ** k``.
    """

    def __init__(self, first_period: int, max_iter: int, period_mult: float = 2.0, peak_decay: float = 0.5,
                 min_value: float = 0.0):
        if first_period < 1 or max_iter < 1:
            raise ValueError(f"first period and max_iter must be >= 1 iteration, got {first_period}, {max_iter}")
        if period_mult < 1.0 or not 0.0 < peak_decay <= 1.0 or not 0.0 <= min_value <= 1.0:
            raise ValueError(f"need period_mult >= 1, 0 < peak_decay <= 1, 0 <= min_value <= 1; got {period_mult}, "
                             f"{peak_decay}, {min_value}")
        self.first_period, self.max_iter = int(first_period), int(max_iter)
        self.period_mult, self.peak_decay, self.min_value = float(period_mult), float(peak_decay), float(min_value)

    def period_of(self, it: float) -> tuple[int, float, float]:
        """``(k, start, length)`` of the period holding iteration ``it``."""
        k, start, length = 0, 0.0, float(self.first_period)
        while it >= start + length:
            start += length
            length *= self.period_mult
            k += 1
        return k, start, length

    def __call__(self, where: float) -> float:
        it = where * self.max_iter
        k, start, length = self.period_of(it)
        peak = self.peak_decay ** k
        low = min(self.min_value, peak)
        return low + 0.5 * (peak - low) * (1.0 + math.cos(math.pi * (it - start) / length))


def build_brpnet_lr_scheduler(cfg: Any, optimizer: torch.optim.Optimizer) -> Any:
    """Detectron2 ``LRMultiplier`` for ``SOLVER.LR_SCHEDULER_NAME: CosineWarmRestarts`` (with SOLVER.WARMUP_*)."""
    from detectron2.solver.lr_scheduler import LRMultiplier, WarmupParamScheduler

    wr = cfg.SOLVER.WARM_RESTARTS
    max_iter = int(cfg.SOLVER.MAX_ITER)
    sched = CosineWarmRestartsParamScheduler(int(wr.FIRST_PERIOD), max_iter, float(wr.PERIOD_MULT),
                                             float(wr.PEAK_DECAY), float(cfg.SOLVER.BASE_LR_END) / cfg.SOLVER.BASE_LR)
    sched = WarmupParamScheduler(sched, cfg.SOLVER.WARMUP_FACTOR, min(cfg.SOLVER.WARMUP_ITERS / max_iter, 1.0),
                                 cfg.SOLVER.WARMUP_METHOD, cfg.SOLVER.RESCALE_INTERVAL)
    return LRMultiplier(optimizer, multiplier=sched, max_iter=max_iter)

"""Train for a number of minutes instead of iterations (``SOLVER.TIME_BUDGET``; an issue-24 lever).

On a CPU the iterations a budget holds depend on the machine, its load and the model's crowding; a schedule sized in
iterations (``SOLVER.MAX_ITER``) from a start-up speed test is cut off when the machine runs slower (the 2026-12-03
Mask R-CNN+ run ended its 120 minutes at 66% of its cosine decay, docs/time_to_accuracy.md). With
``SOLVER.TIME_BUDGET.MINUTES > 0`` the schedule runs on the clock instead:

* :class:`TrainingClock` counts training time: the steps (data loading, forward, backward, optimizer) but not
  checkpoint writing or evaluation, which run after the step in Detectron2's hook order.
* :class:`WallClockLRMultiplier` is Detectron2's ``LRMultiplier`` evaluated at the larger of ``clock.fraction()``
  and ``iteration / MAX_ITER``: any schedule (cosine, steps, warm restarts, warm-up) completes at whichever limit
  comes first, the budget on a slow machine, ``MAX_ITER`` on a fast one (a GPU), so a decay always ends at its floor.
* :class:`TimeBudgetHook` advances the clock after every step and ends training when it is spent: it lowers
  ``trainer.max_iter``, which :meth:`NucleiTrainer.train` checks, so the usual end-of-training hooks run
  (``model_final.pth``, the EMA's final weights, the final evaluation). Its state (the minutes spent) is in every
  checkpoint, so ``--resume`` continues the clock.

With several processes (``--num-gpus``) every step takes the slowest rank's time, so all ranks see one clock, one
learning rate and stop at the same iteration.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from detectron2.engine import HookBase
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.utils import comm

from ..errors import ConfigError

__all__ = ["TimeBudgetHook", "TrainingClock", "WallClockLRMultiplier", "build_time_budget", "time_budget_minutes"]

logger = logging.getLogger(__name__)


def time_budget_minutes(cfg: Any) -> float:
    """``SOLVER.TIME_BUDGET.MINUTES`` (0 = off); ConfigError when negative."""
    node = cfg.SOLVER.get("TIME_BUDGET", None)
    minutes = float(node.MINUTES) if node is not None else 0.0
    if minutes < 0:
        raise ConfigError(f"SOLVER.TIME_BUDGET.MINUTES must be >= 0 (0 = train SOLVER.MAX_ITER iterations); got "
                          f"{minutes}")
    return minutes


class TrainingClock:
    """Seconds of training spent out of a budget; :meth:`add` is fed the duration of each step."""

    def __init__(self, budget_seconds: float):
        if budget_seconds <= 0:
            raise ValueError(f"the time budget must be > 0 seconds, got {budget_seconds}")
        self.budget_seconds = float(budget_seconds)
        self.seconds = 0.0

    def add(self, seconds: float) -> None:
        self.seconds += max(float(seconds), 0.0)

    def fraction(self) -> float:
        """Share of the budget spent, in [0, 1]."""
        return min(self.seconds / self.budget_seconds, 1.0)

    def minutes(self) -> float:
        return self.seconds / 60.0

    @property
    def spent(self) -> bool:
        return self.seconds >= self.budget_seconds


class WallClockLRMultiplier(LRMultiplier):
    """Detectron2's ``LRMultiplier`` with the schedule at the larger of the budget's and ``MAX_ITER``'s share spent."""

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: Any, max_iter: int, clock: TrainingClock,
                 last_epoch: int = -1):
        self.clock = clock  # before super().__init__, which calls get_lr once
        super().__init__(optimizer, multiplier, max_iter, last_epoch)

    def get_lr(self) -> list[float]:
        multiplier = self._multiplier(min(max(self.clock.fraction(), self.last_epoch / self._max_iter), 1.0))
        return [base_lr * multiplier for base_lr in self.base_lrs]


class TimeBudgetHook(HookBase):
    """Time each step into the clock; end training once the budget is spent.

    Register it right after Detectron2's ``IterationTimer``, before the ``LRScheduler`` hook (which then sets the next
    step's learning rate from the updated clock), the checkpointer and evaluation (which are thereby not timed).
    """

    def __init__(self, clock: TrainingClock, timer: Callable[[], float] = time.perf_counter):
        self.clock, self.timer = clock, timer
        self._start: float | None = None
        self.stopped_at: int | None = None

    def before_train(self) -> None:
        logger.info("SOLVER.TIME_BUDGET: training for %.1f minutes (%.1f spent before), at most until iteration %d "
                    "(SOLVER.MAX_ITER); the learning-rate schedule follows whichever is nearer its end",
                    self.clock.budget_seconds / 60, self.clock.minutes(), self.trainer.max_iter)
        if self.clock.spent:
            logger.warning("SOLVER.TIME_BUDGET: the resumed checkpoint already spent %.1f of %.1f minutes: training "
                           "ends after one step", self.clock.minutes(), self.clock.budget_seconds / 60)

    def before_step(self) -> None:
        self._start = self.timer()

    def after_step(self) -> None:
        seconds = self.timer() - self._start
        if comm.get_world_size() > 1:  # one clock for all ranks: the slowest rank's step
            seconds = max(comm.all_gather(seconds))
        self.clock.add(seconds)
        if self.clock.spent and self.trainer.iter + 1 < self.trainer.max_iter:
            self.stopped_at = self.trainer.iter + 1
            self.trainer.max_iter = self.trainer.iter + 1  # NucleiTrainer.train's loop ends after this step
            logger.info("SOLVER.TIME_BUDGET: %.1f training minutes spent at iteration %d: training ends",
                        self.clock.minutes(), self.stopped_at)

    def after_train(self) -> None:
        if self.stopped_at is not None and self.trainer.iter >= self.stopped_at:
            # Detectron2's PeriodicCheckpointer writes model_final only at the configured MAX_ITER. Its trainer state
            # holds the last step's index, as a checkpoint written during that step would (--resume adds one).
            last, self.trainer.iter = self.trainer.iter, self.stopped_at - 1
            try:
                self.trainer.checkpointer.save("model_final", iteration=self.stopped_at - 1)
            finally:
                self.trainer.iter = last
        elif not self.clock.spent and self.trainer.iter >= self.trainer.max_iter:
            logger.info("SOLVER.MAX_ITER (%d) was reached after %.2f of the %.2f minutes of SOLVER.TIME_BUDGET: the "
                        "schedule completed on iterations (raise SOLVER.MAX_ITER to use the whole budget)",
                        self.trainer.max_iter, self.clock.minutes(), self.clock.budget_seconds / 60)

    def state_dict(self) -> dict[str, Any]:
        return {"seconds": self.clock.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called by ``trainer.load_state_dict`` on ``--resume``: continue the clock."""
        self.clock.seconds = float(state.get("seconds", 0.0))


def build_time_budget(cfg: Any, scheduler: Any) -> tuple[TrainingClock, Any] | None:
    """With ``SOLVER.TIME_BUDGET.MINUTES > 0``: a clock and ``scheduler`` re-based on it (unchanged with
    ``LR_ON_CLOCK False``); None when off.

    ``scheduler`` is the one ``build_lr_scheduler`` made (any Detectron2 ``LRMultiplier``); its multiplier, warm-up
    included, is kept: on a machine slower than ``MAX_ITER`` assumes, warm-up lasts ``WARMUP_ITERS / MAX_ITER`` of
    the budget.
    """
    minutes = time_budget_minutes(cfg)
    if minutes == 0:
        return None
    clock = TrainingClock(minutes * 60.0)
    if not cfg.SOLVER.TIME_BUDGET.LR_ON_CLOCK:
        return clock, scheduler
    if not isinstance(scheduler, LRMultiplier):
        name = cfg.SOLVER.LR_SCHEDULER_NAME
        raise ConfigError(f"SOLVER.TIME_BUDGET.LR_ON_CLOCK needs a Detectron2 LRMultiplier schedule; "
                          f"SOLVER.LR_SCHEDULER_NAME {name!r} built a {type(scheduler).__name__}")
    return clock, WallClockLRMultiplier(scheduler.optimizer, scheduler._multiplier, scheduler._max_iter, clock)

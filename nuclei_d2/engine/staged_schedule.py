"""Staged training: which parameters train, and at what learning rate, changes at fixed iterations.

Mask R-CNN+ (Bancher et al., MICCAI COMPAY 2021) trains in four stages after the scheme of Hollandi et al.
("nucleAIzer: a parameter-free deep learning framework for nucleus segmentation using image style transfer", Cell
Systems 2020), with Adam at base lr 1e-4 times a per-stage multiplier:

=====  ==========================================================  ==========
stage  trainable                                                   lr factor
=====  ==========================================================  ==========
1      the 1x1 input projection and the heads (backbone frozen)    2
2      everything                                                  1
3      the last backbone stages and the heads                      0.5
4      the heads                                                   0.1
=====  ==========================================================  ==========

"Heads" follows the Mask R-CNN implementation Hollandi et al. used (Matterport's ``layers="heads"``): FPN, RPN and
the RoI heads. Everything is configured under ``SOLVER.STAGED`` (``nuclei_d2/config.py``): stage lengths in
iterations, a list of parameter patterns per stage and the lr multipliers. A pattern is a group alias
(:data:`PARAM_GROUPS`) or a regular expression searched in the parameter name (``re.search``), e.g.
``"^backbone\\.bottom_up\\.res4"``.

:class:`StagedScheduleHook` applies the stage at the start of training and whenever an iteration enters a new stage:
it sets ``requires_grad`` (frozen parameters get no gradient, so the optimizer -- Adam included -- leaves them alone
and their moments untouched) and scales every param group's learning rate by the stage's multiplier on top of the
LR scheduler (warm-up, steps). The state is a function of the iteration number only, so ``--resume`` from a
checkpoint saved mid-stage re-applies the right stage. Parameters that were frozen when the optimizer was built
(``MODEL.BACKBONE.FREEZE_AT``, the Mask R-CNN+ distance U-Net) are never unfrozen. The current stage is logged to
the event storage as ``staged/stage`` (in ``metrics.json``).
"""

from __future__ import annotations

import bisect
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from detectron2.engine import HookBase
from torch import nn

from ..layers.wrappers import unwrap_model

__all__ = ["PARAM_GROUPS", "Stage", "StagedScheduleHook", "apply_stage", "build_staged_schedule_hook",
           "expand_patterns", "parse_stages", "stage_index"]

logger = logging.getLogger(__name__)

#: Aliases for the parameter groups of Detectron2's R-CNNs (names as ``GeneralizedRCNN.named_parameters()`` gives).
PARAM_GROUPS: dict[str, tuple[str, ...]] = {
    "all": (r"",),
    "input": (r"^input_proj\.",),
    "backbone": (r"^backbone\.",),
    "stem": (r"^backbone\.bottom_up\.stem\.",),
    "res2": (r"^backbone\.bottom_up\.res2\.",),
    "res3": (r"^backbone\.bottom_up\.res3\.",),
    "res4": (r"^backbone\.bottom_up\.res4\.",),
    "res5": (r"^backbone\.bottom_up\.res5\.",),
    "fpn": (r"^backbone\.(fpn_|top_block\.)",),
    "rpn": (r"^proposal_generator\.",),
    "roi_heads": (r"^roi_heads\.",),
    "heads": (r"^backbone\.(fpn_|top_block\.)", r"^proposal_generator\.", r"^roi_heads\."),
}


@dataclass(frozen=True)
class Stage:
    """One stage: iterations ``[start, end)`` (``end`` None = until training ends), what trains, lr multiplier."""

    start: int
    end: int | None
    patterns: tuple[str, ...]
    lr_multiplier: float

    def describe(self) -> str:
        end = "end" if self.end is None else str(self.end)
        return f"iterations [{self.start}, {end}): {list(self.patterns)} x{self.lr_multiplier:g}"


def expand_patterns(patterns: Sequence[str]) -> list[str]:
    """Regular expressions of ``patterns`` (aliases of :data:`PARAM_GROUPS` expanded)."""
    out: list[str] = []
    for p in patterns:
        out.extend(PARAM_GROUPS.get(p, (p,)))
    return out


def parse_stages(stage_iters: Sequence[int], trainable: Sequence[Sequence[str]],
                 lr_multipliers: Sequence[float]) -> list[Stage]:
    """Stages from the ``SOLVER.STAGED`` lists (lengths in iterations; the last stage runs until training ends).

    Raises:
        ValueError: lists of different lengths, a non-positive length, an empty pattern list, a bad regex.
    """
    n = len(stage_iters)
    if n == 0:
        raise ValueError("SOLVER.STAGED.STAGE_ITERS is empty: give one length (in iterations) per stage")
    if len(trainable) != n or len(lr_multipliers) != n:
        raise ValueError(f"SOLVER.STAGED: STAGE_ITERS has {n} stages but TRAINABLE has {len(trainable)} and "
                         f"LR_MULTIPLIERS {len(lr_multipliers)}: give one entry per stage")
    stages, start = [], 0
    for i, (length, pats, mult) in enumerate(zip(stage_iters, trainable, lr_multipliers)):
        if int(length) <= 0:
            raise ValueError(f"SOLVER.STAGED.STAGE_ITERS[{i}] must be > 0, got {length}")
        if isinstance(pats, str):
            pats = [pats]
        if not pats:
            raise ValueError(f"SOLVER.STAGED.TRAINABLE[{i}] is empty: every stage must train something")
        for p in expand_patterns(pats):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"SOLVER.STAGED.TRAINABLE[{i}]: {p!r} is neither a group alias "
                                 f"({', '.join(PARAM_GROUPS)}) nor a valid regular expression: {e}") from e
        if float(mult) <= 0:
            raise ValueError(f"SOLVER.STAGED.LR_MULTIPLIERS[{i}] must be > 0, got {mult}")
        end = None if i == n - 1 else start + int(length)
        stages.append(Stage(start, end, tuple(str(p) for p in pats), float(mult)))
        start += int(length)
    return stages


def stage_index(stages: Sequence[Stage], iteration: int) -> int:
    """Index of the stage iteration ``iteration`` (0-based) belongs to."""
    ends = [s.end for s in stages[:-1]]
    return bisect.bisect_right(ends, int(iteration))  # type: ignore[arg-type]


def apply_stage(model: nn.Module, stage: Stage, trainable_universe: set[str] | None = None) -> dict[str, Any]:
    """Set ``requires_grad`` of every parameter of ``model`` per ``stage``.

    Only parameters in ``trainable_universe`` (names; default: all) can become trainable; the others are frozen.

    Returns:
        a summary: ``trainable`` / ``frozen`` parameter names, ``numel`` trained, ``unmatched`` patterns.
    """
    regexes = [(p, [re.compile(r) for r in expand_patterns([p])]) for p in stage.patterns]
    matched = {p: False for p in stage.patterns}
    trainable, frozen, numel = [], [], 0
    for name, param in unwrap_model(model).named_parameters():
        on = False
        for p, rs in regexes:
            if any(r.search(name) for r in rs):
                matched[p] = True
                on = True
        on = on and (trainable_universe is None or name in trainable_universe)
        param.requires_grad_(on)
        (trainable if on else frozen).append(name)
        numel += param.numel() if on else 0
    return {"trainable": trainable, "frozen": frozen, "numel": numel,
            "unmatched": [p for p, m in matched.items() if not m]}


class StagedScheduleHook(HookBase):
    """Switch trainable parameters and lr multipliers at stage boundaries (see the module docstring)."""

    def __init__(self, stages: Sequence[Stage], model: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None):
        """
        Args:
            stages: from :func:`parse_stages`.
            model, optimizer, scheduler: default to the trainer's (``trainer.model``, ``.optimizer``, ``.scheduler``)
                when the hook is registered; the parameters the optimizer holds are the ones stages may train.
        """
        if not stages:
            raise ValueError("StagedScheduleHook needs at least one stage")
        self.stages = list(stages)
        self._model, self._optimizer, self._scheduler = model, optimizer, scheduler
        self.current: int | None = None
        self._universe: set[str] | None = None

    # --- wiring --------------------------------------------------------------------------------------------------
    def _resolve(self) -> None:
        t = self.trainer
        if self._model is None:
            self._model = t.model
        if self._optimizer is None:
            self._optimizer = t.optimizer
        if self._scheduler is None:
            self._scheduler = getattr(t, "scheduler", None)
        if self._scheduler is None:  # a bare SimpleTrainer: the scheduler lives in its LRScheduler hook
            from detectron2.engine.hooks import LRScheduler

            for h in getattr(t, "_hooks", []):
                if isinstance(h, LRScheduler):
                    self._scheduler = h.scheduler
        if self._universe is None:
            in_optim = {id(p) for g in self._optimizer.param_groups for p in g["params"]}
            self._universe = {n for n, p in unwrap_model(self._model).named_parameters() if id(p) in in_optim}
            for g in self._optimizer.param_groups:
                g.setdefault("initial_lr", g["lr"])

    # --- hook API --------------------------------------------------------------------------------------------------
    def before_train(self) -> None:
        self._resolve()
        self.current = None
        self._switch(self.trainer.iter)

    def before_step(self) -> None:
        if stage_index(self.stages, self.trainer.iter) != self.current:
            self._switch(self.trainer.iter)
        self.trainer.storage.put_scalar("staged/stage", float(self.current + 1), smoothing_hint=False)

    # --- the switch --------------------------------------------------------------------------------------------------
    def _switch(self, iteration: int) -> None:
        idx = stage_index(self.stages, iteration)
        stage = self.stages[idx]
        summary = apply_stage(self._model, stage, self._universe)
        if not summary["trainable"]:
            raise ValueError(f"SOLVER.STAGED: stage {idx + 1} ({stage.describe()}) matches no trainable parameter; "
                             f"parameter names look like {sorted(self._universe or [])[:3]}")
        for p in summary["unmatched"]:
            logger.warning("SOLVER.STAGED: stage %d pattern %r matches no parameter of %s", idx + 1, p,
                           type(unwrap_model(self._model)).__name__)
        self._set_lr(stage.lr_multiplier)
        self.current = idx
        lrs = sorted({float(g["lr"]) for g in self._optimizer.param_groups})
        logger.info("[StagedSchedule] iteration %d: stage %d/%d (%s): %d parameter tensors (%.2fM weights) trainable, "
                    "%d frozen; lr %s", iteration, idx + 1, len(self.stages), ", ".join(stage.patterns),
                    len(summary["trainable"]), summary["numel"] / 1e6, len(summary["frozen"]),
                    ", ".join(f"{v:.3g}" for v in lrs))

    def _set_lr(self, multiplier: float) -> None:
        """Scale every param group's lr to ``initial_lr * multiplier * (LR scheduler factor at this iteration)``.

        The scheduler computes ``lr = base_lr * factor(iter)``; its ``base_lrs`` are set to ``initial_lr *
        multiplier`` so the following steps keep the multiplier, and the current ``lr`` is rescaled in proportion
        (``initial_lr`` is the optimizer's untouched original, so this is exact after ``--resume`` too).
        """
        sched = self._scheduler
        base_lrs = getattr(sched, "base_lrs", None)
        for i, g in enumerate(self._optimizer.param_groups):
            new_base = float(g["initial_lr"]) * multiplier
            if base_lrs is not None and i < len(base_lrs):
                old_base = float(base_lrs[i])
                g["lr"] = float(g["lr"]) * (new_base / old_base) if old_base > 0 else new_base
                base_lrs[i] = new_base
            else:
                g["lr"] = new_base


def build_staged_schedule_hook(cfg: Any) -> StagedScheduleHook | None:
    """The hook ``SOLVER.STAGED`` describes, or None when ``SOLVER.STAGED.ENABLED`` is False."""
    s = cfg.SOLVER.STAGED
    if not s.ENABLED:
        return None
    stages = parse_stages(list(s.STAGE_ITERS), [list(p) if not isinstance(p, str) else [p] for p in s.TRAINABLE],
                          list(s.LR_MULTIPLIERS))
    total = sum(int(v) for v in s.STAGE_ITERS[:-1])
    if total >= cfg.SOLVER.MAX_ITER:
        logger.warning("SOLVER.STAGED: the stages before the last end at iteration %d but SOLVER.MAX_ITER is %d: "
                       "later stages never run", total, cfg.SOLVER.MAX_ITER)
    logger.info("Staged schedule: %s", "; ".join(f"stage {i + 1} {st.describe()}" for i, st in enumerate(stages)))
    return StagedScheduleHook(stages)

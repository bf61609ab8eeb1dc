"""Exponential moving average (EMA) of the weights while training (``SOLVER.EMA``; an issue-24 lever).

After every optimizer step ``ema = d * ema + (1 - d) * weights`` over the model's state dict: its parameters and its
floating-point buffers. The average of the last ~``1 / (1 - d)`` steps sits nearer the middle of the basin the noisy
SGD/Adam iterates circle around, and often evaluates better than the last iterate at no extra training step.

Choices (see docs/time_to_accuracy.md, "Levers"):

* **Buffers are averaged like the weights** (BatchNorm running mean/var included); integer buffers
  (``num_batches_tracked``) are copied. The raw model's running statistics describe the weights of its last ~10 steps
  (momentum 0.1), not an average of ~1000; averaging them over the same window as the weights is what timm's
  ``ModelEmaV2``, d2go's EMA and ``torch.optim.swa_utils.AveragedModel(use_buffers=True)`` do. Buffers that never
  change (FrozenBN, ``pixel_mean``, frozen sub-models) stay bit for bit: ``lerp`` of equal values is exact.
* **Warm-up** (``SOLVER.EMA.WARMUP``): the n-th update uses ``min(DECAY, (1 + n) / (10 + n))`` (timm's first
  ``ModelEma``, TensorFlow's ``num_updates``), so the random or pre-trained initial weights do not dominate the average
  of a short run (with 0.999 and no warm-up they would still weigh 0.999**2000 = 13% after 2000 steps).
* **Checkpoints carry it**: :class:`EMAHook` has a ``state_dict``, which Detectron2's ``TrainerBase.state_dict``
  stores under ``trainer/hooks/EMAHook`` in every checkpoint, so ``--resume`` continues the average.
* **Both weights of one run**: training writes ``OUTPUT_DIR/model_ema_final.pth`` beside ``model_final.pth``, in the
  same format (``{"model": state dict, "iteration": N}`` plus an ``"ema"`` entry: decay, warm-up, number of
  updates); evaluate either with ``MODEL.WEIGHTS``. Evaluation during and after training (``TEST.EVAL_PERIOD``, as
  Detectron2's ``EvalHook``) runs on both, as d2go does: the raw weights as before, the EMA weights (swapped into the
  model and back) into ``OUTPUT_DIR/ema/`` (``metrics_final.json``, ``inference/``) and storage scalars ``ema/...``.

Every DDP rank keeps the same average (the weights are identical on every rank), so every rank can evaluate it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm

from ..errors import ConfigError
from ..layers.wrappers import unwrap_model

__all__ = ["EMA_FINAL", "EMAHook", "ModelEMA", "add_ema_hooks", "check_ema_config", "ema_decay", "ema_hook_of"]

logger = logging.getLogger(__name__)

#: File name (without ``.pth``) of the averaged weights written at the end of training, beside ``model_final.pth``.
EMA_FINAL = "model_ema_final"


def check_ema_config(cfg: Any) -> None:
    """Raise ConfigError for a ``SOLVER.EMA.DECAY`` outside [0, 1) when EMA is on (1 would never move the average)."""
    ema = cfg.SOLVER.get("EMA", None)
    if ema is not None and ema.ENABLED and not 0.0 <= float(ema.DECAY) < 1.0:
        raise ConfigError(f"SOLVER.EMA.DECAY must be in [0, 1) (e.g. 0.999: an average over ~1000 steps); "
                          f"got {ema.DECAY}")


def ema_decay(decay: float, updates: int, warmup: bool) -> float:
    """The decay of update number ``updates`` (0-based): ``min(decay, (1 + n) / (10 + n))`` with warm-up."""
    return min(decay, (1.0 + updates) / (10.0 + updates)) if warmup else decay


class ModelEMA:
    """The running average of one model's state dict (independent of any trainer).

    Args:
        model: the model (a DDP wrapper is unwrapped); the average starts from its current weights.
        decay: weight of the old average at each update, in [0, 1).
        warmup: use :func:`ema_decay`'s warm-up.
    """

    def __init__(self, model: torch.nn.Module, decay: float, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1); got {decay}")
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        with torch.no_grad():
            self.state: dict[str, torch.Tensor] = {k: v.detach().clone()
                                                   for k, v in unwrap_model(model).state_dict().items()}
        self.bind(model)

    def bind(self, model: torch.nn.Module) -> None:
        """Remember the model's live tensors (views of its parameters and buffers) to average from."""
        live = unwrap_model(model).state_dict(keep_vars=False)
        if live.keys() != self.state.keys():
            raise ValueError("EMA: the model's state dict keys differ from the average's")
        self._avg = [(self.state[k], v) for k, v in live.items() if v.is_floating_point()]
        self._copy = [(self.state[k], v) for k, v in live.items() if not v.is_floating_point()]

    @torch.no_grad()
    def update(self) -> None:
        """One step: ``ema += (1 - d) * (weights - ema)`` (``torch._foreach_lerp_``, no autograd, no new tensors)."""
        d = ema_decay(self.decay, self.updates, self.warmup)
        if self._avg:
            torch._foreach_lerp_([e for e, _ in self._avg], [w for _, w in self._avg], 1.0 - d)
        for e, w in self._copy:
            e.copy_(w)
        self.updates += 1

    @contextlib.contextmanager
    def swapped_into(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """Run the block with the average loaded into ``model``; its own weights are put back after (even on error)."""
        live = unwrap_model(model).state_dict(keep_vars=False)
        with torch.no_grad():
            backup = {k: v.clone() for k, v in live.items()}
            for k, v in live.items():
                v.copy_(self.state[k])
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in live.items():
                    v.copy_(backup[k])

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers only, so checkpoints holding it load with ``torch.load(weights_only=True)``."""
        return {"model": dict(self.state), "updates": self.updates, "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue an average saved by :meth:`state_dict` (copied into the bound tensors in place)."""
        saved = state["model"]
        mismatch = [k for k, v in self.state.items() if k not in saved or tuple(saved[k].shape) != tuple(v.shape)]
        mismatch += sorted(set(saved) - set(self.state))
        if mismatch:
            raise ValueError(f"EMA state does not fit the model (e.g. {mismatch[:3]})")
        with torch.no_grad():
            for k, v in self.state.items():
                v.copy_(saved[k])
        self.updates = int(state["updates"])

    def save(self, path: str | os.PathLike, iteration: int) -> str:
        """Write the average as a train_net checkpoint (``{"model", "iteration"}`` + ``"ema"``), atomically."""
        from ..utils.io import atomic_write

        data = {"model": {k: v.detach().cpu() for k, v in self.state.items()}, "iteration": int(iteration),
                "ema": {"decay": self.decay, "warmup": self.warmup, "updates": self.updates}}
        return str(atomic_write(path, lambda tmp: torch.save(data, tmp)))


class EMAHook(HookBase):
    """Keep a :class:`ModelEMA` of ``trainer.model`` after every step, checkpoint it, write ``model_ema_final.pth``.

    Register it before the ``PeriodicCheckpointer`` (so each checkpoint holds the average of its iteration) and the
    evaluation hooks. The average starts in ``before_train``, i.e. from the weights ``resume_or_load`` loaded
    (``MODEL.WEIGHTS``), unless a resumed checkpoint restored it.
    """

    def __init__(self, decay: float, warmup: bool = True, output_dir: str = ""):
        self.decay, self.warmup, self.output_dir = float(decay), bool(warmup), output_dir
        self.ema: ModelEMA | None = None

    def _new(self) -> ModelEMA:
        return ModelEMA(self.trainer.model, self.decay, self.warmup)

    def before_train(self) -> None:
        if self.ema is None:
            self.ema = self._new()
        else:  # restored by load_state_dict: the model's tensors may have been replaced since
            self.ema.bind(self.trainer.model)

    def after_step(self) -> None:
        self.ema.update()
        if self.trainer.iter >= self.trainer.max_iter - 1:  # when (and as) PeriodicCheckpointer writes model_final
            self.save_final()

    def save_final(self) -> str | None:
        """Write ``OUTPUT_DIR/model_ema_final.pth`` (main process only); its path, or None elsewhere."""
        if not comm.is_main_process() or self.ema is None:
            return None
        path = self.ema.save(os.path.join(self.output_dir, f"{EMA_FINAL}.pth"), self.trainer.iter)
        logger.info("EMA of the weights (%d updates, decay %g) saved to %s", self.ema.updates, self.decay, path)
        return path

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Called by ``trainer.load_state_dict`` on ``--resume``, after the model's weights were loaded."""
        ema = self._new()
        try:
            ema.load_state_dict(state)
        except (KeyError, ValueError) as e:
            logger.warning("The checkpoint's EMA state cannot be used (%s): the average restarts from the resumed "
                           "weights", e)
        self.ema = ema


def ema_hook_of(trainer: Any) -> EMAHook | None:
    """The trainer's :class:`EMAHook` (``SOLVER.EMA.ENABLED``), or None."""
    return next((h for h in getattr(trainer, "_hooks", []) if isinstance(h, EMAHook)), None)


def add_ema_hooks(trainer: Any, hook_list: list[HookBase | None]) -> list[HookBase | None]:
    """With ``SOLVER.EMA.ENABLED``: ``hook_list`` with an :class:`EMAHook` before the checkpointer and evaluation,
    and an ``EvalHook`` for the EMA weights (same ``TEST.EVAL_PERIOD``) after Detectron2's; unchanged otherwise."""
    cfg = trainer.cfg
    if not cfg.SOLVER.EMA.ENABLED:
        return hook_list
    check_ema_config(cfg)
    ema = EMAHook(cfg.SOLVER.EMA.DECAY, cfg.SOLVER.EMA.WARMUP, cfg.OUTPUT_DIR)
    out = list(hook_list)
    first = next((i for i, h in enumerate(out) if isinstance(h, hooks.PeriodicCheckpointer | hooks.EvalHook)),
                 len(out))
    out.insert(first, ema)
    ema_cfg = cfg.clone()
    ema_cfg.defrost()
    ema_cfg.OUTPUT_DIR = os.path.join(cfg.OUTPUT_DIR, "ema")
    ema_cfg.freeze()

    def test_ema() -> dict[str, Any] | None:
        logger.info("Evaluating the EMA of the weights (results under %s)", ema_cfg.OUTPUT_DIR)
        with ema.ema.swapped_into(trainer.model):
            results = trainer.test(ema_cfg, trainer.model)
        return {"ema": results} if results else results

    raw_eval = max((i for i, h in enumerate(out) if isinstance(h, hooks.EvalHook)), default=len(out) - 1)
    out.insert(raw_eval + 1, hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_ema))
    return out

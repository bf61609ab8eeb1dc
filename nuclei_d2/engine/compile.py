"""``SOLVER.COMPILE``: ``torch.compile`` of the dense networks inside the training step (issue 24 lever).

Compiling a whole meta-architecture rarely works: Detectron2's take lists of dicts and run data-dependent control
flow (anchor matching, RoI sampling, NMS over ``Instances``), the dense methods pad batches and post-process in
numpy. What costs the CPU time is the dense networks, and those are plain tensor-to-tensor modules. The rule
(:func:`compile_targets`):

- a dense meta-architecture (:class:`~nuclei_d2.modeling.dense_base.DenseSegmentor`: the NB and two-stage U-Nets,
  BRP-Net): each of its direct sub-networks with parameters (``unet``; ``seg_net`` / ``dist_net``; ``tafe``,
  ``refine_small`` / ``refine_large``), the frozen ones too: a stage-2 step runs them forward;
- a Detectron2 R-CNN (``GeneralizedRCNN``: Mask R-CNN(+), panoptic fusion): its ``backbone`` (ResNet + FPN); the RPN,
  the RoI heads and the method's extra branches stay eager;
- a meta-architecture may instead name its own in a ``compile_modules`` tuple of child names.

Each target's ``forward`` is replaced by a dispatcher that calls the compiled forward while the whole model is in
training mode (the training step) and the original one otherwise (evaluation during and after training, every
inference path), so evaluation neither waits for a compilation nor depends on it. Modules are not wrapped
(no ``OptimizedModule``, no ``_orig_mod.`` prefix): ``state_dict`` keys, checkpoints, EMA and DDP are unchanged, and
checkpoints load into compiled and eager models alike. Autocast (``SOLVER.AMP``) and channels-last weights are
traced as they are.

A compilation that fails (no C++ compiler, an unsupported operator, an inductor error) logs ONE warning and the
training continues eager: the failing call is re-run eagerly and no target is compiled again. The backward graph is
lowered together with the forward (``force_non_lazy_backward_lowering``) so that its failures surface here too,
not in ``loss.backward()``.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["COMPILE_MODES", "DYNAMIC_SHAPES", "TrainingCompilation", "check_compile_config", "compile_for_training",
           "compile_targets"]

logger = logging.getLogger(__name__)

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
#: ``SOLVER.COMPILE.DYNAMIC`` -> ``torch.compile(dynamic=...)``.
DYNAMIC_SHAPES = {"auto": None, "static": False, "dynamic": True}


def check_compile_config(cfg: Any) -> None:
    """Raise ConfigError naming the key for a ``SOLVER.COMPILE.MODE`` / ``DYNAMIC`` torch.compile does not know."""
    c = cfg.SOLVER.get("COMPILE", None)
    if c is None:
        return
    if c.MODE not in COMPILE_MODES:
        raise ConfigError(f"SOLVER.COMPILE.MODE must be one of {', '.join(COMPILE_MODES)}; got {c.MODE!r}")
    if str(c.DYNAMIC).lower() not in DYNAMIC_SHAPES:
        raise ConfigError(f"SOLVER.COMPILE.DYNAMIC must be one of {', '.join(DYNAMIC_SHAPES)}; got {c.DYNAMIC!r}")


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def compile_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the sub-networks of ``model`` that :func:`compile_for_training` compiles (the rule in
    the module docstring); empty for a model with nothing to compile (the classical watershed)."""
    from detectron2.modeling import GeneralizedRCNN

    from ..modeling.dense_base import DenseSegmentor

    names = getattr(model, "compile_modules", None)
    if names is None:
        if isinstance(model, DenseSegmentor):
            names = [n for n, child in model.named_children() if _has_params(child)]
        elif isinstance(model, GeneralizedRCNN):
            names = ["backbone"]
        else:
            names = []
    return [(n, getattr(model, n)) for n in names if isinstance(getattr(model, n, None), nn.Module)]


class TrainingCompilation:
    """The compiled targets of one model: which are compiled, whether compilation still runs, the one warning."""

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)
        self.active = True
        #: names of the compiled sub-networks
        self.names: list[str] = []
        #: why compilation was given up ("" while it runs)
        self.failure = ""
        self._dispatchers: list[_TrainingForward] = []

    @property
    def training(self) -> bool:
        """Whether the model is in its training step (training mode): the compiled forwards run only then."""
        model = self._model()
        return self.active and model is not None and model.training

    def give_up(self, where: str, exc: BaseException) -> None:
        """Stop compiling and warn once, naming ``where`` and the error's first line."""
        if not self.active:
            return
        self.active = False
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        self.failure = f"{where}: {type(exc).__name__}: {first}"
        logger.warning("SOLVER.COMPILE: torch.compile failed (%s); training continues eager (set "
                       "SOLVER.COMPILE.ENABLED False to skip the attempt)", self.failure)

    @property
    def compiled_calls(self) -> dict[str, int]:
        """How many calls of each target ran compiled (0 everywhere after a failure at the first step)."""
        return {d.name: d.compiled_calls for d in self._dispatchers}

    def remove(self) -> None:
        """Restore every target's own ``forward`` (the model is then exactly as built)."""
        for d in self._dispatchers:
            if d.module.__dict__.get("forward") is d:
                del d.module.forward
        self._dispatchers.clear()
        self.names.clear()
        self.active = False


class _TrainingForward:
    """A target's ``forward``: compiled in the training step, its own forward otherwise (see the module docstring)."""

    def __init__(self, state: TrainingCompilation, name: str, module: nn.Module, compiled: Any):
        self.state, self.name, self.module, self.compiled = state, name, module, compiled
        #: calls that ran the compiled forward
        self.compiled_calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        eager = type(self.module).forward.__get__(self.module)
        if not self.state.training:
            return eager(*args, **kwargs)
        try:
            with _lower_backward_now():
                out = self.compiled(*args, **kwargs)
            self.compiled_calls += 1
            return out
        except Exception as exc:  # any compiler error: re-run eagerly (graph-broken parts that ran may have
            # updated BatchNorm statistics once more, once); a genuine error (bad input shape, ...) raises here
            out = eager(*args, **kwargs)
            self.state.give_up(self.name, exc)
            return out


def _lower_backward_now() -> contextlib.AbstractContextManager:
    """Compile the backward graph with the forward, so a failure there is caught by the dispatcher."""
    try:
        from torch._functorch import config as functorch_config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(functorch_config, "force_non_lazy_backward_lowering"):  # a private switch of recent torch
        return contextlib.nullcontext()
    return functorch_config.patch(force_non_lazy_backward_lowering=True)


def compile_for_training(model: nn.Module, mode: str = "default", dynamic: str = "auto") -> TrainingCompilation:
    """Compile :func:`compile_targets` of ``model`` in place for its training steps (see the module docstring).

    The compilation itself happens at the first training step. Returns the state (also ``model._training_compile``),
    whose ``names`` lists what is compiled (empty when ``torch.compile`` itself failed: one warning, eager).
    """
    state = TrainingCompilation(model)
    kwargs = {"mode": None if mode == "default" else mode, "dynamic": DYNAMIC_SHAPES[str(dynamic).lower()]}
    for name, module in compile_targets(model):
        try:
            compiled = torch.compile(type(module).forward.__get__(module), **kwargs)
        except Exception as exc:  # torch.compile unavailable or refusing: train eager
            state.give_up(name, exc)
            state.remove()
            break
        d = _TrainingForward(state, name, module, compiled)
        module.forward = d  # an instance attribute: not a parameter, buffer or child, so state_dict is unchanged
        state._dispatchers.append(d)
        state.names.append(name)
    if state.names:
        logger.info("SOLVER.COMPILE: torch.compile(mode=%s, dynamic=%s) of %s for the training steps (compiled at "
                    "the first one); evaluation and inference run eager", mode, dynamic, ", ".join(state.names))
    model._training_compile = state  # plain attribute: not in state_dict
    return state

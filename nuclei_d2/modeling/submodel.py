"""One way to compose models: a sub-model built from config X with weights W, frozen or trainable.

Every multi-stage method reuses a network trained in an earlier run: the two-stage U-Net's stage 2 its stage-1
segmentation U-Net (``MODEL.TWO_STAGE.STAGE1``), BRP-Net's stage 2 its stage-1 TAFE (``MODEL.BRPNET.STAGE1``),
Mask R-CNN+ the distance network that fills its distance channel (``MODEL.MASKRCNN_PLUS.DISTANCE_NET``, a
two-stage U-Net config). Each is one config node with three keys (``nuclei_d2.config``'s ``_submodel_node``):

* ``CONFIG``: the config the weights were trained with. Mask R-CNN+ builds its distance network from it; for a
  stage of the same model (``""``: the main config) it only names the command that trains the missing stage;
* ``WEIGHTS``: that run's ``model_final.pth``, read through the one safe loader
  (:func:`nuclei_d2.checkpoint.load_checkpoint_file`) and checked with the one fit check
  (:func:`nuclei_d2.checkpoint.checkpoint_fit`, strict: a sub-model is loaded whole or not at all);
* ``FROZEN``: the sub-model gets no gradient, no optimizer state and stays in eval mode while the rest trains
  (:func:`freeze`).

Weights loaded this way win over ``MODEL.WEIGHTS``: loading a whole checkpoint later (a pre-training run, ``--resume``)
leaves them alone (:func:`keep_on_load`), and the checkpointer's fit check does not count them as missing.

Which sub-models a config uses is the meta-architecture's ``submodels(cfg)`` classmethod; ``tools/*`` check every
one before anything starts (``nuclei_d2.engine.defaults.check_config_weights``: the file exists, or one line with
the ``train_net`` command that writes it). A training *schedule* inside one run (``SOLVER.STAGED``: which parameters
train at which iteration) is another concern and stays in :mod:`nuclei_d2.engine.staged_schedule`.
"""

from __future__ import annotations

import logging
import os
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CheckpointError, checkpoint_fit, load_checkpoint_file, model_state_of

__all__ = ["SubModel", "build_submodel_config", "freeze", "is_frozen", "keep_on_load", "load_submodel", "masked_mse",
           "resolve_path", "setup_submodel"]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[2]


def resolve_path(path: str) -> str | None:
    """``path`` as given if it is a file, else relative to the repository (``configs/...`` work from anywhere)."""
    p = os.path.expanduser(path)
    if os.path.isfile(p):
        return p
    alt = _REPO / path
    return str(alt) if not os.path.isabs(path) and alt.is_file() else None


@dataclass(frozen=True)
class SubModel:
    """A sub-model spec: the config key it came from, its config file, weights file and whether it is frozen."""

    key: str
    config: str = ""
    weights: str = ""
    frozen: bool = True
    #: what the sub-model is, for messages ("distance U-Net", "stage-1 TAFE")
    what: str = "sub-model"

    @classmethod
    def from_config(cls, cfg: Any, key: str, what: str = "sub-model") -> SubModel:
        """The spec under config key ``key`` (e.g. ``"MODEL.BRPNET.STAGE1"``)."""
        node = cfg
        for part in key.split("."):
            node = node[part]
        return cls(key, str(node.CONFIG), str(node.WEIGHTS), bool(node.FROZEN), what)

    @property
    def weights_key(self) -> str:
        return f"{self.key}.WEIGHTS"


def build_submodel_config(spec: SubModel, device: str = "cpu", meta_architecture: str | None = None) -> Any:
    """The config of ``spec.config`` (tried as given, then from the repository), on ``device``.

    Raises:
        FileNotFoundError: no such config file.
        ValueError: it cannot be read, or it describes another meta-architecture than ``meta_architecture``.
    """
    from ..config import build_cfg
    from ..errors import ConfigError

    key = f"{spec.key}.CONFIG"
    path = resolve_path(spec.config) if spec.config else None
    if path is None:
        raise FileNotFoundError(f"{key}: config file not found: {spec.config!r}")
    try:
        cfg = build_cfg(path)
    except ConfigError as e:
        raise ValueError(f"{key}: {e}") from e
    cfg.MODEL.DEVICE = device
    if meta_architecture and cfg.MODEL.META_ARCHITECTURE != meta_architecture:
        raise ValueError(f"{key}: {path} describes a {cfg.MODEL.META_ARCHITECTURE!r}, not a {meta_architecture!r} "
                         f"(the {spec.what})")
    return cfg


def load_submodel(net: nn.Module, spec: SubModel, *, prefix: str = "", allow_pickle: bool = False) -> int:
    """Load ``spec.weights`` into ``net`` through the safe loader, strictly, and freeze ``net`` if ``spec.frozen``.

    ``prefix``: the state-dict prefix of ``net``'s tensors in the file (``"tafe."`` for BRP-Net's stage-1 TAFE in a
    whole stage-1 checkpoint; ``""`` when the file holds ``net`` itself). Returns the number of tensors loaded.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError (a ValueError): unreadable or refused file, or one that does not fit ``net`` (names the
            config the weights should come from).
    """
    key = spec.weights_key
    path = resolve_path(spec.weights)
    if path is None:
        raise FileNotFoundError(f"{key}: file not found: {spec.weights!r}")
    state = model_state_of(load_checkpoint_file(path, allow_pickle=allow_pickle, what=key))
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    fit = checkpoint_fit(net.state_dict(), state)
    if not state or fit.missing or fit.mismatched or fit.unexpected:
        trained_with = f" ({spec.key}.CONFIG {spec.config})" if spec.config else ""
        raise CheckpointError(
            f"{key}: {path} does not match the {spec.what} of this config: {len(fit.missing)} of {fit.tensors} "
            f"tensors missing, {len(fit.mismatched)} of another shape, {len(fit.unexpected)} unexpected"
            + (f" (no '{prefix}*' tensors)" if prefix and not state else "")
            + (f"; e.g. {fit.examples()}" if fit.missing or fit.mismatched else "")
            + f"; use the weights of the config it was trained with{trained_with}")
    net.load_state_dict(state, strict=False)  # pixel_mean/std: from the config, as the checkpointer does
    logger.info("%s: loaded the %s (%d tensors) from %s", key, spec.what, len(state), path)
    return len(state)


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def freeze(net: nn.Module) -> nn.Module:
    """No gradient (so no optimizer state: ``get_default_optimizer_params`` skips it; DDP ignores it) and eval mode
    for good: ``model.train()`` leaves ``net`` in eval mode (no dropout, no batch-statistics updates)."""
    for p in net.parameters():
        p.requires_grad_(False)
    net.train = types.MethodType(_frozen_train, net)  # type: ignore[method-assign]
    net.eval()
    return net


def is_frozen(net: nn.Module) -> bool:
    """Whether :func:`freeze` froze ``net``."""
    train = net.__dict__.get("train")
    return getattr(train, "__func__", None) is _frozen_train


def keep_on_load(model: nn.Module, prefix: str) -> None:
    """Loading a checkpoint into ``model`` later leaves its ``prefix*`` tensors (a sub-model loaded from its own
    weights) as they are; ``model.checkpoint_kept_prefixes()`` lists them for the checkpointer's fit check."""
    kept: list[str] = model.__dict__.setdefault("_kept_prefixes", [])
    if prefix in kept:
        return
    kept.append(prefix)
    if len(kept) == 1:
        model.register_load_state_dict_pre_hook(_keep_hook)
        model.checkpoint_kept_prefixes = types.MethodType(  # type: ignore[attr-defined]
            lambda self: tuple(self.__dict__.get("_kept_prefixes", ())), model)


def _keep_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    kept = tuple(prefix + p for p in module.__dict__.get("_kept_prefixes", ()))
    own = module.state_dict(prefix=prefix, keep_vars=False)
    for k, v in own.items():
        if k.startswith(kept) and k in state_dict:
            state_dict[k] = v.detach().clone()


def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the valid (non-padding) pixels: the distance-map loss."""
    v = valid.float()
    return (((pred - target.float()) ** 2) * v).sum() / v.sum().clamp_min(1.0)



def setup_submodel(model: nn.Module, attr: str, spec: SubModel, *, source_prefix: str = "",
                   allow_pickle: bool = False) -> bool:
    """The one composition step: load ``model.<attr>`` from ``spec.weights`` (when set; :func:`load_submodel`),
    freeze it when ``spec.frozen`` (:func:`freeze`), and keep frozen loaded weights when a whole checkpoint is loaded
    into ``model`` later (:func:`keep_on_load`). Returns whether weights were loaded."""
    net = getattr(model, attr)
    loaded = bool(spec.weights)
    if loaded:
        load_submodel(net, spec, prefix=source_prefix, allow_pickle=allow_pickle)
    if spec.frozen:
        freeze(net)
        if loaded:
            keep_on_load(model, attr + ".")
    return loaded

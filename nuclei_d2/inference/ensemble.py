"""Ensembles: several trained models (e.g. one per organ fold) run on the same image.

Mask R-CNN+ (Bancher et al., MICCAI COMPAY 2021) combines models trained on different folds; their nuclei are merged
at the instance level like test-time copies (:mod:`nuclei_d2.inference.merge`). This module builds the members from
weights files (``TEST.ENSEMBLE.WEIGHTS``, optionally with their own config files ``TEST.ENSEMBLE.CONFIGS``) and gives
each one the input channels it was trained with, so an RGB-only model and a five-channel model can vote together,
and the resolution it predicts at (its own ``INPUT.NUCLEI.SCALE`` / ``INPUT.MIN_SIZE_TEST``), so a model trained on
upscaled tiles can vote with one trained at the scanner's resolution.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["EnsembleMember", "inference_resolution", "load_ensemble_members", "resolution_size", "select_channels"]

logger = logging.getLogger(__name__)

@dataclass
class EnsembleMember:
    """A model, the indices of the input channels it takes (None: all of them, in order) and the resolution it
    predicts at: ``resize`` is its own :func:`inference_resolution` when that differs from the evaluated inputs',
    None to take the inputs as they come."""

    model: nn.Module
    channels: list[int] | None = None
    name: str = "model"
    resize: tuple[int, int, float] | None = None

    def input_size(self, height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
        """The image size this member predicts at, for an input of original ``height x width`` mapped to ``size``."""
        if self.resize is None:
            return size
        return resolution_size(self.resize, height, width)


def inference_resolution(cfg: Any) -> tuple[int, int, float]:
    """``(INPUT.MIN_SIZE_TEST, INPUT.MAX_SIZE_TEST, INPUT.NUCLEI.SCALE)`` of a config: the resolution its model
    predicts at."""
    return int(cfg.INPUT.MIN_SIZE_TEST), int(cfg.INPUT.MAX_SIZE_TEST), float(cfg.INPUT.NUCLEI.SCALE)


def resolution_size(resolution: tuple[int, int, float], height: int, width: int) -> tuple[int, int]:
    """The size the inference mapper of a config with this :func:`inference_resolution` gives a ``height x width``
    image: the magnification first, then the shortest-edge resize (0 = none), as in ``build_nuclei_augmentation``."""
    min_size, max_size, scale = resolution
    h, w = int(height), int(width)
    if scale != 1.0:
        h, w = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    if min_size:
        from detectron2.data.transforms import ResizeShortestEdge

        h, w = ResizeShortestEdge.get_output_shape(h, w, int(min_size), int(max_size))
    return h, w


def select_channels(inp: dict[str, Any], channels: Sequence[int] | None) -> dict[str, Any]:
    """A shallow copy of ``inp`` whose ``image`` keeps only ``channels`` (unchanged when None)."""
    if channels is None:
        return inp
    out = dict(inp)
    out["image"] = inp["image"][list(channels)]
    return out


def _channel_map(member_names: Sequence[str], input_names: Sequence[str], what: str) -> list[int] | None:
    if list(member_names) == list(input_names):
        return None
    index = []
    for n in member_names:
        if n not in input_names:
            raise ValueError(f"{what} takes the input channel {n!r} but the evaluated inputs have only "
                             f"{list(input_names)}: add it to INPUT.EXTRA_CHANNELS of the main config")
        index.append(list(input_names).index(n))
    return index


def load_ensemble_members(cfg: Any, weights: Sequence[str], configs: Sequence[str] = (),
                          opts: Sequence[Sequence[str]] = ()) -> list[EnsembleMember]:
    """Build and load one model per weights file, in eval mode.

    Args:
        cfg: the main (evaluation) config: its input channels are what the members receive.
        weights: ``.pth``/``.pkl`` files (``TEST.ENSEMBLE.WEIGHTS``).
        configs: config files of the members (``TEST.ENSEMBLE.CONFIGS``): empty (every member has the main
            config's architecture), one (shared by all) or one per weights file.
        opts: per-member ``KEY VALUE`` overrides (``TEST.ENSEMBLE.OPTS``): empty, or one list per weights file,
            applied after the member's config (e.g. the config file of a member's own sub-model).

    Raises:
        FileNotFoundError: a weights or config file does not exist (the message names it).
        ValueError: ``configs`` or ``opts`` has a bad length, or a member needs an input channel the main config
            lacks.
    """
    from ..checkpoint import NucleiCheckpointer
    from ..config import build_cfg, input_channel_names
    from ..modeling.build import build_nuclei_model

    weights, configs, opts = list(weights), list(configs), [list(o) for o in opts]
    if configs and len(configs) not in (1, len(weights)):
        raise ValueError(f"TEST.ENSEMBLE.CONFIGS lists {len(configs)} files for {len(weights)} weights files: give "
                         "none, one (shared) or one per weights file")
    if opts and len(opts) != len(weights):
        raise ValueError(f"TEST.ENSEMBLE.OPTS lists {len(opts)} override lists for {len(weights)} weights files: "
                         "give none or one per weights file")
    for i, o in enumerate(opts):
        if len(o) % 2:
            raise ValueError(f"TEST.ENSEMBLE.OPTS[{i}] = {o!r}: expected KEY VALUE pairs (an even number of items)")
    input_names = input_channel_names(cfg)
    members = []
    for i, path in enumerate(weights):
        if "://" not in path and not os.path.isfile(os.path.expanduser(path)):
            raise FileNotFoundError(f"TEST.ENSEMBLE.WEIGHTS[{i}]: weights file not found: {path!r}")
        mcfg, cfile = cfg, None
        member_opts = [str(v) for v in opts[i]] if opts else []
        if configs:
            cfile = configs[i] if len(configs) > 1 else configs[0]
            if not os.path.isfile(cfile):
                raise FileNotFoundError(f"TEST.ENSEMBLE.CONFIGS: config file not found: {cfile!r}")
            mcfg = build_cfg(cfile, ["MODEL.DEVICE", cfg.MODEL.DEVICE, *member_opts])
        mcfg = mcfg.clone()
        mcfg.defrost()
        if member_opts and not configs:
            mcfg.merge_from_list(member_opts)
        mcfg.MODEL.WEIGHTS = path
        model = build_nuclei_model(mcfg)
        # the main config's MODEL.CHECKPOINT flags (the user's command line) govern every member's file
        NucleiCheckpointer.from_config(model, cfg, config_file=cfile).load(path)
        model.eval()
        channels = _channel_map(input_channel_names(mcfg), input_names, f"TEST.ENSEMBLE member {path!r}")
        own = inference_resolution(mcfg)
        resize = own if own != inference_resolution(cfg) else None
        members.append(EnsembleMember(model, channels, name=os.path.basename(path), resize=resize))
        logger.info("Ensemble member %d: %s (%s%s)", i + 1, path, type(model).__name__,
                    f", at its own resolution (MIN_SIZE_TEST, MAX_SIZE_TEST, SCALE) {own}" if resize else "")
    return members

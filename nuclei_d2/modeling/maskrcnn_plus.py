"""Mask R-CNN+: Mask R-CNN on RGB + hematoxylin + distance-map input, projected to three channels by a 1x1 conv.

Bancher, Mahbod, Ellinger, Ecker and Dorffner, "Improving Mask R-CNN for Nuclei Instance Segmentation in Hematoxylin
& Eosin-Stained Histological Images", MICCAI Workshop on Computational Pathology (COMPAY), PMLR 156, 2021.

The paper adds to a standard Mask R-CNN:

* **two input channels** (Sec. "input"): the hematoxylin intensity from Ruifrok colour deconvolution and the
  Euclidean distance map of the nuclei. A learned 1x1 convolution maps the five channels to three, so the backbone
  stays a standard (ImageNet/COCO-pretrainable) one. The distance channel comes from the ground truth in training
  and from a separate **distance U-Net** at inference (:class:`~nuclei_d2.modeling.distance_unet.DistanceUNet`,
  trained with its own config and loaded by path);
* a **four-stage training schedule** after Hollandi et al. 2020 (:mod:`nuclei_d2.engine.staged_schedule`);
* **knowledge transfer** (pre-training on another dataset, then fine-tuning: two configs);
* **test-time augmentation** and **ensembling** with instance-level merging (:mod:`nuclei_d2.inference.test_time`).

This module is the model part. :class:`MaskRCNNPlus` is a ``GeneralizedRCNN`` whose ``preprocess_image``

1. checks the input has ``3 + len(INPUT.EXTRA_CHANNELS)`` channels (the mapper stacks them after RGB, 0-255);
2. at inference, replaces the (zero) ``distance`` channel by the distance U-Net's prediction, clipped to [0, 1]
   and scaled by 255 exactly like the mapper scales the ground-truth map;
3. normalises with the ``C`` entries of ``MODEL.PIXEL_MEAN/STD``, pads, and applies the 1x1 projection.

The extra channels are switchable (``INPUT.EXTRA_CHANNELS``: ``[]``, ``["hematoxylin"]``, ``["distance"]`` or both)
for the paper's ablation; with ``[]`` and ``MODEL.MASKRCNN_PLUS.INPUT_PROJECTION False`` it is exactly the baseline
Mask R-CNN.

The distance U-Net is a frozen submodule (``distance_unet.*`` in checkpoints, always in eval mode, never in the
optimizer), so a trained Mask R-CNN+ checkpoint is self-contained. When ``MODEL.MASKRCNN_PLUS.DISTANCE_WEIGHTS``
names a file, that file wins over any ``distance_unet.*`` weights in ``MODEL.WEIGHTS`` (e.g. of a pre-training run).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_backbone
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import ImageList
from torch import nn

from ..checkpoint import CheckpointError, load_checkpoint_file, model_state_of
from .distance_unet import DistanceUNet

__all__ = ["MaskRCNNPlus", "build_distance_unet", "load_distance_unet_weights"]

logger = logging.getLogger(__name__)

DISTANCE_SOURCES = ("unet", "input")
PROJECTION_INITS = ("rgb", "random")
_REPO = Path(__file__).resolve().parents[2]


def _resolve(path: str, what: str) -> str:
    """``path`` as given if it exists, else relative to the repository (configs/... work from any directory)."""
    p = os.path.expanduser(path)
    if os.path.isfile(p):
        return p
    alt = _REPO / path
    if not os.path.isabs(path) and alt.is_file():
        return str(alt)
    raise FileNotFoundError(f"{what}: file not found: {path!r}")


def build_distance_unet(config_file: str, device: str = "cpu") -> tuple[DistanceUNet, Any]:
    """The :class:`DistanceUNet` a config file describes (untrained), and that config."""
    from detectron2.config import get_cfg

    from ..config import add_nuclei_config

    path = _resolve(config_file, "MODEL.MASKRCNN_PLUS.DISTANCE_CONFIG")
    dcfg = get_cfg()
    add_nuclei_config(dcfg)
    try:
        dcfg.merge_from_file(path)
    except (KeyError, ValueError, AssertionError) as e:
        raise ValueError(f"MODEL.MASKRCNN_PLUS.DISTANCE_CONFIG: {path}: {e}") from e
    dcfg.MODEL.DEVICE = device
    if dcfg.MODEL.META_ARCHITECTURE != "DistanceUNet":
        raise ValueError(f"MODEL.MASKRCNN_PLUS.DISTANCE_CONFIG: {path} describes a {dcfg.MODEL.META_ARCHITECTURE!r}, "
                         "not a 'DistanceUNet' (use configs/distance_unet.yaml or a config based on it)")
    return DistanceUNet(dcfg), dcfg


def load_distance_unet_weights(net: DistanceUNet, weights: str, *, allow_pickle: bool = False) -> None:
    """Load a ``DistanceUNet`` checkpoint (``model_final.pth`` of a ``train_net`` run, or a bare state dict) strictly,
    through the safe loader (:func:`nuclei_d2.checkpoint.load_checkpoint_file`; ``.pkl`` only with ``allow_pickle``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError (a ValueError): the file cannot be read safely, or does not hold this distance U-Net (the
            message lists missing/unexpected keys).
    """
    key = "MODEL.MASKRCNN_PLUS.DISTANCE_WEIGHTS"
    path = _resolve(weights, key)
    ckpt = load_checkpoint_file(path, allow_pickle=allow_pickle, what=key)
    state = {k: torch.as_tensor(v) for k, v in model_state_of(ckpt).items()}
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or bad_shape:
        raise CheckpointError(f"MODEL.MASKRCNN_PLUS.DISTANCE_WEIGHTS: {path} does not match the distance U-Net of "
                              f"MODEL.MASKRCNN_PLUS.DISTANCE_CONFIG (missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, different shapes {bad_shape[:5]}); train it with that config "
                              "(python tools/train_net.py --config-file configs/distance_unet.yaml)")
    net.load_state_dict(state, strict=True)


@META_ARCH_REGISTRY.register()
class MaskRCNNPlus(GeneralizedRCNN):
    """``MODEL.META_ARCHITECTURE: MaskRCNNPlus`` -- see the module docstring."""

    @configurable
    def __init__(self, *, channel_names: Sequence[str], input_proj: nn.Module | None = None,
                 distance_source: str = "unet", distance_unet: DistanceUNet | None = None,
                 distance_channels: Sequence[int] | None = None, distance_trained: bool = False,
                 allow_untrained_distance: bool = False, keep_distance_weights: bool = False, **kwargs: Any):
        """
        Args:
            channel_names: names of the input channels (``red, green, blue`` + ``INPUT.EXTRA_CHANNELS``).
            input_proj: module mapping the normalised ``C``-channel batch to the backbone's input (the 1x1 conv), or
                None to feed the backbone directly.
            distance_source: where the ``distance`` channel comes from at inference: ``"unet"`` (the distance U-Net)
                or ``"input"`` (as given in the input, e.g. precomputed maps).
            distance_unet: the (frozen) distance U-Net, needed when ``distance`` is a channel and the source "unet".
            distance_channels: indices of our input channels the distance U-Net takes (its RGB + extra channels).
            distance_trained: the distance U-Net holds trained weights (a buffer; checkpoints carry it).
            allow_untrained_distance: run inference with an untrained distance U-Net (tests, timing) instead of
                raising.
            keep_distance_weights: when loading a checkpoint, keep the current ``distance_unet.*`` weights (they were
                loaded from ``MODEL.MASKRCNN_PLUS.DISTANCE_WEIGHTS``) instead of the checkpoint's.
            kwargs: ``GeneralizedRCNN`` arguments (backbone, proposal_generator, roi_heads, pixel_mean, pixel_std,
                input_format, vis_period).
        """
        super().__init__(**kwargs)
        self.channel_names = tuple(channel_names)
        c = len(self.channel_names)
        if self.pixel_mean.numel() != c:
            raise ValueError(f"MODEL.PIXEL_MEAN / PIXEL_STD have {self.pixel_mean.numel()} entries but the input has "
                             f"{c} channels {list(self.channel_names)} (RGB + INPUT.EXTRA_CHANNELS)")
        if distance_source not in DISTANCE_SOURCES:
            raise ValueError(f"MODEL.MASKRCNN_PLUS.DISTANCE_SOURCE must be one of {DISTANCE_SOURCES}, got "
                             f"{distance_source!r}")
        self.input_proj = input_proj
        self.distance_index = self.channel_names.index("distance") if "distance" in self.channel_names else None
        self.distance_source = distance_source
        if self.distance_index is not None and distance_source == "unet" and distance_unet is None:
            raise ValueError("the 'distance' input channel needs a distance U-Net at inference: set "
                             "MODEL.MASKRCNN_PLUS.DISTANCE_CONFIG (and DISTANCE_WEIGHTS), or DISTANCE_SOURCE 'input'")
        self.distance_unet = distance_unet
        self.distance_channels = list(distance_channels) if distance_channels is not None else [0, 1, 2]
        self.allow_untrained_distance = bool(allow_untrained_distance)
        self.register_buffer("distance_trained", torch.tensor(bool(distance_trained)), persistent=True)
        if distance_unet is not None:
            for p in distance_unet.parameters():
                p.requires_grad_(False)
            distance_unet.eval()
        self._keep_distance_weights = bool(keep_distance_weights)
        self.register_load_state_dict_pre_hook(_keep_distance_unet_hook)

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        from ..config import input_channel_names

        mp = cfg.MODEL.MASKRCNN_PLUS
        names = input_channel_names(cfg)
        c = len(names)
        if len(cfg.MODEL.PIXEL_MEAN) != c or len(cfg.MODEL.PIXEL_STD) != c:
            raise ValueError(f"MODEL.PIXEL_MEAN / PIXEL_STD have {len(cfg.MODEL.PIXEL_MEAN)} / "
                             f"{len(cfg.MODEL.PIXEL_STD)} entries but the input has {c} channels {names} (RGB + "
                             "INPUT.EXTRA_CHANNELS): give one mean and std per channel")
        if mp.PROJECTION_INIT not in PROJECTION_INITS:
            raise ValueError(f"MODEL.MASKRCNN_PLUS.PROJECTION_INIT must be one of {PROJECTION_INITS}, got "
                             f"{mp.PROJECTION_INIT!r}")
        backbone_in = int(mp.PROJECTION_CHANNELS) if mp.INPUT_PROJECTION else c
        backbone = build_backbone(cfg, ShapeSpec(channels=backbone_in))
        input_proj = None
        if mp.INPUT_PROJECTION:
            input_proj = nn.Conv2d(c, backbone_in, kernel_size=1)
            if mp.PROJECTION_INIT == "rgb":
                # Start as "the backbone sees the RGB image": identity on the first channels, extra channels 0. A
                # pretrained backbone then starts where it was, and the extra channels' weights are learned.
                with torch.no_grad():
                    input_proj.weight.zero_()
                    input_proj.bias.zero_()
                    for i in range(min(3, backbone_in)):
                        input_proj.weight[i, i, 0, 0] = 1.0
        kwargs: dict[str, Any] = {
            "backbone": backbone,
            "proposal_generator": build_proposal_generator(cfg, backbone.output_shape()),
            "roi_heads": build_roi_heads(cfg, backbone.output_shape()),
            "input_format": cfg.INPUT.FORMAT,
            "vis_period": cfg.VIS_PERIOD,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "channel_names": names,
            "input_proj": input_proj,
            "distance_source": mp.DISTANCE_SOURCE,
            "allow_untrained_distance": bool(mp.ALLOW_UNTRAINED_DISTANCE),
        }
        if "distance" in names and mp.DISTANCE_SOURCE == "unet":
            if not mp.DISTANCE_CONFIG:
                raise ValueError("INPUT.EXTRA_CHANNELS has 'distance': set MODEL.MASKRCNN_PLUS.DISTANCE_CONFIG to the "
                                 "distance U-Net's config (e.g. configs/distance_unet.yaml)")
            net, dcfg = build_distance_unet(mp.DISTANCE_CONFIG, cfg.MODEL.DEVICE)
            dnames = input_channel_names(dcfg)
            missing = [n for n in dnames if n not in names or n == "distance"]
            if missing:
                raise ValueError(f"the distance U-Net ({mp.DISTANCE_CONFIG}) takes channels {dnames}, but {missing} "
                                 f"are not among Mask R-CNN+'s inputs {names}")
            kwargs["distance_unet"] = net
            kwargs["distance_channels"] = [names.index(n) for n in dnames]
            if mp.DISTANCE_WEIGHTS:
                load_distance_unet_weights(net, mp.DISTANCE_WEIGHTS, allow_pickle=cfg.MODEL.CHECKPOINT.ALLOW_PICKLE)
                kwargs["distance_trained"] = True
                kwargs["keep_distance_weights"] = True
                logger.info("Mask R-CNN+: distance U-Net loaded from %s", mp.DISTANCE_WEIGHTS)
            elif not mp.ALLOW_UNTRAINED_DISTANCE:
                logger.info("Mask R-CNN+: MODEL.MASKRCNN_PLUS.DISTANCE_WEIGHTS is empty: the distance U-Net must come "
                            "from MODEL.WEIGHTS (a trained Mask R-CNN+ checkpoint) for inference")
        return kwargs

    def checkpoint_kept_prefixes(self) -> tuple[str, ...]:
        """State-dict keys loading a checkpoint leaves alone (see :func:`_keep_distance_unet_hook`): the fit check of
        :class:`nuclei_d2.checkpoint.NucleiCheckpointer` does not count them as missing."""
        return ("distance_unet.", "distance_trained") if self._keep_distance_weights else ()

    def train(self, mode: bool = True) -> MaskRCNNPlus:
        super().train(mode)
        if self.distance_unet is not None:  # frozen: no dropout in training either
            self.distance_unet.train(False)
        return self

    def fill_distance(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (``C x H x W``, 0-255) with its distance channel replaced by the distance U-Net's prediction."""
        if not bool(self.distance_trained) and not self.allow_untrained_distance:
            raise RuntimeError("Mask R-CNN+ inference needs a trained distance U-Net for the 'distance' channel, but "
                               "none was loaded: set MODEL.MASKRCNN_PLUS.DISTANCE_WEIGHTS to the model_final.pth of a "
                               "run of configs/distance_unet.yaml (or load a Mask R-CNN+ checkpoint that contains "
                               "one)")
        assert self.distance_unet is not None and self.distance_index is not None
        dist = self.distance_unet.predict_distance(image[self.distance_channels])
        out = image.clone()
        out[self.distance_index] = dist.to(out.dtype) * 255.0
        return out

    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> ImageList:
        """Check channels, fill the distance channel (inference), normalise, pad, project (see the module doc)."""
        images = []
        for i, x in enumerate(batched_inputs):
            img = self._move_to_current_device(x["image"])
            if img.dim() != 3 or img.shape[0] != len(self.channel_names):
                raise ValueError(f"{x.get('file_name', f'input {i}')}: Mask R-CNN+ expects a "
                                 f"{len(self.channel_names)} x H x W image ({list(self.channel_names)}), got shape "
                                 f"{tuple(img.shape)}; check INPUT.EXTRA_CHANNELS matches the model")
            if not self.training and self.distance_index is not None and self.distance_source == "unet":
                img = self.fill_distance(img)
            images.append((img - self.pixel_mean) / self.pixel_std)
        il = ImageList.from_tensors(images, self.backbone.size_divisibility,
                                    padding_constraints=self.backbone.padding_constraints)
        if self.input_proj is not None:
            il = ImageList(self.input_proj(il.tensor), il.image_sizes)
        return il

    def visualize_training(self, batched_inputs: list[dict[str, Any]], proposals: Any) -> None:
        # Detectron2's visualiser draws an RGB image: show the first three channels.
        rgb = [{**x, "image": x["image"][:3]} for x in batched_inputs]
        super().visualize_training(rgb, proposals)


def _keep_distance_unet_hook(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: with ``keep_distance_weights``, replace the checkpoint's ``distance_unet.*`` (and
    ``distance_trained``) by the current values, so weights from DISTANCE_WEIGHTS survive loading MODEL.WEIGHTS."""
    if not getattr(module, "_keep_distance_weights", False):
        return
    own = module.state_dict(prefix=prefix, keep_vars=False)
    for k in list(own):
        if k.startswith(prefix + "distance_unet.") or k == prefix + "distance_trained":
            if k in state_dict:
                state_dict[k] = own[k].detach().clone()

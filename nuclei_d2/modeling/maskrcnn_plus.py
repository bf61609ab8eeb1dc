"""Mask R-CNN+: Mask R-CNN on RGB + hematoxylin + distance-map input, projected to three channels by a 1x1 conv.

Bancher, Mahbod, Ellinger, Ecker and Dorffner, "Improving Mask R-CNN for Nuclei Instance Segmentation in Hematoxylin
& Eosin-Stained Histological Images", MICCAI Workshop on Computational Pathology (COMPAY), PMLR 156, 2021.

The paper adds to a standard Mask R-CNN:

* **two input channels** (Sec. "input"): the hematoxylin intensity from Ruifrok colour deconvolution and the
  Euclidean distance map of the nuclei. A learned 1x1 convolution maps the five channels to three, so the backbone
  stays a standard (ImageNet/COCO-pretrainable) one. The distance channel comes from the ground truth in training
  and from a separate **distance U-Net** at inference: the two-stage U-Net's distance network
  (:class:`~nuclei_d2.modeling.two_stage_unet.TwoStageUNet`, trained with its own config), the sub-model
  ``MODEL.MASKRCNN_PLUS.DISTANCE_NET`` (:mod:`nuclei_d2.modeling.submodel`). With
  ``TRAIN_ON_PREDICTED_DISTANCE True`` training uses the predicted map too (what the model sees at test time);
* a **four-stage training schedule** after Hollandi et al. 2020 (:mod:`nuclei_d2.engine.staged_schedule`);
* **knowledge transfer** (pre-training on another dataset, then fine-tuning: two configs);
* **test-time augmentation** and **ensembling** with instance-level merging (:mod:`nuclei_d2.inference.test_time`).

This module is the model part. :class:`MaskRCNNPlus` is a ``GeneralizedRCNN`` (a
:class:`~nuclei_d2.modeling.rcnn.NucleiRCNN`: nuclei as crops) whose ``preprocess_image``

1. checks the input has ``3 + len(INPUT.EXTRA_CHANNELS)`` channels (the mapper stacks them after RGB, 0-255);
2. at inference (and in training with ``TRAIN_ON_PREDICTED_DISTANCE``), replaces the ``distance`` channel by the
   distance network's prediction, clipped to [0, 1] and scaled by 255 exactly like the mapper scales the
   ground-truth map;
3. normalises with the ``C`` entries of ``MODEL.PIXEL_MEAN/STD``, pads, and applies the 1x1 projection.

The extra channels are switchable (``INPUT.EXTRA_CHANNELS``: ``[]``, ``["hematoxylin"]``, ``["distance"]`` or both)
for the paper's ablation; with ``[]`` and ``MODEL.MASKRCNN_PLUS.INPUT_PROJECTION False`` it is exactly the baseline
Mask R-CNN.

The distance network is a frozen submodule (``distance_unet.*`` in checkpoints, always in eval mode, never in the
optimizer), so a trained Mask R-CNN+ checkpoint is self-contained. When ``MODEL.MASKRCNN_PLUS.DISTANCE_NET.WEIGHTS``
names a file, that file wins over any ``distance_unet.*`` weights in ``MODEL.WEIGHTS`` (e.g. of a pre-training run).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import ImageList
from torch import nn

from .rcnn import NucleiRCNN
from .submodel import SubModel, build_submodel_config, keep_on_load, setup_submodel
from .two_stage_unet import TwoStageUNet

__all__ = ["MaskRCNNPlus", "build_distance_net"]

logger = logging.getLogger(__name__)

DISTANCE_SOURCES = ("unet", "input")
PROJECTION_INITS = ("rgb", "random")
DISTANCE_NET = "MODEL.MASKRCNN_PLUS.DISTANCE_NET"


def build_distance_net(spec: SubModel, device: str = "cpu") -> tuple[TwoStageUNet, Any]:
    """The distance network ``spec.config`` describes (a TwoStageUNet config; untrained), and that config.

    It is built with ``INFERENCE "distance"`` (Mask R-CNN+ needs only its distance map: the segmentation U-Net of a
    stage-2 config is never run).
    """
    dcfg = build_submodel_config(spec, device, "TwoStageUNet")
    dcfg.MODEL.TWO_STAGE.INFERENCE = "distance"
    dcfg.MODEL.TWO_STAGE.STAGE1.WEIGHTS = ""  # its own stage-1 U-Net is not used here
    return TwoStageUNet(dcfg), dcfg


@META_ARCH_REGISTRY.register()
class MaskRCNNPlus(NucleiRCNN):
    """``MODEL.META_ARCHITECTURE: MaskRCNNPlus`` -- see the module docstring."""

    @configurable
    def __init__(self, *, channel_names: Sequence[str], input_proj: nn.Module | None = None,
                 distance_source: str = "unet", distance_unet: TwoStageUNet | None = None,
                 distance_channels: Sequence[int] | None = None, distance_spec: SubModel | None = None,
                 allow_untrained_distance: bool = False, train_on_predicted_distance: bool = False,
                 allow_pickle: bool = False, **kwargs: Any):
        """
        Args:
            channel_names: names of the input channels (``red, green, blue`` + ``INPUT.EXTRA_CHANNELS``).
            input_proj: module mapping the normalised ``C``-channel batch to the backbone's input (the 1x1 conv), or
                None to feed the backbone directly.
            distance_source: where the ``distance`` channel comes from at inference: ``"unet"`` (the distance U-Net)
                or ``"input"`` (as given in the input, e.g. precomputed maps).
            distance_unet: the distance network (a :class:`TwoStageUNet`), needed when ``distance`` is a channel and
                the source "unet"; always frozen.
            distance_channels: indices of our input channels the distance network takes (its RGB + extra channels).
            distance_spec: its sub-model spec (``MODEL.MASKRCNN_PLUS.DISTANCE_NET``): its weights are loaded, and
                kept when a whole checkpoint is loaded later (:func:`~nuclei_d2.modeling.submodel.setup_submodel`).
            allow_untrained_distance: run inference with an untrained distance network (tests, timing) instead of
                raising.
            train_on_predicted_distance: in training too, fill the ``distance`` channel with the distance network's
                prediction (instead of the ground truth's map).
            allow_pickle: accept a ``.pkl`` distance-network checkpoint (unpickling can run code).
            kwargs: ``NucleiRCNN`` arguments (backbone, proposal_generator, roi_heads, pixel_mean, pixel_std,
                input_format, vis_period, min_visible_fraction, mask_threshold).
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
            raise ValueError(f"the 'distance' input channel needs a distance network at inference: set "
                             f"{DISTANCE_NET}.CONFIG (and WEIGHTS), or DISTANCE_SOURCE 'input'")
        if train_on_predicted_distance and (self.distance_index is None or distance_unet is None):
            raise ValueError("MODEL.MASKRCNN_PLUS.TRAIN_ON_PREDICTED_DISTANCE needs the 'distance' input channel "
                             f"predicted by a distance network ({DISTANCE_NET}, DISTANCE_SOURCE 'unet')")
        self.distance_unet = distance_unet
        self.distance_channels = list(distance_channels) if distance_channels is not None else [0, 1, 2]
        self.allow_untrained_distance = bool(allow_untrained_distance)
        self.train_on_predicted_distance = bool(train_on_predicted_distance)
        trained = False
        if distance_unet is not None:
            spec = distance_spec if distance_spec is not None else SubModel(DISTANCE_NET, what="distance U-Net")
            if not spec.frozen:
                raise ValueError(f"{DISTANCE_NET}.FROZEN must be True: the distance network does not train inside "
                                 "Mask R-CNN+ (train it with its own config)")
            trained = setup_submodel(self, "distance_unet", spec, allow_pickle=allow_pickle)
        self.register_buffer("distance_trained", torch.tensor(trained), persistent=True)
        if trained:  # the buffer says where the loaded distance network came from: keep it with the weights
            keep_on_load(self, "distance_trained")

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
            "train_on_predicted_distance": bool(mp.TRAIN_ON_PREDICTED_DISTANCE),
            "allow_pickle": bool(cfg.MODEL.CHECKPOINT.ALLOW_PICKLE),
            "min_visible_fraction": cfg.TEST.MIN_VISIBLE_FRACTION,
            "mask_threshold": cfg.TEST.MASK_THRESHOLD,
        }
        if "distance" in names and mp.DISTANCE_SOURCE == "unet":
            spec = SubModel.from_config(cfg, DISTANCE_NET, "distance U-Net")
            if not spec.config:
                raise ValueError(f"INPUT.EXTRA_CHANNELS has 'distance': set {DISTANCE_NET}.CONFIG to the distance "
                                 "network's config (e.g. configs/distance_unet.yaml)")
            net, dcfg = build_distance_net(spec, cfg.MODEL.DEVICE)
            dnames = input_channel_names(dcfg)
            missing = [n for n in dnames if n not in names or n == "distance"]
            if missing:
                raise ValueError(f"the distance network ({spec.config}) takes channels {dnames}, but {missing} "
                                 f"are not among Mask R-CNN+'s inputs {names}")
            kwargs["distance_unet"] = net
            kwargs["distance_channels"] = [names.index(n) for n in dnames]
            kwargs["distance_spec"] = spec
            if not spec.weights and not mp.ALLOW_UNTRAINED_DISTANCE:
                logger.info("Mask R-CNN+: %s.WEIGHTS is empty: the distance network must come from MODEL.WEIGHTS (a "
                            "trained Mask R-CNN+ checkpoint) for inference", DISTANCE_NET)
        return kwargs

    @classmethod
    def submodels(cls, cfg: Any) -> list[SubModel]:
        """The sub-models a config of this meta-architecture loads: the distance network, when it predicts the
        ``distance`` channel and has weights of its own."""
        mp = cfg.MODEL.MASKRCNN_PLUS
        if "distance" not in cfg.INPUT.EXTRA_CHANNELS or mp.DISTANCE_SOURCE != "unet" or not mp.DISTANCE_NET.WEIGHTS:
            return []
        return [SubModel.from_config(cfg, DISTANCE_NET, "distance U-Net")]

    @classmethod
    def required_targets_of(cls, cfg: Any) -> tuple[str, ...]:
        """No dense targets (the distance channel is an input the mapper stacks, not a target)."""
        return ()

    def fill_distance(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (``C x H x W``, 0-255) with its distance channel replaced by the distance U-Net's prediction."""
        if not bool(self.distance_trained) and not self.allow_untrained_distance:
            raise RuntimeError("Mask R-CNN+ inference needs a trained distance U-Net for the 'distance' channel, but "
                               f"none was loaded: set {DISTANCE_NET}.WEIGHTS to the model_final.pth of a run of "
                               "configs/distance_unet.yaml (or load a Mask R-CNN+ checkpoint that contains one)")
        assert self.distance_unet is not None and self.distance_index is not None
        dist = self.distance_unet.predict_distance(image[self.distance_channels])
        out = image.clone()
        out[self.distance_index] = dist.to(out.dtype) * 255.0
        return out

    # ---- the networks (issue 27): "rcnn" and, when the U-Net predicts the distance channel, "distance" -----------
    def _distance_network_name(self) -> str | None:
        """The distance U-Net's own name of its one network (its ``INFERENCE "distance"`` runs one), or None when
        the distance channel is not predicted."""
        if self.distance_index is None or self.distance_source != "unet" or self.distance_unet is None:
            return None
        names = list(self.distance_unet.network_modules())
        if len(names) != 1:
            raise ValueError(f"Mask R-CNN+: the distance U-Net runs {names} at inference, expected one network")
        return names[0]

    def network_modules(self) -> dict[str, nn.Module]:
        """``"rcnn"`` (its input: the ``C`` channels with the distance channel filled) and ``"distance"`` (the
        distance U-Net's network, which its own tiled inference runs: normalised RGB -> distance map)."""
        nets = super().network_modules()
        inner = self._distance_network_name()
        if inner is not None:
            net = self.distance_unet.network_modules()[inner]
            du = self.distance_unet
            mean = [round(float(v), 4) for v in du.pixel_mean.flatten()]
            std = [round(float(v), 4) for v in du.pixel_std.flatten()]
            channels = [self.channel_names[i] for i in self.distance_channels]
            net.io = dataclasses.replace(net.io, meaning=(
                f"Mask R-CNN+'s distance U-Net: input the channels {channels} normalised with ITS OWN mean {mean} / "
                f"std {std} (not the preprocessing above), tiled like its config's MODEL.TILING; output "
                f"{net.io.meaning}, clipped to [0, 1] and x255 into the 'distance' channel of the rcnn input"))
            nets["distance"] = net
        return nets

    def set_runtime(self, runtime: Any) -> None:
        """Install ``{"rcnn": ..., "distance": ...}``: "distance" goes to the distance U-Net (whose tiled inference
        calls it), the rest to this model."""
        super().set_runtime(runtime)  # checks the names first
        inner = self._distance_network_name()
        if inner is not None:
            fn = None if runtime is None else runtime.get("distance")
            self.distance_unet.set_runtime(None if fn is None else {inner: fn})

    def network_input(self, inp: dict[str, Any], index: int = 0) -> torch.Tensor:
        """The checked ``C x H x W`` image with its distance channel filled (inference), for the "rcnn" network."""
        img = self._move_to_current_device(inp["image"])
        self._check_channels(img, inp, index)
        if self.distance_index is not None and self.distance_source == "unet":
            img = self.fill_distance(img)
        return img.float()

    def _check_channels(self, img: torch.Tensor, inp: dict[str, Any], index: int) -> None:
        if img.dim() != 3 or img.shape[0] != len(self.channel_names):
            raise ValueError(f"{inp.get('file_name', f'input {index}')}: Mask R-CNN+ expects a "
                             f"{len(self.channel_names)} x H x W image ({list(self.channel_names)}), got shape "
                             f"{tuple(img.shape)}; check INPUT.EXTRA_CHANNELS matches the model")

    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> ImageList:
        """Check channels, fill the distance channel (inference; training with TRAIN_ON_PREDICTED_DISTANCE), normalise,
        pad, project (see the module doc)."""
        images = []
        for i, x in enumerate(batched_inputs):
            img = self._move_to_current_device(x["image"])
            self._check_channels(img, x, i)
            if self.distance_index is not None and self.distance_source == "unet" and (
                    not self.training or self.train_on_predicted_distance):
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


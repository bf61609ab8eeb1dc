"""The two-stage U-Net: a segmentation U-Net, then a distance U-Net seeding a watershed (Mahbod et al. 2019).

Mahbod, Schaefer, Ellinger, Ecker, Smedby and Wang, "A two-stage U-Net algorithm for segmentation of nuclei in
H&E-stained tissues", European Congress on Digital Pathology (ECDP) 2019, LNCS 11435.

* **Stage 1**: a U-Net (4 max-poolings, 4 transposed convolutions) segments nuclei, trained on a *modified* ground
  truth — binarised, pixels where nuclei touch removed, eroded (``INPUT.TARGETS: ["eroded"]``;
  :func:`nuclei_d2.data.targets.eroded_foreground`) — so that touching nuclei come out as separate components; loss
  ``0.5 * BCE + Dice``; Adam, lr 1e-3 multiplied by 0.4 every 80 epochs.
* **Stage 2**: a second U-Net of the same shape regresses the per-nucleus normalised distance map
  (``"distance"``; :func:`nuclei_d2.data.targets.distance_map`) with a mean-squared-error loss.
* **Instances**: the distance map, Gaussian-smoothed with sigma set from the mean nucleus size measured on the
  stage-1 output, gives markers (local maxima) for a marker-controlled watershed restricted to the stage-1 foreground;
  objects under 20 px are removed and holes filled (:func:`nuclei_d2.postprocess.distance_watershed`).

Both U-Nets live in this one meta-architecture (``seg_net.*`` and ``dist_net.*`` in the checkpoint), trained in two
runs with ``MODEL.TWO_STAGE.TRAIN_STAGE`` 1 then 2; the second run takes the segmentation U-Net from the first one's
``model_final.pth`` through the sub-model spec ``MODEL.TWO_STAGE.STAGE1`` (:mod:`nuclei_d2.modeling.submodel`:
loaded strictly, frozen unless ``FROZEN False``; ``configs/two_stage_unet.yaml``,
``configs/two_stage_unet_stage2.yaml``; docs/unet_family.md). ``TRAIN_STAGE 0`` trains both at once (not in the paper).

The distance U-Net is also Mask R-CNN+'s distance network (``MODEL.MASKRCNN_PLUS.DISTANCE_NET``: any config of this
meta-architecture, e.g. ``configs/distance_unet.yaml`` or a stage-2 config; :meth:`TwoStageUNet.predict_distance`).
``INFERENCE "distance"`` makes nuclei from the distance map alone, so that network can be evaluated by itself.
"""

from __future__ import annotations

import logging
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..postprocess import distance_watershed, foreground_components, instance_scores
from .dense_base import DenseSegmentor, dense_base_kwargs
from .networks import NetworkIO
from .submodel import SubModel, freeze, masked_mse, setup_submodel
from .unet import UNet

__all__ = ["TwoStageNetwork", "TwoStageUNet"]

logger = logging.getLogger(__name__)

INFERENCE_MODES = ("watershed", "components", "distance")


class TwoStageNetwork(nn.Module):
    """One U-Net of the two stages as a tensor-in / tensor-out module: normalised image -> the stage-1 foreground
    probability (sigmoid; "stage1") or the stage-2 distance map (linear or sigmoid, per
    ``MODEL.TWO_STAGE.DISTANCE_ACTIVATION``; "stage2"), ``B x 1 x H x W``."""

    def __init__(self, net: UNet, activation: str, output: str, meaning: str):
        super().__init__()
        self.net = net
        self.activation = activation
        self.io = NetworkIO(inputs=("image",), outputs=(output,), channels=(net.in_channels,), out_channels=(1,),
                            size_multiple=net.size_divisibility, pad_mode=net.pad_mode, meaning=meaning)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net(x)
        return torch.sigmoid(y) if self.activation == "sigmoid" else y


def _trained_nets(train_stage: int, stage1_frozen: bool) -> tuple[bool, bool]:
    """(the segmentation U-Net trains, the distance U-Net trains) in this run."""
    return train_stage in (0, 1) or (train_stage == 2 and not stage1_frozen), train_stage in (0, 2)


def _targets(train_stage: int, stage1_frozen: bool) -> tuple[str, ...]:
    seg, dist = _trained_nets(train_stage, stage1_frozen)
    return ("eroded",) * seg + ("distance",) * dist


@META_ARCH_REGISTRY.register()
class TwoStageUNet(DenseSegmentor):
    """``MODEL.META_ARCHITECTURE: TwoStageUNet`` — see the module docstring."""

    # stage 1's "foreground" is the eroded foreground (touching pixels removed, INPUT.ERODE_RADIUS erosion): the NB
    # U-Net's "inside" give or take a pixel (TEST.MERGE.MODE "shared")
    map_meanings = MappingProxyType({"foreground": "interior"})
    # (not INFERENCE: "components" drops the distance map from the probabilities)
    postprocess_keys = tuple(f"MODEL.TWO_STAGE.{k}" for k in ("THRESHOLD", "CONNECTIVITY", "SIGMA", "SIGMA_FACTOR",
                                                               "MIN_DISTANCE", "PEAK_THRESHOLD", "MIN_SIZE",
                                                               "FILL_HOLES", "DILATE"))

    @configurable
    def __init__(self, *, seg_net: UNet, dist_net: UNet, train_stage: int = 1, inference: str = "watershed",
                 bce_weight: float = 0.5, dice_weight: float = 1.0, distance_weight: float = 1.0,
                 distance_activation: str = "linear", post: dict[str, Any] | None = None,
                 stage1: SubModel | None = None, allow_pickle: bool = False, **kwargs: Any):
        """
        Args:
            seg_net: stage-1 U-Net, 1 output (foreground logit).
            dist_net: stage-2 U-Net, 1 output (distance).
            train_stage: 1 (train ``seg_net``; ``dist_net`` frozen), 2 (train ``dist_net``; ``seg_net`` from
                ``stage1``) or 0 (both).
            inference: "watershed" (the paper), "components" (stage-1 foreground components only; what a model
                whose stage 2 is not trained yet can do) or "distance" (the distance map alone).
            bce_weight, dice_weight: stage-1 loss ``bce_weight * BCE + dice_weight * (1 - Dice)``.
            distance_weight: stage-2 loss ``distance_weight * MSE``.
            distance_activation: "linear" (the paper) or "sigmoid" output of ``dist_net``.
            post: keyword arguments of :func:`distance_watershed` (threshold, sigma, sigma_factor, min_distance,
                peak_threshold, min_size, fill, dilate, connectivity); "components" uses threshold, connectivity,
                min_size, fill and dilate.
            stage1: in stage 2, the sub-model spec of ``seg_net`` (``MODEL.TWO_STAGE.STAGE1``: the ``seg_net.*``
                tensors of stage 1's checkpoint; frozen unless ``FROZEN`` False, then it trains with its loss too).
            allow_pickle: accept a ``.pkl`` stage-1 checkpoint (unpickling can run code).
            kwargs: :class:`DenseSegmentor` arguments (pixel_mean, pixel_std, tiling, return_probs).
        """
        kwargs.setdefault("size_divisibility", max(seg_net.size_divisibility, dist_net.size_divisibility))
        super().__init__(**kwargs)
        for name, net in (("segmentation", seg_net), ("distance", dist_net)):
            if net.out_channels != 1:
                raise ValueError(f"the {name} U-Net must have 1 output channel, got {net.out_channels}")
            if net.in_channels != self.in_channels:
                raise ValueError(f"the {name} U-Net takes {net.in_channels} channels but PIXEL_MEAN has "
                                 f"{self.in_channels}")
        if train_stage not in (0, 1, 2):
            raise ValueError(f"MODEL.TWO_STAGE.TRAIN_STAGE must be 1, 2 or 0 (both), got {train_stage}")
        if inference not in INFERENCE_MODES:
            raise ValueError(f"MODEL.TWO_STAGE.INFERENCE must be one of {INFERENCE_MODES}, got {inference!r}")
        if distance_activation not in ("linear", "sigmoid"):
            raise ValueError(f"MODEL.TWO_STAGE.DISTANCE_ACTIVATION must be 'linear' or 'sigmoid', got "
                             f"{distance_activation!r}")
        self.seg_net = seg_net
        self.dist_net = dist_net
        self.train_stage = int(train_stage)
        self.inference_mode = inference
        self.bce_weight, self.dice_weight = float(bce_weight), float(dice_weight)
        self.distance_weight = float(distance_weight)
        self.distance_activation = distance_activation
        self.post = dict(post or {})
        stage1 = stage1 if stage1 is not None else SubModel("MODEL.TWO_STAGE.STAGE1", what="stage-1 segmentation U-Net")
        self.stage1_frozen = self.train_stage == 2 and stage1.frozen
        if self.train_stage == 2:
            setup_submodel(self, "seg_net", stage1, source_prefix="seg_net.", allow_pickle=allow_pickle)
        self.train_seg, self.train_dist = _trained_nets(self.train_stage, stage1.frozen)
        for net, trains in ((self.seg_net, self.train_seg), (self.dist_net, self.train_dist)):
            if not trains:  # the U-Net this run does not train: no gradient, no optimizer state, eval mode
                freeze(net)

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        ts = cfg.MODEL.TWO_STAGE
        stage1 = cls.submodels(cfg)
        if int(ts.TRAIN_STAGE) == 2 and not stage1 and not cfg.MODEL.WEIGHTS and ts.INFERENCE != "distance" \
                and cfg.INFERENCE.RUNTIME == "torch":  # (an exported runtime brings its own networks)
            logger.warning("MODEL.TWO_STAGE.TRAIN_STAGE is 2 but MODEL.TWO_STAGE.STAGE1.WEIGHTS is empty: the "
                           "segmentation U-Net stays at its random initialisation. Point it at stage 1's "
                           "model_final.pth.")
        return {
            **dense_base_kwargs(cfg),
            "seg_net": UNet(cfg, out_channels=1),
            "dist_net": UNet(cfg, out_channels=1),
            "train_stage": int(ts.TRAIN_STAGE),
            "inference": str(ts.INFERENCE),
            "bce_weight": float(ts.BCE_WEIGHT),
            "dice_weight": float(ts.DICE_WEIGHT),
            "distance_weight": float(ts.DISTANCE_WEIGHT),
            "distance_activation": str(ts.DISTANCE_ACTIVATION),
            "post": {"threshold": float(ts.THRESHOLD), "sigma": float(ts.SIGMA), "sigma_factor": float(ts.SIGMA_FACTOR),
                     "min_distance": int(ts.MIN_DISTANCE), "peak_threshold": float(ts.PEAK_THRESHOLD),
                     "min_size": int(ts.MIN_SIZE), "fill": bool(ts.FILL_HOLES), "dilate": float(ts.DILATE),
                     "connectivity": int(ts.CONNECTIVITY)},
            "stage1": SubModel.from_config(cfg, "MODEL.TWO_STAGE.STAGE1", "stage-1 segmentation U-Net"),
            "allow_pickle": bool(cfg.MODEL.CHECKPOINT.ALLOW_PICKLE),
        }

    @classmethod
    def submodels(cls, cfg: Any) -> list[SubModel]:
        """The sub-models a config of this meta-architecture loads (stage 2: the stage-1 segmentation U-Net)."""
        if int(cfg.MODEL.TWO_STAGE.TRAIN_STAGE) != 2 or not cfg.MODEL.TWO_STAGE.STAGE1.WEIGHTS:
            return []
        return [SubModel.from_config(cfg, "MODEL.TWO_STAGE.STAGE1", "stage-1 segmentation U-Net")]

    @classmethod
    def required_targets_of(cls, cfg: Any) -> tuple[str, ...]:
        """The dense targets a config's training losses need (added to ``INPUT.TARGETS`` by setup)."""
        ts = cfg.MODEL.TWO_STAGE
        return _targets(int(ts.TRAIN_STAGE), bool(ts.STAGE1.FROZEN))

    @property
    def prob_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return {"watershed": ("foreground", "distance"), "components": ("foreground",),
                "distance": ("distance",)}[self.inference_mode]

    @property
    def required_targets(self) -> tuple[str, ...]:
        return ("eroded",) * self.train_seg + ("distance",) * self.train_dist

    def _distance(self, x: torch.Tensor) -> torch.Tensor:
        d = self.dist_net(x)
        return torch.sigmoid(d) if self.distance_activation == "sigmoid" else d

    @torch.no_grad()
    def predict_distance(self, image: torch.Tensor) -> torch.Tensor:
        """``H x W`` distance map (normalised units, clipped to [0, 1]) of one ``C x H x W`` 0-255 image, on the
        image's device; tiled per ``MODEL.TILING`` for large images. What Mask R-CNN+ fills its channel with (its
        distance network runs with ``INFERENCE "distance"``: the segmentation U-Net is not run)."""
        d = self.predict_probs(image)[self.prob_names.index("distance")]
        return d.clamp_(0.0, 1.0).to(image.device)

    def network_modules(self) -> dict[str, nn.Module]:
        """The U-Nets the configured inference runs: "stage1" (foreground) unless ``INFERENCE "distance"``, "stage2"
        (distance) unless ``"components"``."""
        nets: dict[str, nn.Module] = {}
        if self.inference_mode != "distance":
            nets["stage1"] = TwoStageNetwork(self.seg_net, "sigmoid", "foreground",
                                             "stage-1 eroded-foreground probability")
        if self.inference_mode != "components":
            nets["stage2"] = TwoStageNetwork(self.dist_net, self.distance_activation, "distance",
                                             f"stage-2 normalised distance map ({self.distance_activation})")
        return nets

    def dense_probs(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference_mode == "distance":
            return self.run_network("stage2", x)
        fg = self.run_network("stage1", x)
        if self.inference_mode == "components":
            return fg
        return torch.cat([fg, self.run_network("stage2", x)], dim=1)

    def dense_losses(self, x: torch.Tensor, targets: dict[str, torch.Tensor], valid: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        losses: dict[str, torch.Tensor] = {}
        v = valid.float()
        n = v.sum().clamp_min(1.0)
        if self.train_seg:
            logits = self.seg_net(x)[:, 0]
            t = targets["eroded"].float()
            bce = (F.binary_cross_entropy_with_logits(logits, t, reduction="none") * v).sum() / n
            p = torch.sigmoid(logits) * v
            dice = (2.0 * (p * t).sum() + 1.0) / (p.sum() + (t * v).sum() + 1.0)
            losses["loss_bce"] = self.bce_weight * bce
            losses["loss_dice"] = self.dice_weight * (1.0 - dice)
        if self.train_dist:
            losses["loss_distance"] = self.distance_weight * masked_mse(self._distance(x)[:, 0], targets["distance"],
                                                                        valid)
        return losses

    def postprocess(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.post
        if self.inference_mode == "components":
            label = foreground_components(probs[0], p.get("threshold", 0.5), p.get("connectivity", 1),
                                          p.get("min_size", 20), p.get("fill", True), p.get("dilate", 0.0))
        elif self.inference_mode == "distance":
            dist = np.clip(probs[0], 0.0, 1.0)
            label = distance_watershed(dist, dist, **p)
            return label, instance_scores(label, dist)
        else:
            label = distance_watershed(probs[0], probs[1], **p)
        return label, instance_scores(label, probs[0])

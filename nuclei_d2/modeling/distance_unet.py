"""``DistanceUNet``: the distance-map regressor that fills Mask R-CNN+'s fifth input channel at inference.

Bancher et al., "Improving Mask R-CNN for Nuclei Instance Segmentation in Hematoxylin & Eosin-Stained Histological
Images" (MICCAI COMPAY 2021): Mask R-CNN+ takes the Euclidean distance map of the nuclei as an input channel. In
training it comes from the ground truth; at inference a separate U-Net predicts it -- five max-pooling levels, five
transposed convolutions, dropout 0.1, ReLU, a linear output trained with the mean squared error, Adam with lr 1e-3
divided by 10 every 25 epochs (``configs/distance_unet.yaml``).

This meta-architecture trains that U-Net with ``tools/train_net.py`` on the mapper's ``"distance"`` dense target
(:func:`nuclei_d2.data.targets.distance_map`: per-nucleus distance to the border, normalised to [0, 1] per nucleus --
the same map the mapper stacks as the input channel, there scaled to 0-255). The network is the project's one
:class:`~nuclei_d2.modeling.unet.UNet`, configured by ``MODEL.UNET``. Batching, normalisation and tiled inference come
from :class:`~nuclei_d2.modeling.dense_base.DenseSegmentor`.

So that it can be evaluated like every other model, inference also turns the distance map into nuclei: foreground
``distance > MODEL.DISTANCE_UNET.THRESHOLD``, markers at the smoothed map's local maxima, watershed
(:func:`nuclei_d2.postprocess.distance_watershed`). Mask R-CNN+ only uses the map
(:meth:`DistanceUNet.predict_distance`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..postprocess import distance_watershed, instance_scores
from .dense_base import DenseSegmentor, dense_base_kwargs
from .unet import UNet

__all__ = ["DistanceUNet"]


@META_ARCH_REGISTRY.register()
class DistanceUNet(DenseSegmentor):
    """``MODEL.META_ARCHITECTURE: DistanceUNet`` -- see the module docstring."""

    prob_names = ("distance",)

    @configurable
    def __init__(self, *, net: UNet, loss_weight: float = 1.0, post: dict[str, Any] | None = None, **kwargs: Any):
        """
        Args:
            net: the U-Net, 1 output channel (linear).
            loss_weight: weight of the MSE loss (``loss_distance``).
            post: keyword arguments of :func:`distance_watershed` for the nuclei of :meth:`postprocess`.
            kwargs: :class:`DenseSegmentor` arguments (pixel_mean, pixel_std, tiling, return_probs).
        """
        kwargs.setdefault("size_divisibility", net.size_divisibility)
        super().__init__(**kwargs)
        if net.out_channels != 1:
            raise ValueError(f"the distance U-Net must have 1 output channel, got {net.out_channels}")
        if net.in_channels != self.in_channels:
            raise ValueError(f"the distance U-Net takes {net.in_channels} channels but PIXEL_MEAN has "
                             f"{self.in_channels}")
        self.net = net
        self.loss_weight = float(loss_weight)
        self.post = dict(post or {})

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        if "distance" in cfg.INPUT.EXTRA_CHANNELS:
            raise ValueError("INPUT.EXTRA_CHANNELS of the distance U-Net must not contain 'distance': it predicts it")
        d = cfg.MODEL.DISTANCE_UNET
        return {
            **dense_base_kwargs(cfg),
            "net": UNet(cfg, out_channels=1),
            "loss_weight": float(d.LOSS_WEIGHT),
            "post": {"threshold": float(d.THRESHOLD), "min_size": int(d.MIN_SIZE), "sigma": 0.0,
                     "sigma_factor": 0.5, "peak_threshold": float(d.PEAK_THRESHOLD), "fill": True},
        }

    @property
    def required_targets(self) -> tuple[str, ...]:
        return ("distance",)

    def dense_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def dense_losses(self, x: torch.Tensor, targets: dict[str, torch.Tensor], valid: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        d = self.net(x)[:, 0]
        v = valid.float()
        mse = (((d - targets["distance"].float()) ** 2) * v).sum() / v.sum().clamp_min(1.0)
        return {"loss_distance": self.loss_weight * mse}

    @torch.no_grad()
    def predict_distance(self, image: torch.Tensor) -> torch.Tensor:
        """``H x W`` distance map (normalised units, clipped to [0, 1]) of one ``C x H x W`` 0-255 image, on the
        image's device; tiled per ``MODEL.TILING`` for large images."""
        d = self.predict_probs(image)[0]
        return d.clamp_(0.0, 1.0).to(image.device)

    def postprocess(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dist = np.clip(probs[0], 0.0, 1.0)
        label = distance_watershed(dist, dist, **self.post)
        return label, instance_scores(label, dist)

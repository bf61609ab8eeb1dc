"""The nucleus-boundary (NB) model: a ternary U-Net with an edge-weighted loss (Cui et al. 2019).

Cui, Zhang, Liu, Xiong and Hu, "A deep learning algorithm for one-step contour aware nuclei segmentation of
histopathology images", Med. Biol. Eng. Comput. 57 (2019); arXiv:1803.02786.

* **Network**: a U-Net-style FCN predicting three classes per pixel (background, boundary, inside), SELU activations,
  no normalisation, dropout 0.2 after each convolution, Glorot-uniform initialisation, 3x3 "same" convolutions
  (``configs/nb_unet.yaml`` sets these on :class:`nuclei_d2.modeling.unet.UNet`); trained with Adam.
* **Targets**: the ternary map (``INPUT.TARGETS: ["ternary", ...]``; boundary = annotated pixels within
  ``INPUT.BOUNDARY_WIDTH`` px of the nucleus contour; :func:`nuclei_d2.data.targets.ternary_map`).
* **Loss**: pixel-wise cross-entropy weighted by ``W = alpha * De / (Dc + De)`` of the pixel's position in the
  training patch (:func:`nuclei_d2.data.targets.edge_weight_map`): predictions near a patch border, which see less
  context, count less — consistently with the weighted vote that assembles overlapping patches at inference
  (:mod:`nuclei_d2.layers.tiling`).
* **Post-processing** (parameter-free): inside probability > 0.5 -> connected components -> each grown back by the
  boundary width (:func:`nuclei_d2.postprocess.nb_postprocess`). Scores: mean inside probability of the component.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY

from ..postprocess import nb_postprocess
from .dense_base import DenseSegmentor, dense_base_kwargs
from .unet import UNet

__all__ = ["NucleusBoundaryUNet"]


@META_ARCH_REGISTRY.register()
class NucleusBoundaryUNet(DenseSegmentor):
    """``MODEL.META_ARCHITECTURE: NucleusBoundaryUNet`` — see the module docstring."""

    prob_names = ("background", "boundary", "inside")
    # "inside" (the nucleus minus its INPUT.BOUNDARY_WIDTH band) is the two-stage U-Net's eroded foreground, give or
    # take a pixel: TEST.MERGE.MODE "shared" averages the two
    map_meanings = MappingProxyType({"inside": "interior"})
    postprocess_keys = tuple(f"MODEL.NB.{k}" for k in ("THRESHOLD", "CONNECTIVITY", "DILATION", "MIN_SIZE",
                                                        "RESTRICT_TO_FOREGROUND"))

    @configurable
    def __init__(self, *, unet: UNet, loss_weighting: str = "edge",
                 class_weights: tuple[float, float, float] = (1.0, 1.0, 1.0), threshold: float = 0.5,
                 connectivity: int = 1, dilation: float = 2.0, min_size: int = 0,
                 restrict_to_foreground: bool = False, **kwargs: Any):
        """
        Args:
            unet: a :class:`UNet` with 3 output channels (background, boundary, inside logits).
            loss_weighting: "edge" (the paper's ``W``) or "none" (plain cross-entropy).
            class_weights: cross-entropy weights of background, boundary, inside.
            threshold, connectivity, dilation, min_size: post-processing (:func:`nb_postprocess`); ``dilation`` is
                the boundary width the targets were made with.
            restrict_to_foreground: grow components only into pixels whose argmax class is not background.
            kwargs: :class:`DenseSegmentor` arguments (pixel_mean, pixel_std, tiling, return_probs).
        """
        kwargs.setdefault("size_divisibility", unet.size_divisibility)
        super().__init__(**kwargs)
        if unet.out_channels != 3:
            raise ValueError(f"the NB model needs a U-Net with 3 outputs (background, boundary, inside), got "
                             f"{unet.out_channels}")
        if unet.in_channels != self.in_channels:
            raise ValueError(f"U-Net takes {unet.in_channels} channels but PIXEL_MEAN has {self.in_channels}")
        if loss_weighting not in ("edge", "none"):
            raise ValueError(f"MODEL.NB.LOSS_WEIGHTING must be 'edge' or 'none', got {loss_weighting!r}")
        if len(class_weights) != 3 or any(w < 0 for w in class_weights):
            raise ValueError(f"MODEL.NB.CLASS_WEIGHTS needs 3 non-negative weights, got {list(class_weights)}")
        self.unet = unet
        self.loss_weighting = loss_weighting
        self.register_buffer("class_weights", torch.tensor(class_weights, dtype=torch.float32), False)
        self.post = dict(boundary_width=float(dilation), threshold=float(threshold), connectivity=int(connectivity),
                         min_size=int(min_size))
        self.restrict_to_foreground = bool(restrict_to_foreground)

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        nb = cfg.MODEL.NB
        return {
            **dense_base_kwargs(cfg),
            "unet": UNet(cfg, out_channels=3),
            "loss_weighting": str(nb.LOSS_WEIGHTING),
            "class_weights": tuple(float(w) for w in nb.CLASS_WEIGHTS),
            "threshold": float(nb.THRESHOLD),
            "connectivity": int(nb.CONNECTIVITY),
            "dilation": float(nb.DILATION) if nb.DILATION >= 0 else float(cfg.INPUT.BOUNDARY_WIDTH),
            "min_size": int(nb.MIN_SIZE),
            "restrict_to_foreground": bool(nb.RESTRICT_TO_FOREGROUND),
        }

    @classmethod
    def required_targets_of(cls, cfg: Any) -> tuple[str, ...]:
        """The dense targets a config's training losses need (added to ``INPUT.TARGETS`` by setup)."""
        return ("ternary", "edge_weight") if cfg.MODEL.NB.LOSS_WEIGHTING == "edge" else ("ternary",)

    @property
    def required_targets(self) -> tuple[str, ...]:
        return ("ternary", "edge_weight") if self.loss_weighting == "edge" else ("ternary",)

    def dense_probs(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.unet(x), dim=1)

    def dense_losses(self, x: torch.Tensor, targets: dict[str, torch.Tensor], valid: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        logits = self.unet(x)
        target = targets["ternary"].long()
        if int(target.max()) > 2 or int(target.min()) < 0:
            raise ValueError(f"ternary target values must be 0/1/2, got range [{int(target.min())}, "
                             f"{int(target.max())}]")
        ce = F.cross_entropy(logits, target, weight=self.class_weights, reduction="none")
        w = valid.to(ce.dtype)
        if self.loss_weighting == "edge":
            w = w * targets["edge_weight"]
        return {"loss_ternary": (ce * w).sum() / w.sum().clamp_min(1e-6)}

    def postprocess(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        fg = probs.argmax(axis=0) != 0 if self.restrict_to_foreground else None
        return nb_postprocess(probs[2], foreground=fg, **self.post)

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

Option, not in the paper: ``MODEL.NB.HV_HEAD True`` adds HoVer-Net's horizontal/vertical offset maps (Graham et al.,
Medical Image Analysis 58, 2019) as two more output channels of the same U-Net (tanh; target ``"hv"``,
:func:`nuclei_d2.data.targets.hv_map`), trained with ``HV_MSE_WEIGHT * MSE + HV_MSGE_WEIGHT * MSGE`` (mean squared
error of the maps over the valid pixels, and of their Sobel derivatives along their own axis over the nucleus
pixels), and ``MODEL.NB.POSTPROCESS "hv"`` post-processes with them: markers where ``1 - p(background)`` is high and
the maps' gradient energy low, marker-controlled watershed in the foreground
(:func:`nuclei_d2.postprocess.hv_watershed`).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..postprocess import hv_watershed, instance_scores, nb_postprocess
from .dense_base import DenseSegmentor, dense_base_kwargs
from .networks import NetworkIO
from .unet import UNet

__all__ = ["NBNetwork", "NucleusBoundaryUNet"]


class NBNetwork(nn.Module):
    """The NB model's network as one tensor-in / tensor-out module ("main"): normalised image -> background,
    boundary, inside probabilities (softmax) and, with the HV head, the horizontal/vertical maps (tanh)."""

    def __init__(self, unet: UNet, hv_head: bool):
        super().__init__()
        self.unet = unet
        self.hv_head = bool(hv_head)
        k = 5 if hv_head else 3
        self.io = NetworkIO(inputs=("image",), outputs=("probs",), channels=(unet.in_channels,), out_channels=(k,),
                            size_multiple=unet.size_divisibility, pad_mode=unet.pad_mode,
                            meaning="background, boundary, inside probabilities (softmax)"
                                    + (", horizontal, vertical offsets (tanh, -1..1)" if hv_head else ""))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unet(x)
        probs = F.softmax(out[:, :3], dim=1)
        return torch.cat([probs, torch.tanh(out[:, 3:5])], dim=1) if self.hv_head else probs


@META_ARCH_REGISTRY.register()
class NucleusBoundaryUNet(DenseSegmentor):
    """``MODEL.META_ARCHITECTURE: NucleusBoundaryUNet`` — see the module docstring."""

    # with MODEL.NB.HV_HEAD the maps are followed by "horizontal" and "vertical" (a vector field, not probabilities)
    vector_maps = (("horizontal", "vertical"),)
    # "inside" (the nucleus minus its INPUT.BOUNDARY_WIDTH band) is the two-stage U-Net's eroded foreground, give or
    # take a pixel: TEST.MERGE.MODE "shared" averages the two
    map_meanings = MappingProxyType({"inside": "interior"})
    postprocess_keys = tuple(f"MODEL.NB.{k}" for k in ("THRESHOLD", "CONNECTIVITY", "DILATION", "MIN_SIZE",
                                                        "RESTRICT_TO_FOREGROUND", "POSTPROCESS", "HV_THRESHOLD",
                                                        "HV_ENERGY_THRESHOLD", "HV_SOBEL_SIZE", "HV_SIGMA",
                                                        "HV_MARKER_MIN_SIZE", "HV_MIN_SIZE"))

    @configurable
    def __init__(self, *, unet: UNet, loss_weighting: str = "edge",
                 class_weights: tuple[float, float, float] = (1.0, 1.0, 1.0), threshold: float = 0.5,
                 connectivity: int = 1, dilation: float = 2.0, min_size: int = 0,
                 restrict_to_foreground: bool = False, hv_head: bool = False, hv_mse_weight: float = 1.0,
                 hv_msge_weight: float = 2.0, postprocess: str = "ternary", hv_post: dict[str, Any] | None = None,
                 **kwargs: Any):
        """
        Args:
            unet: a :class:`UNet` with 3 output channels (background, boundary, inside logits), 5 with ``hv_head``.
            loss_weighting: "edge" (the paper's ``W``) or "none" (plain cross-entropy).
            class_weights: cross-entropy weights of background, boundary, inside.
            threshold, connectivity, dilation, min_size: post-processing (:func:`nb_postprocess`); ``dilation`` is
                the boundary width the targets were made with.
            restrict_to_foreground: grow components only into pixels whose argmax class is not background.
            hv_head: the U-Net has 2 more outputs, the horizontal/vertical offset maps (5 outputs in all).
            hv_mse_weight, hv_msge_weight: their losses ``loss_hv_mse`` and ``loss_hv_msge``.
            postprocess: "ternary" (the paper's, :func:`nb_postprocess`) or "hv" (:func:`hv_watershed`; needs
                ``hv_head``).
            hv_post: keyword arguments of :func:`hv_watershed` (threshold, energy_threshold, ksize, sigma,
                marker_min_size, min_size).
            kwargs: :class:`DenseSegmentor` arguments (pixel_mean, pixel_std, tiling, return_probs).
        """
        kwargs.setdefault("size_divisibility", unet.size_divisibility)
        super().__init__(**kwargs)
        want = 5 if hv_head else 3
        if unet.out_channels != want:
            raise ValueError(f"the NB model needs a U-Net with {want} outputs (background, boundary, inside"
                             f"{', horizontal, vertical' if hv_head else ''}), got {unet.out_channels}")
        if postprocess not in ("ternary", "hv"):
            raise ValueError(f"MODEL.NB.POSTPROCESS must be 'ternary' or 'hv', got {postprocess!r}")
        if postprocess == "hv" and not hv_head:
            raise ValueError("MODEL.NB.POSTPROCESS 'hv' needs the horizontal/vertical maps: set MODEL.NB.HV_HEAD True")
        if hv_mse_weight < 0 or hv_msge_weight < 0:
            raise ValueError(f"MODEL.NB.HV_MSE_WEIGHT / HV_MSGE_WEIGHT must be >= 0, got {hv_mse_weight} / "
                             f"{hv_msge_weight}")
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
        self.hv_head = bool(hv_head)
        self.hv_mse_weight, self.hv_msge_weight = float(hv_mse_weight), float(hv_msge_weight)
        self.postprocess_mode = postprocess
        self.hv_post = dict(hv_post or {})
        self.register_buffer("sobel", _sobel_kernels(5), False)

    @classmethod
    def from_config(cls, cfg: Any) -> dict[str, Any]:
        nb = cfg.MODEL.NB
        return {
            **dense_base_kwargs(cfg),
            "unet": UNet(cfg, out_channels=5 if nb.HV_HEAD else 3),
            "loss_weighting": str(nb.LOSS_WEIGHTING),
            "class_weights": tuple(float(w) for w in nb.CLASS_WEIGHTS),
            "threshold": float(nb.THRESHOLD),
            "connectivity": int(nb.CONNECTIVITY),
            "dilation": float(nb.DILATION) if nb.DILATION >= 0 else float(cfg.INPUT.BOUNDARY_WIDTH),
            "min_size": int(nb.MIN_SIZE),
            "restrict_to_foreground": bool(nb.RESTRICT_TO_FOREGROUND),
            "hv_head": bool(nb.HV_HEAD),
            "hv_mse_weight": float(nb.HV_MSE_WEIGHT),
            "hv_msge_weight": float(nb.HV_MSGE_WEIGHT),
            "postprocess": str(nb.POSTPROCESS),
            "hv_post": {"threshold": float(nb.HV_THRESHOLD), "energy_threshold": float(nb.HV_ENERGY_THRESHOLD),
                        "ksize": int(nb.HV_SOBEL_SIZE), "sigma": float(nb.HV_SIGMA),
                        "marker_min_size": int(nb.HV_MARKER_MIN_SIZE), "min_size": int(nb.HV_MIN_SIZE),
                        "connectivity": int(nb.CONNECTIVITY)},
        }

    @classmethod
    def required_targets_of(cls, cfg: Any) -> tuple[str, ...]:
        """The dense targets a config's training losses need (added to ``INPUT.TARGETS`` by setup)."""
        nb = cfg.MODEL.NB
        return ("ternary",) + ("edge_weight",) * (nb.LOSS_WEIGHTING == "edge") + ("hv",) * bool(nb.HV_HEAD)

    @property
    def required_targets(self) -> tuple[str, ...]:
        return ("ternary",) + ("edge_weight",) * (self.loss_weighting == "edge") + ("hv",) * self.hv_head

    @property
    def prob_names(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("background", "boundary", "inside") + ("horizontal", "vertical") * self.hv_head

    def network_modules(self) -> dict[str, nn.Module]:
        return {"main": NBNetwork(self.unet, self.hv_head)}

    def dense_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.run_network("main", x)

    def hv_losses(self, hv_logits: torch.Tensor, target: torch.Tensor, nucleus: torch.Tensor, valid: torch.Tensor
                  ) -> dict[str, torch.Tensor]:
        """``loss_hv_mse`` (maps, over the valid pixels) and ``loss_hv_msge`` (their Sobel derivatives along their own
        axis, d/dx of the horizontal map and d/dy of the vertical one, over the nucleus pixels), weighted."""
        with torch.autocast(hv_logits.device.type, enabled=False):  # small gradients: float32 throughout
            pred = torch.tanh(hv_logits.float())
            target = target.float()
            v = valid.float()[:, None]
            mse = (((pred - target) ** 2) * v).sum() / (2.0 * v.sum()).clamp_min(1.0)
            k = self.sobel.to(pred.dtype)
            grad_err = F.conv2d(pred - target, k, padding=k.shape[-1] // 2, groups=2)  # linear: grad(p) - grad(t)
            focus = (nucleus & valid).float()[:, None]
            msge = ((grad_err ** 2) * focus).sum() / (2.0 * focus.sum()).clamp_min(1.0)
        return {"loss_hv_mse": self.hv_mse_weight * mse, "loss_hv_msge": self.hv_msge_weight * msge}

    def dense_losses(self, x: torch.Tensor, targets: dict[str, torch.Tensor], valid: torch.Tensor
                     ) -> dict[str, torch.Tensor]:
        out = self.unet(x)
        logits = out[:, :3]
        target = targets["ternary"].long()
        if int(target.max()) > 2 or int(target.min()) < 0:
            raise ValueError(f"ternary target values must be 0/1/2, got range [{int(target.min())}, "
                             f"{int(target.max())}]")
        ce = F.cross_entropy(logits, target, weight=self.class_weights, reduction="none")
        w = valid.to(ce.dtype)
        if self.loss_weighting == "edge":
            w = w * targets["edge_weight"]
        losses = {"loss_ternary": (ce * w).sum() / w.sum().clamp_min(1e-6)}
        if self.hv_head:
            losses.update(self.hv_losses(out[:, 3:5], targets["hv"], target > 0, valid))
        return losses

    def postprocess(self, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.postprocess_mode == "hv":
            fg = 1.0 - probs[0]
            label = hv_watershed(fg, probs[3], probs[4], **self.hv_post)
            return label, instance_scores(label, fg)
        fg = probs[:3].argmax(axis=0) != 0 if self.restrict_to_foreground else None
        return nb_postprocess(probs[2], foreground=fg, **self.post)


def _sobel_kernels(ksize: int) -> torch.Tensor:
    """``2 x 1 x k x k`` Sobel kernels, d/dx then d/dy, scaled to unit response to a unit slope (OpenCV's
    ``getDerivKernels(normalize=True)``, as :func:`nuclei_d2.postprocess.hv_energy` uses)."""
    import cv2

    d, s = cv2.getDerivKernels(1, 0, ksize, normalize=True)  # derivative and smoothing 1-D kernels
    ddx = np.outer(s.ravel(), d.ravel())  # rows smooth, columns differentiate
    return torch.from_numpy(np.stack([ddx, ddx.T])[:, None].astype(np.float32))

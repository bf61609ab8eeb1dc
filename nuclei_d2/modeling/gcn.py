"""The auxiliary semantic branch of Liu et al. (IJCAI 2019): a GCN decoder on the shared FPN features.

Global Convolutional Network (Peng et al., "Large Kernel Matters", CVPR 2017): each pyramid level goes through a
*GCN block*, a k x k receptive field built from two separable branches ((k x 1 then 1 x k) + (1 x k then k x 1), no
non-linearity in between, so it costs O(2k) instead of O(k^2) per pixel), then a *boundary refinement* (BR) residual
block ``x + conv3x3(relu(conv3x3(x)))``. Coarser score maps are upsampled and added to the next finer level, refined
again, and the stride-4 result is brought to input size by two x2 upsamplings, each followed by a BR block.

The branch is trained with a pixel-wise cross-entropy against the nucleus foreground (L_semseg1) and is used in
training only: it shapes the shared backbone; inference uses the instance branch. No normalisation layers (the paper
asks for no batch norm in heads, and Peng et al.'s GCN/BR blocks have none). Upsampling is bilinear here (Peng et al.
use deconvolutions).
"""

from __future__ import annotations

import math

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec
from torch import nn

__all__ = ["BoundaryRefinement", "GCNBlock", "GCNSemanticHead"]


class GCNBlock(nn.Module):
    """Large-kernel (k x k) convolution as the sum of two separable branches (Peng et al. 2017, Fig. 2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 5):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"GCN kernel size must be odd and >= 1, got {kernel_size}")
        p = kernel_size // 2
        self.left_kx1 = Conv2d(in_channels, out_channels, kernel_size=(kernel_size, 1), padding=(p, 0))
        self.left_1xk = Conv2d(out_channels, out_channels, kernel_size=(1, kernel_size), padding=(0, p))
        self.right_1xk = Conv2d(in_channels, out_channels, kernel_size=(1, kernel_size), padding=(0, p))
        self.right_kx1 = Conv2d(out_channels, out_channels, kernel_size=(kernel_size, 1), padding=(p, 0))
        for m in (self.left_kx1, self.left_1xk, self.right_1xk, self.right_kx1):
            weight_init.c2_xavier_fill(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.left_1xk(self.left_kx1(x)) + self.right_kx1(self.right_1xk(x))


class BoundaryRefinement(nn.Module):
    """Residual refinement ``x + conv3x3(relu(conv3x3(x)))`` (Peng et al. 2017, Fig. 2 "BR")."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = Conv2d(channels, channels, kernel_size=3, padding=1, activation=nn.ReLU())
        self.conv2 = Conv2d(channels, channels, kernel_size=3, padding=1)
        weight_init.c2_msra_fill(self.conv1)
        # Zero-initialised last conv: every BR block starts as the identity, so the stacked blocks do not blow up
        # the initial logits of a randomly initialised branch (Goyal et al. 2017's zero-init residual trick).
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class GCNSemanticHead(nn.Module):
    """GCN decoder on FPN levels -> (B, num_classes, H, W) semantic logits at the (padded) input size."""

    @configurable
    def __init__(self, input_shape: dict[str, ShapeSpec], *, in_features: list[str], num_classes: int = 2,
                 channels: int = 2, kernel_size: int = 5):
        """
        Args:
            input_shape: backbone output shapes (name -> ShapeSpec with channels and stride).
            in_features: levels to decode, e.g. ["p2", "p3", "p4", "p5"]; the finest must have stride 4 or less.
            num_classes: semantic classes (2: background, nucleus).
            channels: channels of the GCN score maps. Peng et al. map straight to class scores (= num_classes);
                with more channels a 1x1 predictor maps the stride-4 result to num_classes.
            kernel_size: k of the k x k GCN blocks (odd; the paper uses 5).
        """
        super().__init__()
        missing = [f for f in in_features if f not in input_shape]
        if not in_features or missing:
            raise ValueError(f"MODEL.PANOPTIC_FUSION.GCN.IN_FEATURES: {missing or 'empty'} not among the backbone's "
                             f"outputs {sorted(input_shape)}")
        # finest first
        self.in_features = sorted(in_features, key=lambda f: input_shape[f].stride)
        self.finest_stride = input_shape[self.in_features[0]].stride
        self.gcn = nn.ModuleList([GCNBlock(input_shape[f].channels, channels, kernel_size) for f in self.in_features])
        self.br = nn.ModuleList([BoundaryRefinement(channels) for _ in self.in_features])
        self.br_merge = nn.ModuleList([BoundaryRefinement(channels) for _ in self.in_features[:-1]])
        self.predictor = nn.Identity() if channels == num_classes else Conv2d(channels, num_classes, kernel_size=1)
        if not isinstance(self.predictor, nn.Identity):
            weight_init.c2_msra_fill(self.predictor)
        # x2 upsamplings from the finest stride to stride 1, each followed by a BR block (Peng et al.: two).
        n_up = max(0, round(math.log2(self.finest_stride)))
        self.br_up = nn.ModuleList([BoundaryRefinement(num_classes) for _ in range(n_up)])
        self.num_classes = num_classes

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]):
        g = cfg.MODEL.PANOPTIC_FUSION.GCN
        return {"input_shape": input_shape, "in_features": list(g.IN_FEATURES), "num_classes": 2,
                "channels": g.CHANNELS, "kernel_size": g.KERNEL_SIZE}

    def forward(self, features: dict[str, torch.Tensor], output_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Semantic logits (B, num_classes, H, W); H, W = ``output_size`` or finest level x its stride."""
        score = None
        for i in reversed(range(len(self.in_features))):  # coarsest -> finest
            s = self.br[i](self.gcn[i](features[self.in_features[i]]))
            if score is not None:
                s = self.br_merge[i](s + F.interpolate(score, size=s.shape[-2:], mode="bilinear", align_corners=False))
            score = s
        score = self.predictor(score)
        h, w = score.shape[-2:]
        target = output_size or (h * self.finest_stride, w * self.finest_stride)
        for k, br in enumerate(self.br_up):
            f = 2 ** (k + 1)
            size = target if k == len(self.br_up) - 1 else (h * f, w * f)
            score = br(F.interpolate(score, size=size, mode="bilinear", align_corners=False))
        if score.shape[-2:] != tuple(target):
            score = F.interpolate(score, size=target, mode="bilinear", align_corners=False)
        return score

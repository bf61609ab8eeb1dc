"""TAFE — task-aware feature encoding — the stage-1 network of BRP-Net (Chen et al., MICCAI 2020, Sec. 2.1).

* A :class:`~nuclei_d2.modeling.brpnet.densenet.DenseNetEncoder` (stride-1 stem, no max-pool) gives features at
  strides 1, 2, 4, 8.
* Each level i goes through an unshared 1x1 convolution (``width`` = 256 channels) per task into two
  **task-specific encoders** (:class:`TaskSpecificEncoder`, semantic and boundary): ``E_1 = conv3x3(F_1)``,
  ``E_i = conv3x3(down(E_{i-1}) + F_i)`` — the down-sampled previous level merged with ``F_i`` by a sum.
* **Feature fusion modules** (:class:`FeatureFusionModule`) exchange information between the two encoders at every
  level; residual and light-weight: ``E_s += g_s([E_s, E_b])``, ``E_b += g_b([E_s, E_b])`` with ``g`` a 1x1
  conv-BN-ReLU.
* Two shallow **decoders** (:class:`ShallowDecoder`), three BN-ReLU-Conv each: from the coarsest level, upsample,
  add the next finer ``E_i``, BN-ReLU-Conv; a 1x1 convolution gives the logit at full resolution.
* **Deep supervision**: a 1x1 classifier on every ``E_i`` of each task, upsampled to the input size.
* Loss per output: smooth truncated loss + 0.5 x soft Dice (:func:`smooth_truncated_loss`, :func:`soft_dice_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .densenet import DenseNetEncoder

__all__ = ["FeatureFusionModule", "ShallowDecoder", "TAFE", "TaskSpecificEncoder", "smooth_truncated_loss",
           "soft_dice_loss"]

TASKS = ("semantic", "boundary")


def _conv_bn_relu(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))


class TaskSpecificEncoder(nn.Module):
    """One task's encoder: unshared 1x1 lateral convs ``F_i``, then ``E_i = conv3x3(down(E_{i-1}) + F_i)``.

    The fusion with the other task happens between levels (see :class:`TAFE`), so the encoder is run level by level
    through :meth:`level`.
    """

    def __init__(self, in_channels: Sequence[int], width: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList([nn.Conv2d(c, width, 1) for c in in_channels])
        self.merge = nn.ModuleList([_conv_bn_relu(width, width) for _ in in_channels])
        self.width = int(width)

    def level(self, i: int, feature: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        f = self.lateral[i](feature)
        if previous is not None:
            f = f + _down_to(previous, f.shape[-2:])
        return self.merge[i](f)


def _down_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``x`` max-pooled to ``size``. The usual case, an exact halving (the backbone's inputs are padded to a multiple
    of its stride), is a plain 2x2 max-pooling: the same numbers as the adaptive pooling, and one that ONNX exports
    for any input size (the adaptive one exports with the example's window baked in)."""
    h, w = int(size[0]), int(size[1])
    if x.shape[-2] == 2 * h and x.shape[-1] == 2 * w:
        return F.max_pool2d(x, 2)
    if x.shape[-2] == h and x.shape[-1] == w:
        return x
    return F.adaptive_max_pool2d(x, (h, w))


class FeatureFusionModule(nn.Module):
    """Residual light-weight fusion of the two tasks' features at one level (both ``width`` channels in and out)."""

    def __init__(self, width: int = 256):
        super().__init__()
        self.to_semantic = nn.Sequential(nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.ReLU(True))
        self.to_boundary = nn.Sequential(nn.Conv2d(2 * width, width, 1, bias=False), nn.BatchNorm2d(width),
                                         nn.ReLU(True))

    def forward(self, sem: torch.Tensor, bnd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([sem, bnd], dim=1)
        return sem + self.to_semantic(both), bnd + self.to_boundary(both)


class ShallowDecoder(nn.Module):
    """Coarse-to-fine decoder: one BN-ReLU-Conv3x3 per upsampling step (three for four levels), then a 1x1 logit."""

    def __init__(self, width: int = 256, num_levels: int = 4):
        super().__init__()
        self.blocks = nn.ModuleList([
            nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(True), nn.Conv2d(width, width, 3, padding=1, bias=False))
            for _ in range(num_levels - 1)])
        self.head = nn.Conv2d(width, 1, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for block, skip in zip(self.blocks, reversed(feats[:-1])):
            x = block(F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False) + skip)
        if len(feats) == 1:
            x = F.relu(x)
        return self.head(x)


class TAFE(nn.Module):
    """The stage-1 network (see the module docstring). ``forward`` returns ``{task: logits}`` and, in training,
    ``{f"{task}_ds{i}": deep-supervision logits}`` too, all ``B x 1 x H x W``."""

    def __init__(self, backbone: DenseNetEncoder, width: int = 256, fusion: bool = True,
                 deep_supervision: bool = True):
        super().__init__()
        self.backbone = backbone
        n = backbone.num_blocks
        self.encoders = nn.ModuleDict({t: TaskSpecificEncoder(backbone.out_channels, width) for t in TASKS})
        self.fusion = nn.ModuleList([FeatureFusionModule(width) for _ in range(n)]) if fusion else None
        self.decoders = nn.ModuleDict({t: ShallowDecoder(width, n) for t in TASKS})
        self.deep_supervision = bool(deep_supervision)
        if deep_supervision:
            self.ds_heads = nn.ModuleDict({t: nn.ModuleList([nn.Conv2d(width, 1, 1) for _ in range(n)])
                                           for t in TASKS})
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.out_channels == 1:
                # Start the logits at the nucleus prior (~10 % foreground) so the first steps are not wasted.
                nn.init.constant_(m.bias, -math.log(9.0))

    @property
    def size_divisibility(self) -> int:
        return self.backbone.size_divisibility

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        enc: dict[str, list[torch.Tensor]] = {t: [] for t in TASKS}
        prev: dict[str, torch.Tensor | None] = {t: None for t in TASKS}
        for i, f in enumerate(feats):
            e = {t: self.encoders[t].level(i, f, prev[t]) for t in TASKS}
            if self.fusion is not None:
                e["semantic"], e["boundary"] = self.fusion[i](e["semantic"], e["boundary"])
            for t in TASKS:
                enc[t].append(e[t])
                prev[t] = e[t]
        out = {t: self.decoders[t](enc[t]) for t in TASKS}
        if self.training and self.deep_supervision:
            size = x.shape[-2:]
            for t in TASKS:
                for i, (head, e) in enumerate(zip(self.ds_heads[t], enc[t])):
                    out[f"{t}_ds{i + 1}"] = F.interpolate(head(e), size=size, mode="bilinear", align_corners=False)
        return out


def smooth_truncated_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                          gamma: float = 0.3) -> torch.Tensor:
    """Smooth truncated loss (Zhou et al., CIA-Net, IPMI 2019; used by BRP-Net Sec. 2.1), mean over valid pixels.

    With ``p_t`` the predicted probability of the true class: ``-log(p_t)`` when ``p_t >= gamma`` and the quadratic
    continuation ``-log(gamma) + (1 - p_t^2 / gamma^2) / 2`` below (equal value and slope at ``gamma``), so
    confidently wrong pixels — often annotation noise — get a bounded loss and gradient.
    """
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"the truncation gamma must be in (0, 1), got {gamma}")
    t = target.to(logits.dtype)
    p = torch.sigmoid(logits)
    pt = (p * t + (1 - p) * (1 - t)).clamp_min(1e-7)
    log_pt = -F.binary_cross_entropy_with_logits(logits, t, reduction="none")  # stable log(p_t)
    loss = torch.where(pt >= gamma, -log_pt, -math.log(gamma) + 0.5 * (1 - pt * pt / (gamma * gamma)))
    if valid is None:
        return loss.mean()
    v = valid.to(loss.dtype)
    return (loss * v).sum() / v.sum().clamp_min(1.0)


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None = None,
                   smooth: float = 1.0) -> torch.Tensor:
    """``1 - (2 |P T| + s) / (|P| + |T| + s)`` over the batch's valid pixels, ``P`` the sigmoid probabilities."""
    p = torch.sigmoid(logits)
    t = target.to(p.dtype)
    if valid is not None:
        v = valid.to(p.dtype)
        p, t = p * v, t * v
    return 1.0 - (2.0 * (p * t).sum() + smooth) / (p.sum() + t.sum() + smooth)

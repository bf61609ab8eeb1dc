"""Proposal-wise segmentation — BRP-Net's stage 2 (Chen et al., MICCAI 2020, Sec. 2.3 and Fig. 4).

Every proposal is cropped (a square with a 12-px margin, :func:`~.proposals.proposal_boxes`), and its patch goes to
one of two networks by size: patches up to ``S_S`` px to the *small* network at ``S_S x S_S`` (48), larger ones to
the *large* network at ``S_L x S_L`` (176). Input channels: the normalised image patch and the two TAFE probability
maps (semantic, boundary), all zeroed outside the proposal dilated by 2 px, so the network sees which nucleus is
meant. Each network (:class:`RefineNet`, the paper's Fig. 4) has four dense blocks of four 3x3 convolutions with
growth rates 16 / 32 / 64 / 128 and a light decoder back to the patch size; trained with a focal loss
(:func:`sigmoid_focal_loss`) on the matched nucleus's mask (IoU > tau, else all background;
:func:`~.proposals.assign_proposal_labels`). The refined masks are pasted back into the image
(:func:`assemble_refined`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from ...layers.morphology import disk, keep_largest_pieces
from .proposals import crop_resize, paste_back

__all__ = ["DenseBlock", "RefineNet", "assemble_refined", "build_patches", "sigmoid_focal_loss"]


class DenseBlock(nn.Module):
    """``num_layers`` BN-ReLU-Conv3x3 layers of ``growth`` channels, each fed the concatenation of all before."""

    def __init__(self, in_channels: int, growth: int, num_layers: int = 4):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Sequential(nn.BatchNorm2d(in_channels + i * growth), nn.ReLU(True),
                          nn.Conv2d(in_channels + i * growth, growth, 3, padding=1, bias=False))
            for i in range(num_layers)])
        self.out_channels = in_channels + num_layers * growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], dim=1)
        return x


class RefineNet(nn.Module):
    """The proposal-wise segmentation network (Fig. 4): stem, four dense blocks (growth ``growths``, ``num_layers``
    convs each) with 2x2 average-pool transitions, a decoder that upsamples and concatenates each block's output,
    and a 1x1 logit. Input side must be a multiple of ``2 ** (len(growths) - 1)``."""

    def __init__(self, in_channels: int, growths: Sequence[int] = (16, 32, 64, 128), num_layers: int = 4):
        super().__init__()
        if len(growths) < 1:
            raise ValueError("RefineNet needs at least one dense block")
        c = 2 * int(growths[0])
        self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                                  nn.ReLU(True))
        self.blocks = nn.ModuleList()
        self.transitions = nn.ModuleList()
        skips: list[int] = []
        for i, g in enumerate(growths):
            block = DenseBlock(c, int(g), num_layers)
            self.blocks.append(block)
            c = block.out_channels
            if i != len(growths) - 1:
                skips.append(c)
                self.transitions.append(nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(True),
                                                      nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)))
                c //= 2
        self.decoder = nn.ModuleList()
        for s in reversed(skips):
            out = max(s // 2, 8)
            self.decoder.append(nn.Sequential(nn.Conv2d(c + s, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                                              nn.ReLU(True)))
            c = out
        self.head = nn.Conv2d(c, 1, 1)
        self.size_divisibility = 2 ** (len(growths) - 1)
        self.in_channels = int(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``B x C x S x S`` -> ``B x 1 x S x S`` logits."""
        if x.shape[-1] % self.size_divisibility or x.shape[-2] % self.size_divisibility:
            raise ValueError(f"RefineNet input side must be a multiple of {self.size_divisibility}, got "
                             f"{tuple(x.shape[-2:])}")
        x = self.stem(x)
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.transitions):
                skips.append(x)
                x = self.transitions[i](x)
        for dec, skip in zip(self.decoder, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(torch.cat([x, skip], dim=1))
        return self.head(x)


def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, alpha: float = -1.0
                       ) -> torch.Tensor:
    """Focal loss (Lin et al. 2017) averaged over pixels; ``alpha < 0`` = no class weighting."""
    t = target.to(logits.dtype)
    ce = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    p = torch.sigmoid(logits)
    pt = p * t + (1 - p) * (1 - t)
    loss = ce * (1 - pt) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1 - alpha) * (1 - t))
    return loss.mean()


def build_patches(image: np.ndarray, semantic: np.ndarray, boundary: np.ndarray, proposals: np.ndarray,
                  boxes: np.ndarray, small_size: int = 48, large_size: int = 176, mask_dilation: float = 2.0,
                  gt: np.ndarray | None = None, matches: np.ndarray | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Network inputs of every proposal, grouped by network (``"small"``, ``"large"``).

    Args:
        image: ``C x H x W`` normalised image (float32).
        semantic, boundary: ``H x W`` TAFE probabilities.
        proposals: ``H x W`` proposal label map 1..N; ``boxes``: its :func:`proposal_boxes` (N x 3).
        small_size, large_size: ``S_S`` and ``S_L``; a box of side <= ``S_S`` goes to the small network.
        mask_dilation: inputs are zeroed outside the proposal dilated by this many px.
        gt, matches: ground-truth label map and, per proposal, the matched label (0 = background): adds targets.

    Returns:
        ``{group: {"index": (k,) proposal indices 0..N-1, "input": k x (C+2) x S x S float32,
        "target": k x S x S uint8 (with gt)}}`` for the non-empty groups.
    """
    c = image.shape[0]
    hwc = np.concatenate([np.transpose(image, (1, 2, 0)), semantic[..., None], boundary[..., None]], axis=2)
    hwc = np.ascontiguousarray(hwc, dtype=np.float32)
    kernel = disk(mask_dilation).astype(np.uint8) if mask_dilation > 0 else None
    groups: dict[str, dict[str, list]] = {}
    for i, box in enumerate(boxes):
        side = int(box[2])
        if side <= 0:
            continue
        name, size = ("small", small_size) if side <= small_size else ("large", large_size)
        own = crop_resize(proposals, box, side, mode="nearest") == i + 1  # crop first: cost follows the nucleus
        if kernel is not None:
            import cv2

            own = cv2.dilate(own.astype(np.uint8), kernel) > 0
        crop = crop_resize(hwc, box, side) * own[..., None]
        inp = crop if side == size else crop_resize(crop, (0, 0, side), size)
        g = groups.setdefault(name, {"index": [], "input": [], "target": []})
        g["index"].append(i)
        g["input"].append(np.transpose(inp.reshape(size, size, c + 2), (2, 0, 1)))
        if gt is not None and matches is not None:
            m = int(matches[i])
            tgt = np.zeros((size, size), np.uint8) if m == 0 else (crop_resize(
                (crop_resize(gt, box, side, mode="nearest") == m).astype(np.float32), (0, 0, side), size) > 0.5
            ).astype(np.uint8)
            g["target"].append(tgt)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name, g in groups.items():
        out[name] = {"index": np.asarray(g["index"], np.int64), "input": np.stack(g["input"]).astype(np.float32)}
        if g["target"]:
            out[name]["target"] = np.stack(g["target"])
    return out


def assemble_refined(probs: Sequence[np.ndarray], boxes: np.ndarray, shape: tuple[int, int], threshold: float = 0.5,
                     min_size: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Paste refined patch probabilities (one ``S x S`` map per proposal, in ``boxes`` order) back into the image.

    A pixel goes to the proposal with the highest refined probability above ``threshold``; each proposal keeps its
    largest connected piece; objects under ``min_size`` px are dropped. Returns ``(label 1..N int32, scores)``, the
    score being an object's mean refined probability.
    """
    h, w = shape
    best = np.zeros((h, w), np.float32)
    label = np.zeros((h, w), np.int32)
    for i, (p, box) in enumerate(zip(probs, boxes)):
        if int(box[2]) <= 0:
            continue
        values, (rows, cols) = paste_back(np.asarray(p, np.float32), box, (h, w))
        win = (values > threshold) & (values > best[rows, cols])
        best[rows, cols][win] = values[win]
        label[rows, cols][win] = i + 1
    out = keep_largest_pieces(label, min_size=max(min_size, 1))
    scores = [float(best[sl][out[sl] == i + 1].mean()) for i, sl in enumerate(ndimage.find_objects(out))]
    return out, np.asarray(scores, np.float32)

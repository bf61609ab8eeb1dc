"""Overlapped-patch inference for dense models: sliding windows and a weighted vote (Cui et al. 2019).

Cui et al., "A deep learning algorithm for one-step contour aware nuclei segmentation of histopathology images"
(Sec. "Overlapped patch extraction and assembling"): a fully convolutional net sees less context near the border of
its input, so its predictions there are worse. The image is cut into overlapping patches (a sliding window with a
stride smaller than the patch), every patch is predicted, and each pixel's final value is the weighted average of the
predictions of all patches that cover it, with the weight ``W = alpha * De / (Dc + De)`` of the pixel's position in
the patch (``De``: distance to the patch border, ``Dc``: distance to the patch centre;
:func:`edge_weight_map`). A patch's contribution fades out towards its border, so the
assembled map has no seams, and it does not depend on where the windows happen to start.

:func:`tile_predict` works for any dense model (any ``fn`` mapping a batch of patches to per-pixel outputs), any
image size (images smaller than the patch run as one window; the last window of a row/column is aligned with the
image's end, so no padding is ever needed) and keeps the model's memory bounded by ``batch_size`` patches: only the
output accumulators (``C x H x W`` float32 and one ``H x W`` weight sum) grow with the image.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["TilingParams", "edge_weight_map", "patch_weight", "tile_positions", "tile_predict", "tile_windows"]

WEIGHTS = ("edge", "uniform")


@functools.lru_cache(maxsize=16)
def _edge_weight_cached(height: int, width: int) -> np.ndarray:
    y = np.arange(height, dtype=np.float64)[:, None] + 0.5  # pixel centres
    x = np.arange(width, dtype=np.float64)[None, :] + 0.5
    de = np.minimum(np.minimum(x, width - x), np.minimum(y, height - y))
    dc = np.sqrt((x - width / 2.0) ** 2 + (y - height / 2.0) ** 2)
    ratio = de / (dc + de)  # dc + de >= 0.5 > 0
    weight = (ratio / ratio.mean()).astype(np.float32)
    weight.setflags(write=False)
    return weight


def edge_weight_map(shape: tuple[int, int] | np.ndarray) -> np.ndarray:
    """Edge-distance loss weight of the nucleus-boundary model: ``W = alpha * De / (Dc + De)`` (float32).

    Cui et al. 2019 (Sec. "Loss function" / overlapped patch prediction): predictions near a patch border see less
    context, so the loss weights each pixel by how far it is from the patch border. ``De`` is the distance of the
    pixel centre to the nearest patch border, ``Dc`` its distance to the patch centre, and ``alpha`` normalises the
    mean weight to 1. The map depends only on the patch shape and is cached per shape; the returned array is
    read-only (copy it before modifying).

    Args:
        shape: ``(height, width)`` or an array whose first two dimensions give it.
    """
    if isinstance(shape, np.ndarray):
        shape = shape.shape[:2]
    h, w = (int(s) for s in shape)
    if h <= 0 or w <= 0:
        raise ValueError(f"edge_weight_map needs a positive shape, got {(h, w)}")
    return _edge_weight_cached(h, w)


def tile_positions(length: int, patch: int, stride: int) -> list[int]:
    """Start offsets of windows of size ``patch`` covering ``[0, length)`` with step ``stride``.

    Starts are ``0, stride, 2 * stride, ...``; the last window is moved back to end exactly at ``length`` (so every
    window lies inside the image). A side not longer than the patch gets the single start 0 (the window is then the
    whole side).
    """
    if patch <= 0 or stride <= 0:
        raise ValueError(f"patch and stride must be positive, got patch={patch}, stride={stride}")
    if stride > patch:
        raise ValueError(f"stride {stride} > patch {patch} would leave pixels no window covers")
    if length <= patch:
        return [0]
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def tile_windows(height: int, width: int, patch: int, stride: int) -> list[tuple[int, int, int, int]]:
    """``(top, left, patch_height, patch_width)`` of every window, row by row."""
    ph, pw = min(patch, height), min(patch, width)
    return [(y, x, ph, pw) for y in tile_positions(height, patch, stride) for x in tile_positions(width, patch, stride)]


def patch_weight(shape: tuple[int, int], weight: str | np.ndarray | torch.Tensor = "edge") -> torch.Tensor:
    """The per-pixel vote weight of a patch of ``shape`` (float32 tensor, positive everywhere).

    Args:
        weight: "edge" (Cui et al.'s ``alpha * De / (Dc + De)``, mean 1), "uniform" (ones) or an explicit
            ``H x W`` array of positive weights.
    """
    h, w = (int(s) for s in shape)
    if isinstance(weight, str):
        if weight == "edge":
            return torch.from_numpy(np.array(edge_weight_map((h, w)), dtype=np.float32))
        if weight == "uniform":
            return torch.ones((h, w), dtype=torch.float32)
        raise ValueError(f"unknown tile weight {weight!r}; use one of {WEIGHTS} or an array")
    t = torch.as_tensor(np.asarray(weight) if not isinstance(weight, torch.Tensor) else weight,
                        dtype=torch.float32)
    if tuple(t.shape) != (h, w):
        raise ValueError(f"tile weight has shape {tuple(t.shape)} but the patch is {h}x{w}")
    if not bool((t > 0).all()):
        raise ValueError("tile weights must be > 0 everywhere (a pixel covered by one patch needs a vote)")
    return t


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


@torch.no_grad()
def tile_predict(fn: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor | np.ndarray, patch: int,
                 stride: int | None = None, weight: str | np.ndarray | torch.Tensor = "edge", batch_size: int = 4,
                 progress: bool = False, desc: str = "tiles") -> torch.Tensor:
    """Predict a dense map of ``image`` patch by patch and assemble it by the weighted vote.

    Args:
        fn: maps a ``B x C x h x w`` float batch of patches (on the image's device) to ``B x K x h x w`` outputs
            (probabilities, logits, regressions: anything that averages meaningfully). It is called under
            ``torch.no_grad()``; it may return its outputs on any device.
        image: ``C x H x W`` tensor (or ``H x W x C`` numpy array, converted) of any size.
        patch: square patch side in pixels.
        stride: window step (default ``patch // 2``); ``stride == patch`` tiles without overlap.
        weight: "edge", "uniform" or an explicit ``patch x patch`` weight array (see :func:`patch_weight`).
        batch_size: patches per call of ``fn``.
        progress: show a tqdm bar over the batches.

    Returns:
        ``K x H x W`` float32 CPU tensor: per pixel, ``sum(w * out) / sum(w)`` over the patches covering it.
    """
    if isinstance(image, np.ndarray):
        if image.ndim != 3:
            raise ValueError(f"expected an H x W x C array, got shape {image.shape}")
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if image.dim() != 3:
        raise ValueError(f"expected a C x H x W image, got shape {tuple(image.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stride = int(stride) if stride else max(1, int(patch) // 2)
    _, height, width = image.shape
    windows = tile_windows(height, width, int(patch), stride)
    ph, pw = windows[0][2], windows[0][3]
    wgt = patch_weight((ph, pw), weight)
    acc: torch.Tensor | None = None
    wsum = torch.zeros((height, width), dtype=torch.float32)
    batches = list(_batches(windows, batch_size))
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    for batch in batches:
        x = torch.stack([image[:, y:y + ph, xx:xx + pw] for y, xx, _, _ in batch]).float()
        out = fn(x)
        if out.dim() != 4 or out.shape[0] != len(batch) or tuple(out.shape[-2:]) != (ph, pw):
            raise ValueError(f"tile_predict: fn returned shape {tuple(out.shape)} for a batch of shape "
                             f"{tuple(x.shape)}; it must return B x K x {ph} x {pw}")
        out = out.detach().to("cpu", torch.float32)
        if acc is None:
            acc = torch.zeros((out.shape[1], height, width), dtype=torch.float32)
        for k, (y, xx, _, _) in enumerate(batch):
            acc[:, y:y + ph, xx:xx + pw].addcmul_(out[k], wgt)
            wsum[y:y + ph, xx:xx + pw].add_(wgt)
    assert acc is not None
    acc.div_(wsum)
    return acc


@dataclass(frozen=True)
class TilingParams:
    """When and how a dense model tiles its inference (``MODEL.TILING``)."""

    enabled: bool = True
    patch: int = 256
    stride: int = 128
    weight: str = "edge"
    batch_size: int = 4
    progress: bool = False

    def __post_init__(self) -> None:
        if self.patch < 1 or not 1 <= self.stride <= self.patch:
            raise ValueError(f"MODEL.TILING: need PATCH_SIZE >= 1 and 1 <= STRIDE <= PATCH_SIZE, got "
                             f"PATCH_SIZE={self.patch}, STRIDE={self.stride}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"MODEL.TILING.WEIGHT must be one of {WEIGHTS}, got {self.weight!r}")
        if self.batch_size < 1:
            raise ValueError(f"MODEL.TILING.BATCH_SIZE must be >= 1, got {self.batch_size}")

    @classmethod
    def from_config(cls, cfg: Any) -> TilingParams:
        t = cfg.MODEL.TILING
        return cls(enabled=bool(t.ENABLED), patch=int(t.PATCH_SIZE), stride=int(t.STRIDE), weight=str(t.WEIGHT),
                   batch_size=int(t.BATCH_SIZE), progress=bool(t.PROGRESS))

    def applies_to(self, height: int, width: int) -> bool:
        """Tile only when enabled and the image exceeds the patch on a side."""
        return self.enabled and (height > self.patch or width > self.patch)

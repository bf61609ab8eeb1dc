"""BRP-Net proposals and the patch geometry of its proposal-wise refinement: pure numpy functions.

Chen et al., "Boundary-assisted Region Proposal Networks for Nucleus Segmentation", MICCAI 2020, Sec. 2.2-2.3:

* :func:`extract_proposals` — *boundary-assisted region proposals*: ``semantic - boundary`` probability, thresholded,
  connected components (the boundary prediction separates touching nuclei), each dilated back by a radius (the seeds
  lie inside the nucleus; the paper's Fig. 5a varies this radius). This is also "TAFE + post-processing".
  Optionally (not in the paper) seed components are split by a marker watershed of their distance transform first:
  where the predicted boundary is too faint to cut touching nuclei apart, one seed covers several nuclei, and the
  refinement, which returns one nucleus per proposal, cannot recover them (docs/time_to_accuracy.md).
* :func:`proposal_boxes` — a square crop around each proposal with a margin (12 px in the paper).
* :func:`crop_resize` / :func:`paste_back` — the crop resampled to ``S x S`` (the network input) and a patch
  prediction resampled back into the image, with one pixel-centre convention so the round trip is consistent.
* :func:`assign_proposal_labels` — training label of a proposal: the ground-truth nucleus it overlaps with IoU > tau,
  else all background.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage

from ...postprocess import distance_watershed, expand_labels, instance_scores, threshold_components

__all__ = ["assign_proposal_labels", "crop_resize", "extract_proposals", "paste_back", "proposal_boxes"]


def extract_proposals(semantic: np.ndarray, boundary: np.ndarray, threshold: float = 0.5, dilation: float = 2.0,
                      min_size: int = 0, connectivity: int = 1, split: bool = False,
                      split_sigma_factor: float = 0.25, split_min_distance: int = 0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Region proposals from the two TAFE probability maps.

    Args:
        semantic, boundary: ``H x W`` probabilities of nucleus and nucleus boundary.
        threshold: seeds are ``semantic - boundary > threshold``.
        dilation: radius (px, Euclidean) each seed component grows back by; neighbours never overlap.
        min_size: seeds of fewer pixels are dropped (noise).
        connectivity: 1 (4-neighbours) or 2 (8-neighbours) for the components.
        split: split each seed component by a marker watershed of its Euclidean distance transform
            (:func:`nuclei_d2.postprocess.distance_watershed` with ``split_sigma_factor`` and ``split_min_distance``:
            the transform smoothed by ``split_sigma_factor`` x the mean seed radius, markers at least
            ``split_min_distance`` px apart, ``0``: half the mean seed radius) before growing the seeds back.

    Returns:
        ``(label, scores)``: int32 proposal label map 1..N and each proposal's mean ``semantic`` probability.
    """
    semantic, boundary = np.asarray(semantic, np.float32), np.asarray(boundary, np.float32)
    if semantic.ndim != 2 or semantic.shape != boundary.shape:
        raise ValueError(f"semantic and boundary must be H x W maps of one shape, got {semantic.shape} and "
                         f"{boundary.shape}")
    if dilation < 0:
        raise ValueError(f"the proposal dilation radius must be >= 0 px, got {dilation}")
    seeds = threshold_components(semantic - boundary, threshold, connectivity, min_size)
    if split and seeds.any():
        mask = seeds > 0
        edt = ndimage.distance_transform_edt(mask).astype(np.float32)
        seeds = distance_watershed(mask.astype(np.float32), edt, threshold=0.5, sigma_factor=split_sigma_factor,
                                   min_distance=split_min_distance, peak_threshold=0.0, min_size=min_size,
                                   fill=False, connectivity=connectivity)
    label = expand_labels(seeds, dilation) if dilation > 0 else seeds
    return label, instance_scores(label, semantic)


def proposal_boxes(label: np.ndarray, margin: int = 12) -> np.ndarray:
    """Square crop ``[y0, x0, side]`` (int64, one row per label 1..N) around each proposal of a 1..N label map.

    The square is centred on the proposal's bounding box, its side the longer box side plus ``2 * margin``; it may
    extend beyond the image (cropping pads with zeros). Absent labels get side 0.
    """
    label = np.asarray(label)
    n = int(label.max()) if label.size else 0
    out = np.zeros((n, 3), dtype=np.int64)
    for i, sl in enumerate(ndimage.find_objects(label, max_label=n)):
        if sl is None:
            continue
        h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
        side = max(h, w) + 2 * int(margin)
        y0 = sl[0].start - (side - h) // 2
        x0 = sl[1].start - (side - w) // 2
        out[i] = (y0, x0, side)
    return out


def _padded_crop(arr: np.ndarray, y0: int, x0: int, side: int) -> np.ndarray:
    """``arr[y0:y0+side, x0:x0+side]`` (2-D or H x W x C) with zeros where the square leaves the image."""
    h, w = arr.shape[:2]
    out = np.zeros((side, side) + arr.shape[2:], dtype=arr.dtype)
    ya, yb, xa, xb = max(y0, 0), min(y0 + side, h), max(x0, 0), min(x0 + side, w)
    if ya < yb and xa < xb:
        out[ya - y0:yb - y0, xa - x0:xb - x0] = arr[ya:yb, xa:xb]
    return out


def _interp(mode: str) -> int:
    modes = {"bilinear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST_EXACT}
    if mode not in modes:
        raise ValueError(f"interpolation must be one of {sorted(modes)}, got {mode!r}")
    return modes[mode]


def crop_resize(arr: np.ndarray, box: np.ndarray | tuple[int, int, int], size: int, mode: str = "bilinear"
                ) -> np.ndarray:
    """The square ``box`` (``y0, x0, side``) of ``arr`` (``H x W`` or ``H x W x C``), resampled to ``size x size``.

    Pixel centres map linearly (OpenCV's half-pixel convention), as in :func:`paste_back`.
    """
    y0, x0, side = (int(v) for v in box)
    if side <= 0 or size <= 0:
        raise ValueError(f"crop side and output size must be positive, got side {side}, size {size}")
    crop = _padded_crop(np.asarray(arr), y0, x0, side)
    if side == size:
        return crop
    src = crop.astype(np.float32) if mode == "bilinear" and crop.dtype == bool else crop
    if src.dtype == bool:
        src = src.astype(np.uint8)
    out = cv2.resize(src, (size, size), interpolation=_interp(mode))
    return out.astype(crop.dtype) if crop.dtype == bool else out


def paste_back(patch: np.ndarray, box: np.ndarray | tuple[int, int, int], shape: tuple[int, int],
               mode: str = "bilinear") -> tuple[np.ndarray, tuple[slice, slice]]:
    """Resample an ``S x S`` patch prediction back to its ``box`` and clip it to an image of ``shape``.

    Returns:
        ``(values, (rows, cols))``: the part of the resampled patch inside the image and the image slices it covers,
        so ``image[rows, cols] = values`` (or any merge) puts it back.
    """
    y0, x0, side = (int(v) for v in box)
    patch = np.asarray(patch)
    src = patch.astype(np.float32) if patch.dtype == bool else patch
    full = src if patch.shape[0] == side else cv2.resize(src, (side, side), interpolation=_interp(mode))
    h, w = shape
    ya, yb, xa, xb = max(y0, 0), min(y0 + side, h), max(x0, 0), min(x0 + side, w)
    ya, xa = min(ya, yb), min(xa, xb)
    return full[ya - y0:yb - y0, xa - x0:xb - x0], (slice(ya, yb), slice(xa, xb))


def assign_proposal_labels(proposals: np.ndarray, gt: np.ndarray, tau: float = 0.5) -> np.ndarray:
    """For each proposal 1..N, the ground-truth label it matches with IoU > ``tau`` (0 = none: all background).

    A proposal overlapping several nuclei takes the one of highest IoU; ``tau >= 0.5`` makes the match unique.
    """
    proposals, gt = np.asarray(proposals), np.asarray(gt)
    if proposals.shape != gt.shape:
        raise ValueError(f"proposal map {proposals.shape} and ground truth {gt.shape} differ in shape")
    n = int(proposals.max()) if proposals.size else 0
    out = np.zeros(n, dtype=np.int64)
    if n == 0 or not gt.any():
        return out
    both = (proposals > 0) & (gt > 0)
    p_area = np.bincount(proposals.ravel(), minlength=n + 1).astype(np.int64)
    g_vals, g_inv = np.unique(gt.ravel(), return_inverse=True)
    g_area = np.bincount(g_inv).astype(np.int64)
    pairs = proposals[both].astype(np.int64) * (len(g_vals) + 1) + g_inv.reshape(gt.shape)[both]
    keys, inter = np.unique(pairs, return_counts=True)
    pi, gi = keys // (len(g_vals) + 1), keys % (len(g_vals) + 1)
    iou = inter / (p_area[pi] + g_area[gi] - inter)
    best = np.zeros(n + 1)
    for p, g, v in zip(pi, gi, iou):
        if v > tau and v > best[p]:
            best[p] = v
            out[p - 1] = int(g_vals[g])
    return out

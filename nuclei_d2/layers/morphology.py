"""Morphology on label maps and masks shared by targets, post-processing, models and synthetic data."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["disk", "keep_largest_pieces"]


def disk(radius: float) -> np.ndarray:
    """Boolean disk of every pixel offset at Euclidean distance <= ``radius`` (a structuring element; cv2 wants
    ``.astype(np.uint8)``). The ``1e-9`` keeps integer and half radii exact under floating-point rounding."""
    r = int(np.floor(radius + 1e-9))
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    return (yy * yy + xx * xx) <= radius * radius + 1e-9


def keep_largest_pieces(label: np.ndarray, min_size: int = 1) -> np.ndarray:
    """Each object of ``label`` keeps only its largest 4-connected piece (ties: the first in raster order); objects
    then smaller than ``min_size`` px are dropped; the rest are numbered 1..N in the order of their old ids.

    Occlusion (synthetic tiles) or a pixel vote between overlapping objects (BRP-Net's refinement) can split an
    object or leave a sliver of it; a nucleus is one piece. Returns a new array of ``label``'s dtype.
    """
    out = np.zeros_like(label)
    n = 0
    for i, sl in enumerate(ndimage.find_objects(label)):
        if sl is None:
            continue
        obj = label[sl] == i + 1
        pieces, k = ndimage.label(obj)
        if k > 1:
            obj = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
        if obj.sum() < min_size:
            continue
        n += 1
        out[sl][obj] = n
    return out

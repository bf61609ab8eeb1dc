"""Overlays of nuclei outlines on the image (what a pathologist looks at first)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from ..utils.io import atomic_write

__all__ = ["draw_outlines", "save_overlay"]

PRED_COLOUR = (0, 255, 0)  # green: predictions
GT_COLOUR = (255, 255, 0)  # yellow: ground truth


def draw_outlines(image: np.ndarray, label: np.ndarray, colour: tuple[int, int, int] = PRED_COLOUR) -> np.ndarray:
    """Copy of ``image`` (H x W x 3 uint8) with the inner outline of every nucleus of ``label`` drawn in ``colour``."""
    out = np.array(image, dtype=np.uint8, copy=True)
    out[find_boundaries(label, mode="inner")] = colour
    return out


def save_overlay(path: str | os.PathLike, image: np.ndarray, pred_label: np.ndarray,
                 gt_label: np.ndarray | None = None) -> Path:
    """Write a PNG: prediction outlines on the image, and beside it the ground truth's outlines when given."""
    from PIL import Image

    panel = draw_outlines(image, pred_label, PRED_COLOUR)
    if gt_label is not None:
        gap = np.full((image.shape[0], 4, 3), 255, np.uint8)
        panel = np.concatenate([panel, gap, draw_outlines(image, gt_label, GT_COLOUR)], axis=1)
    return atomic_write(path, lambda tmp: Image.fromarray(panel).save(tmp, format="PNG"))

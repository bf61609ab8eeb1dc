"""Choosing the stain-normalisation reference image by a histogram criterion.

Mahbod et al. 2019 ("A two-stage U-Net algorithm for segmentation of nuclei in H&E-stained tissues", ECDP 2019,
Sec. 2.1) normalise every image with Macenko's method to one reference image of the training set that they pick by
comparing colour histograms. We could not obtain the exact formula, so :func:`choose_reference` implements **our
reading** of it, the most "typical" image of the set:

1. for every image, the normalised 256-bin histogram of each RGB channel (all pixels; ``tissue_only=True`` drops the
   near-white background first, so slides with much empty glass do not look alike just for that);
2. the mean histogram of the set, per channel;
3. the reference is the image whose histograms are closest to the mean ones: the smallest sum over the three channels
   of the chi-square distance ``0.5 * sum((h - m)^2 / (h + m))`` (``metric="l1"``: sum of absolute differences).

An image near the centre of the set's colour distribution needs the smallest colour changes to bring the others to
it, which is the point of a reference. ``method="medoid"`` uses the smallest summed distance to every other image
instead of the distance to the mean (quadratic in the number of images; equivalent in spirit).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..utils.io import read_image_rgb

__all__ = ["ReferenceChoice", "choose_reference", "rgb_histograms"]


@dataclass(frozen=True)
class ReferenceChoice:
    """Index of the chosen image, its name (path, if paths were given) and every image's distance score."""

    index: int
    name: str
    scores: np.ndarray


def rgb_histograms(image: np.ndarray, tissue_only: bool = False, white: int = 220) -> np.ndarray:
    """3 x 256 per-channel normalised histograms of a uint8 RGB image.

    Args:
        tissue_only: ignore pixels brighter than ``white`` in every channel (background glass).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got shape {image.shape} and dtype {image.dtype}")
    px = image[:, :, :3].reshape(-1, 3)
    if tissue_only:
        px = px[~(px > white).all(axis=1)]
    hist = np.zeros((3, 256), dtype=np.float64)
    if px.shape[0] == 0:
        return hist
    for c in range(3):
        hist[c] = np.bincount(px[:, c], minlength=256) / px.shape[0]
    return hist


def _distance(a: np.ndarray, b: np.ndarray, metric: str) -> float:
    if metric == "l1":
        return float(np.abs(a - b).sum())
    s = a + b
    nz = s > 0
    return float(0.5 * (((a - b) ** 2)[nz] / s[nz]).sum())


def choose_reference(images: Sequence[np.ndarray | str | os.PathLike], method: str = "mean",
                     metric: str = "chi2", tissue_only: bool = False, progress: bool = True) -> ReferenceChoice:
    """Pick the reference image for stain normalisation by the histogram rule described in the module docstring.

    Args:
        images: uint8 RGB arrays or image paths (read with :func:`~nuclei_d2.utils.io.read_image_rgb`).
        method: ``"mean"`` (closest to the set's mean histogram) or ``"medoid"`` (smallest summed distance to the
            other images).
        metric: ``"chi2"`` or ``"l1"``.
        tissue_only: ignore near-white background pixels in the histograms.
        progress: show a tqdm progress bar while reading the images.
    """
    if method not in ("mean", "medoid"):
        raise ValueError(f"method must be 'mean' or 'medoid', got {method!r}")
    if metric not in ("chi2", "l1"):
        raise ValueError(f"metric must be 'chi2' or 'l1', got {metric!r}")
    if len(images) == 0:
        raise ValueError("choose_reference needs at least one image")
    names: list[str] = []
    hists = []
    for i, item in enumerate(tqdm(images, desc="histograms", disable=not progress or len(images) < 2)):
        if isinstance(item, (str, os.PathLike)):
            names.append(str(item))
            arr = read_image_rgb(item)
        else:
            names.append(f"image {i}")
            arr = item
        hists.append(rgb_histograms(arr, tissue_only=tissue_only))
    h = np.stack(hists)  # N x 3 x 256
    if method == "mean":
        mean = h.mean(axis=0)
        scores = np.array([_distance(h[i], mean, metric) for i in range(len(h))])
    else:
        d = np.array([[_distance(h[i], h[j], metric) if i != j else 0.0 for j in range(len(h))]
                      for i in range(len(h))])
        scores = d.sum(axis=1)
    best = int(np.argmin(scores))  # ties: the first image
    return ReferenceChoice(best, names[best], scores)

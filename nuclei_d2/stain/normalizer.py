"""Macenko and Vahadane stain normalisation: fit once on a reference, apply fast, save as JSON.

Both methods model an H&E image as ``OD = C @ S`` (see :mod:`nuclei_d2.stain.deconvolution`) and differ in how they
estimate the 2x3 stain matrix ``S`` of an image:

* **Macenko** et al., "A method for normalizing histology slides for quantitative analysis", ISBI 2009: drop
  near-transparent pixels (OD norm below ``beta``; see :func:`_tissue_od` for why not per channel), take the plane
  of the two leading eigenvectors of the OD covariance, and use the robust extreme angles (``alpha``-th and
  ``100 - alpha``-th percentiles) of the pixels in that plane as the two stain directions.
* **Vahadane** et al., "Structure-preserving color normalization and sparse stain separation for histological
  images", IEEE TMI 35(8), 2016: a sparse non-negative dictionary of two atoms learnt from the OD pixels
  (``spams.trainDL``, ``lambda1 = 0.1``, non-negative dictionary and codes).

Normalising an image (both methods): estimate the image's own ``S_src``, compute its concentrations by least squares
``C = OD @ pinv(S_src)``, rescale each stain so that its 99th percentile over tissue pixels matches the reference's
(``max_concentrations``), and rebuild the RGB image with the reference's ``S``. Concentrations are *not* clipped at 0
(as in Macenko's reference implementation): pixels outside the cone of the two stain vectors are common (2-7% of a
MoNuSeg tile for Macenko's vectors, 24-50% for Vahadane's, which sit inside the data cloud rather than at its edges),
and clipping them — what staintools' non-negative lasso amounts to — distorts colours: normalising each of the 30
MoNuSeg tiles to itself changed pixels by 3.8-10.8 grey levels on average (Vahadane) with clipping and by 1.5-2.7
without (Macenko: 1.8-9.1 vs 1.7-9.0). Vahadane's per-pixel lasso (``lambda = 0.01``) is likewise replaced by this
least-squares solve.

Why not call staintools or torchstain directly (both were measured, see docs/stain_and_targets.md): staintools takes
0.9-1.3 s (Macenko) / 1.8-2.3 s (Vahadane) to transform a 1000x1000 tile, its Vahadane is not deterministic
(``spams.trainDL`` with its default ``iter=-1`` learns for one second of wall time), it modifies its input array in
place, and it returns a black image for a grey tile; torchstain's numpy Macenko takes 0.2-0.4 s and raises
``LinAlgError`` on a white tile. This implementation estimates the stain matrix on a fixed, evenly strided subsample of
tissue pixels (deterministic; ``spams.trainDL`` single-threaded with a fixed iteration count for Vahadane), solves
concentrations with a 2x3 pseudo-inverse instead of a per-pixel lasso, and transforms a tile in 0.07-0.1 s (Macenko)
/ 0.13-0.18 s (Vahadane).

Edge cases (decided here, documented in the docs): an image without enough tissue (all white, tiny) or without two
distinguishable stains (grey, a single flat colour) cannot be fitted: :meth:`StainNormalizer.fit` raises
:class:`StainEstimationError` naming the problem; :meth:`StainNormalizer.transform` returns the image unchanged and
emits a :class:`StainNormalizationWarning` (``on_failure="raise"`` makes it raise instead). Passing such tiles through
is what one wants in training: random crops of background are common and there is nothing to normalise on them.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.io import read_image_rgb, read_json, write_json_atomic
from .deconvolution import _OD_LUT, _check_rgb

__all__ = [
    "StainEstimate",
    "StainEstimationError",
    "StainNormalizationWarning",
    "StainNormalizer",
    "estimate_stains",
]

METHODS = ("macenko", "vahadane")
JSON_FORMAT = "nuclei_d2.stain_normalizer"
JSON_VERSION = 1


class StainEstimationError(ValueError):
    """The stain matrix of an image cannot be estimated (too little tissue, or no two distinct stains)."""


class StainNormalizationWarning(UserWarning):
    """An image was passed through unnormalised because its stains could not be estimated."""


@dataclass(frozen=True)
class StainEstimate:
    """Stain matrix (2x3, unit rows, haematoxylin first) and 99th-percentile concentrations of one image."""

    stain_matrix: np.ndarray
    max_concentrations: np.ndarray
    n_pixels: int  # tissue pixels the estimate is based on


def _tissue_od(image: np.ndarray, beta: float, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """(OD of all pixels, N x 3 float32; OD of an evenly strided subsample of tissue pixels, <= max_pixels x 3).

    Tissue = OD vector norm >= beta. Macenko's reference code keeps pixels with OD >= beta in *every* channel instead,
    which drops lightly stained eosin-only tissue (eosin absorbs little red and blue) and pulls the eosin vector
    towards haematoxylin: on an image made from Ruifrok's vectors it missed eosin by 30 degrees, the norm rule by
    under 1 degree (tests/test_stain.py).
    """
    od = _OD_LUT[image.reshape(-1, 3)]
    tissue = od[np.einsum("ij,ij->i", od, od) >= np.float32(beta * beta)]
    if tissue.shape[0] > max_pixels:
        idx = np.linspace(0, tissue.shape[0] - 1, max_pixels).astype(np.int64)
        tissue = tissue[idx]
    return od, tissue


def _order_and_check(stains: np.ndarray, min_angle: float) -> np.ndarray:
    s = np.clip(np.asarray(stains, dtype=np.float64), 0.0, None)  # OD stain vectors are non-negative
    norms = np.linalg.norm(s, axis=1, keepdims=True)
    if np.any(norms < 1e-8):
        raise StainEstimationError("a stain vector came out zero")
    s = s / norms
    if s[0, 0] < s[1, 0]:  # haematoxylin absorbs red more than eosin does: it goes first
        s = s[::-1]
    angle = np.degrees(np.arccos(np.clip(float(s[0] @ s[1]), -1.0, 1.0)))
    if angle < min_angle:
        raise StainEstimationError(f"the two stain vectors are only {angle:.2f} degrees apart (minimum "
                                   f"{min_angle}): the image shows no two distinct stains (grey or flat colour?)")
    return np.ascontiguousarray(s)


def _macenko_matrix(tissue: np.ndarray, alpha: float) -> np.ndarray:
    cov = np.cov(tissue.astype(np.float64), rowvar=False)
    evals, evecs = np.linalg.eigh(cov)
    if evals[-1] <= 1e-12 or evals[-2] / evals[-1] < 1e-6:
        raise StainEstimationError("optical densities span less than a plane (grey or flat-colour image)")
    plane = evecs[:, [2, 1]]
    plane[:, 0] *= np.sign(plane[:, 0].sum()) or 1.0  # point into the positive octant
    plane[:, 1] *= np.sign(plane[:, 1].sum()) or 1.0
    proj = tissue.astype(np.float64) @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha, 100.0 - alpha])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    return np.stack([v1, v2])


def _vahadane_matrix(tissue: np.ndarray, lambda1: float, iterations: int) -> np.ndarray:
    try:
        import spams
    except ImportError as e:  # pragma: no cover - spams-bin is a requirement
        raise ImportError("Vahadane stain normalisation needs the 'spams' package (pip install spams-bin)") from e
    x = np.asfortranarray(tissue.T.astype(np.float64))
    d = spams.trainDL(X=x, K=2, lambda1=lambda1, mode=2, modeD=0, posAlpha=True, posD=True, verbose=False,
                      numThreads=1, iter=iterations, batchsize=min(512, x.shape[1]))
    return np.asarray(d).T


def estimate_stains(image: np.ndarray, method: str = "macenko", beta: float = 0.15, alpha: float = 1.0,
                    lambda1: float = 0.1, iterations: int = 200, min_pixels: int = 100, max_pixels: int = 100_000,
                    min_angle: float = 1.0) -> StainEstimate:
    """Estimate the stain matrix and the 99th-percentile concentrations of an H&E image.

    Args:
        image: ``H x W x 3`` uint8 RGB.
        method: ``"macenko"`` or ``"vahadane"``.
        beta: OD-norm threshold below which a pixel counts as background/transparent (Macenko's beta: 0.15).
        alpha: Macenko's robust-extreme percentile (1 = 1st and 99th percentile angles).
        lambda1: Vahadane's sparsity regulariser of the dictionary learning.
        iterations: Vahadane's dictionary-learning iterations (fixed, so the result is deterministic).
        min_pixels: fewer tissue pixels than this -> :class:`StainEstimationError`.
        max_pixels: the estimate uses at most this many tissue pixels (evenly strided, deterministic).
        min_angle: stain vectors closer than this many degrees are "one stain" -> :class:`StainEstimationError`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown stain normalisation method {method!r}; use one of {METHODS}")
    image = _check_rgb(image)
    _, tissue = _tissue_od(image, beta, max_pixels)
    if tissue.shape[0] < min_pixels:
        raise StainEstimationError(f"only {tissue.shape[0]} tissue pixels (OD norm >= {beta}) in a "
                                   f"{image.shape[0]}x{image.shape[1]} image; need at least {min_pixels} "
                                   "(white/empty or tiny image?)")
    raw = _macenko_matrix(tissue, alpha) if method == "macenko" else _vahadane_matrix(tissue, lambda1, iterations)
    stains = _order_and_check(raw, min_angle)
    conc = tissue @ np.linalg.pinv(stains).astype(np.float32)
    max_c = np.percentile(conc, 99, axis=0).astype(np.float64)
    if np.any(max_c <= 1e-6):
        raise StainEstimationError(f"a stain is absent from the image (99th-percentile concentrations {max_c})")
    return StainEstimate(stains, max_c, int(tissue.shape[0]))


class StainNormalizer:
    """Stain normaliser: ``fit(reference)`` once, then ``transform(image)`` any number of images.

    Picklable (plain numpy attributes) and savable: :meth:`save` writes the fitted stain matrix and maximum
    concentrations to JSON, :meth:`load` reads them back, so a reference fitted once can be reused by path (e.g.
    ``INPUT.NUCLEI.STAIN_REFERENCE``).

    Example::

        norm = StainNormalizer("macenko").fit(read_image_rgb("reference.tif"))
        norm.save("reference_macenko.json")
        out = StainNormalizer.load("reference_macenko.json").transform(image)
    """

    def __init__(self, method: str = "macenko", beta: float = 0.15, alpha: float = 1.0, lambda1: float = 0.1,
                 iterations: int = 200, min_pixels: int = 100, max_pixels: int = 100_000, min_angle: float = 1.0,
                 on_failure: str = "passthrough"):
        """
        Args:
            method: ``"macenko"`` or ``"vahadane"``.
            on_failure: what :meth:`transform` does with an image whose stains cannot be estimated:
                ``"passthrough"`` (return it unchanged with a :class:`StainNormalizationWarning`) or ``"raise"``.
            others: see :func:`estimate_stains`.
        """
        method = method.lower()
        if method not in METHODS:
            raise ValueError(f"unknown stain normalisation method {method!r}; use one of {METHODS}")
        if on_failure not in ("passthrough", "raise"):
            raise ValueError(f"on_failure must be 'passthrough' or 'raise', got {on_failure!r}")
        self.method = method
        self.params = dict(beta=beta, alpha=alpha, lambda1=lambda1, iterations=iterations, min_pixels=min_pixels,
                           max_pixels=max_pixels, min_angle=min_angle)
        self.on_failure = on_failure
        self.stain_matrix: np.ndarray | None = None
        self.max_concentrations: np.ndarray | None = None
        self.reference: str = ""

    # ---- fitting ---------------------------------------------------------------------------------------------
    @property
    def is_fitted(self) -> bool:
        return self.stain_matrix is not None

    def estimate(self, image: np.ndarray) -> StainEstimate:
        """The stain estimate of ``image`` with this normaliser's method and parameters."""
        return estimate_stains(image, self.method, **self.params)

    def fit(self, reference: np.ndarray | str | os.PathLike, name: str = "") -> StainNormalizer:
        """Fit to a reference image (array or file path). Raises :class:`StainEstimationError` if it has no stains."""
        if isinstance(reference, (str, os.PathLike)):
            name = name or str(reference)
            reference = read_image_rgb(reference)
        try:
            est = self.estimate(reference)
        except StainEstimationError as e:
            raise StainEstimationError(f"{name or 'reference image'}: cannot fit a {self.method} stain "
                                       f"normaliser: {e}") from e
        self.stain_matrix = est.stain_matrix
        self.max_concentrations = est.max_concentrations
        self.reference = name
        return self

    # ---- applying --------------------------------------------------------------------------------------------
    def transform(self, image: np.ndarray, source: StainEstimate | None = None) -> np.ndarray:
        """Normalise a uint8 RGB image to the reference's stain appearance (returns a new uint8 array).

        Args:
            source: the image's own stain estimate if already computed (:meth:`estimate`); estimated otherwise.
        """
        if not self.is_fitted:
            raise RuntimeError("StainNormalizer.transform called before fit() or load()")
        rgb = _check_rgb(image)
        if source is None:
            try:
                source = self.estimate(rgb)
            except StainEstimationError as e:
                if self.on_failure == "raise":
                    raise
                warnings.warn(f"stain normalisation skipped, image passed through unchanged: {e}",
                              StainNormalizationWarning, stacklevel=2)
                return np.array(rgb, copy=True)
        return self.apply(rgb, source)

    def apply(self, image: np.ndarray, source: StainEstimate) -> np.ndarray:
        """Rebuild ``image`` with the reference stains, given the image's own stain estimate ``source``."""
        rgb = _check_rgb(image)
        od = _OD_LUT[rgb.reshape(-1, 3)]
        # Concentrations in the source's stain basis, rescaled per stain to the reference's range, mixed with the
        # reference stains: a linear map of the OD, folded into one 3x3 matrix for speed.
        scale = (self.max_concentrations / source.max_concentrations).astype(np.float64)
        mix = (np.linalg.pinv(source.stain_matrix) * scale[None, :]) @ self.stain_matrix
        out_od = od @ mix.astype(np.float32)
        out = np.power(np.float32(10.0), -out_od, out=out_od)
        out *= np.float32(256.0)
        out -= np.float32(1.0)
        np.clip(out, 0, 255, out=out)
        return np.rint(out).astype(np.uint8).reshape(rgb.shape)

    __call__ = transform

    # ---- persistence -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        if not self.is_fitted:
            raise RuntimeError("cannot serialise an unfitted StainNormalizer")
        return {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "method": self.method,
            "stain_matrix": np.asarray(self.stain_matrix).tolist(),
            "max_concentrations": np.asarray(self.max_concentrations).tolist(),
            "params": dict(self.params),
            "on_failure": self.on_failure,
            "reference": self.reference,
            "od": "-log10((I + 1) / 256), rows: haematoxylin, eosin",
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> StainNormalizer:
        if data.get("format") != JSON_FORMAT:
            raise ValueError(f"{source}: not a nuclei_d2 stain normaliser file (format={data.get('format')!r})")
        if int(data.get("version", 0)) > JSON_VERSION:
            raise ValueError(f"{source}: stain normaliser file version {data['version']} is newer than this "
                             f"nuclei_d2 understands ({JSON_VERSION})")
        try:
            norm = cls(data["method"], on_failure=data.get("on_failure", "passthrough"), **data.get("params", {}))
            s = np.asarray(data["stain_matrix"], dtype=np.float64)
            c = np.asarray(data["max_concentrations"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{source}: malformed stain normaliser file ({type(e).__name__}: {e})") from e
        if s.shape != (2, 3) or c.shape != (2,) or not np.all(np.isfinite(s)) or not np.all(c > 0):
            raise ValueError(f"{source}: stain_matrix must be 2x3 and max_concentrations 2 positive numbers, got "
                             f"shapes {s.shape} and {c.shape}")
        norm.stain_matrix, norm.max_concentrations = s, c
        norm.reference = data.get("reference", "")
        return norm

    def save(self, path: str | os.PathLike) -> Path:
        """Write the fitted normaliser as JSON (atomically)."""
        return write_json_atomic(path, self.to_dict(), indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StainNormalizer:
        """Read a normaliser written by :meth:`save`."""
        return cls.from_dict(read_json(path, "stain normaliser file"), source=str(path))

    @classmethod
    def from_reference(cls, reference: str | os.PathLike | np.ndarray, method: str = "macenko",
                       **kwargs: Any) -> StainNormalizer:
        """A fitted normaliser from a saved JSON (``*.json``: loaded as is) or a reference image (fitted).

        When a JSON is given, ``method`` must match the one it was fitted with.
        """
        if isinstance(reference, (str, os.PathLike)) and str(reference).lower().endswith(".json"):
            norm = cls.load(reference)
            if norm.method != method.lower():
                raise ValueError(f"{reference}: fitted with {norm.method!r} but {method!r} was asked for")
            return norm
        return cls(method, **kwargs).fit(reference)

    def __repr__(self) -> str:
        state = f"fitted to {self.reference or 'an array'}" if self.is_fitted else "not fitted"
        return f"StainNormalizer(method={self.method!r}, {state})"

"""Optical density and colour deconvolution (Ruifrok & Johnston 2001): the haematoxylin input channel.

Brightfield images obey Beer-Lambert: each channel's optical density ``OD = -log10(I / I0)`` is a linear mix of the
stains' densities, ``OD = C @ S`` with ``S`` the stain matrix (one unit row vector per stain) and ``C`` the
per-pixel concentrations. Colour deconvolution inverts that mix with a fixed matrix. Ruifrok & Johnston,
"Quantification of histochemical staining by color deconvolution", Anal. Quant. Cytol. Histol. 23(4), 2001, give the
H&E vectors used here (haematoxylin ``(0.650, 0.704, 0.286)``, eosin ``(0.072, 0.990, 0.105)``, the same numbers as
``skimage.color.rgb2hed``); for a two-stain image they complete the 3x3 matrix with the unit cross product of the two
(a "residual" channel), which we do by default.

OD convention used throughout ``nuclei_d2.stain``: ``OD = -log10((I + 1) / 256)`` for uint8 ``I``. The ``+1`` keeps
black pixels finite (OD at most ``log10(256) = 2.41``) and makes white (255) exactly 0; ``od_to_rgb`` is its exact
inverse. It is computed through a 256-entry lookup table, so a 1000x1000 tile converts in a few milliseconds.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "OD_MAX",
    "RUIFROK_HE",
    "HEMATOXYLIN_SCALE",
    "color_deconvolution",
    "complete_stain_matrix",
    "hematoxylin_channel",
    "od_to_rgb",
    "rgb_to_od",
]

#: Ruifrok & Johnston's H&E optical-density vectors (rows: haematoxylin, eosin), unit-normalised.
RUIFROK_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]], dtype=np.float64)
RUIFROK_HE = RUIFROK_HE / np.linalg.norm(RUIFROK_HE, axis=1, keepdims=True)

#: Largest OD a uint8 pixel can have under our convention (a black pixel).
OD_MAX = float(np.log10(256.0))

#: Haematoxylin concentration (OD units) mapped to 1.0 by :func:`hematoxylin_channel` with ``normalize="fixed"``.
#: Chosen from the 30 MoNuSeg 2018 training tiles: the 99.9th percentile of the Ruifrok haematoxylin concentration
#: there is 0.65-1.74 per tile (median 1.42), so 2.0 leaves essentially every real pixel unsaturated while using
#: most of [0, 1] (see docs/stain_and_targets.md).
HEMATOXYLIN_SCALE = 2.0

_OD_LUT = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)


def _check_rgb(image: np.ndarray, what: str = "image") -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"{what} must be H x W x 3 RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 RGB (0-255), got dtype {image.dtype}")
    return image[:, :, :3]


def rgb_to_od(image: np.ndarray) -> np.ndarray:
    """``H x W x 3`` uint8 RGB -> float32 optical density ``-log10((I + 1) / 256)`` (0 for white)."""
    return _OD_LUT[_check_rgb(image)]


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    """Inverse of :func:`rgb_to_od`: ``256 * 10^-OD - 1``, rounded and clipped to uint8."""
    od = np.asarray(od, dtype=np.float32)
    rgb = np.power(np.float32(10.0), -od) * np.float32(256.0) - np.float32(1.0)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def complete_stain_matrix(stains: np.ndarray) -> np.ndarray:
    """3x3 unit-row stain matrix from 2 (completed by the unit cross product, Ruifrok's residual) or 3 rows."""
    s = np.asarray(stains, dtype=np.float64)
    if s.shape not in ((2, 3), (3, 3)):
        raise ValueError(f"a stain matrix has 2 or 3 rows of 3 OD values, got shape {s.shape}")
    norms = np.linalg.norm(s, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError("a stain vector is zero")
    s = s / norms
    if s.shape[0] == 2:
        r = np.cross(s[0], s[1])
        n = np.linalg.norm(r)
        if n < 1e-6:
            raise ValueError("the two stain vectors are parallel: cannot deconvolve")
        s = np.vstack([s, r / n])
    if abs(np.linalg.det(s)) < 1e-6:
        raise ValueError("the stain vectors are linearly dependent: cannot deconvolve")
    return s


def color_deconvolution(image: np.ndarray, stains: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel stain concentrations ``C`` (H x W x 3 float32, OD units) with ``OD = C @ stain_matrix``.

    Args:
        image: uint8 RGB.
        stains: 2x3 or 3x3 stain matrix (rows = stains); default Ruifrok & Johnston's H&E plus residual. Channel 0 is
            haematoxylin, 1 eosin, 2 the residual (or the third stain given). Negative concentrations are kept (they
            measure how far a colour is from the stain model); clip them if you need amounts.
    """
    m = complete_stain_matrix(RUIFROK_HE if stains is None else stains)
    od = rgb_to_od(image)
    inv = np.linalg.inv(m).astype(np.float32)
    return (od.reshape(-1, 3) @ inv).reshape(od.shape)


def hematoxylin_channel(image: np.ndarray, stains: np.ndarray | None = None, normalize: str = "fixed",
                        scale: float = HEMATOXYLIN_SCALE, dtype: type = np.float32) -> np.ndarray:
    """Haematoxylin intensity of an H&E image, in [0, 1] (float32) or 0..255 (uint8): the nuclear stain.

    Haematoxylin binds nuclear chromatin, so this single channel is a strong nucleus cue; Mask R-CNN+ and other
    methods feed it to the network next to RGB.

    Args:
        image: ``H x W x 3`` uint8 RGB.
        stains: stain matrix (default Ruifrok & Johnston H&E); e.g. pass a fitted
            :class:`~nuclei_d2.stain.StainNormalizer`'s ``stain_matrix`` to use image-specific vectors.
        normalize: ``"fixed"``: ``clip(H / scale, 0, 1)`` — the same mapping for every image, so intensities are
            comparable between images (default; ``scale`` in OD units, see :data:`HEMATOXYLIN_SCALE`);
            ``"percentile"``: ``clip(H / p99.9(H), 0, 1)`` per image — a contrast stretch that adapts to staining
            strength but amplifies noise on tiles without nuclei.
        dtype: ``np.float32`` (0..1) or ``np.uint8`` (0..255).
    """
    if normalize not in ("fixed", "percentile"):
        raise ValueError(f"normalize must be 'fixed' or 'percentile', got {normalize!r}")
    h = color_deconvolution(image, stains)[:, :, 0]
    np.maximum(h, 0, out=h)
    if normalize == "fixed":
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        denom = float(scale)
    else:
        denom = float(np.percentile(h, 99.9)) if h.size else 0.0
        if denom <= 1e-6:  # no haematoxylin at all (white/empty tile)
            denom = float(scale)
    h = np.minimum(h * np.float32(1.0 / denom), np.float32(1.0))
    if np.dtype(dtype) == np.uint8:
        return np.rint(h * 255.0).astype(np.uint8)
    if np.dtype(dtype) != np.float32:
        raise ValueError(f"dtype must be np.float32 or np.uint8, got {dtype}")
    return h.astype(np.float32, copy=False)

"""Test-time appearance shifts: the slides users have, made from the Kumar tiles (issue 24, robustness).

A model trained on 16 Kumar tiles meets other labs, scanners and preparations. Each shift here re-creates one such
difference on an ``H x W x 3`` uint8 RGB tile, deterministically and without moving anything (shape, geometry and
ground truth unchanged), so a model can be scored on ``kumar_test`` under it (``benchmarks/robustness.py``,
``docs/robustness.md``). A shift is named ``kind:strength``; :func:`parse_shift` reads the name, :data:`SHIFT_KINDS`
lists the kinds:

* ``hematoxylin:<s>`` / ``eosin:<s>``: the stain's concentration times ``s`` (colour deconvolution with Ruifrok &
  Johnston's H&E matrix, the image recomposed by Beer-Lambert): lighter (``0.6``) or heavier (``1.5``) staining.
  Exactly the HED-jitter training augmentation (``INPUT.NUCLEI.HED_JITTER``) with ``alpha = s`` for that stain and
  ``beta = 0``, so ``HED_JITTER.ALPHA 0.5`` covers both 0.6 and 1.5.
* ``scanner:<profile>``: another scanner's colour rendering (:data:`SCANNER_PROFILES`). **Synthetic approximations
  chosen by us** (a per-channel gamma, a 3x3 colour matrix and a white point each), meant to be about as far apart as
  scanners are; they are not measured ICC profiles of any vendor's device.
* ``blur:<sigma>``: Gaussian blur of ``sigma`` pixels (an out-of-focus scan); the ``INPUT.NUCLEI.BLUR`` transform.
* ``jpeg:<quality>``: JPEG compression at ``quality`` (1-100; whole-slide images are often stored as JPEG tiles).
* ``lowmag:<factor>``: downsampled by ``factor`` (area interpolation), then back to the original size (bilinear): a
  20x scan (``factor`` 2) resampled to the 40x pixel size the model was trained at; nuclei keep their size in pixels
  but lose detail.
* ``noise:<sigma>``: additive Gaussian noise of ``sigma`` grey levels (fixed seed); the ``INPUT.NUCLEI.NOISE``
  transform.
* ``none``: the image unchanged (the reference row).

In the nuclei mapper, ``INPUT.TEST_SHIFT`` applies one shift at inference, before stain normalisation and before the
extra input channels are computed, so inference-time normalisation can undo a colour shift and the haematoxylin
channel sees the shifted image (:func:`nuclei_d2.data.augment.build_nuclei_augmentation`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from .augment import GaussianBlurTransform, GaussianNoiseTransform, HEDJitterTransform, _PhotometricTransform

__all__ = [
    "SCANNER_PROFILES",
    "SHIFT_KINDS",
    "STRONG_SHIFTS",
    "ScannerProfile",
    "Shift",
    "ShiftKind",
    "ShiftTransform",
    "apply_scanner_profile",
    "apply_shift",
    "blur",
    "jpeg",
    "lowmag",
    "noise",
    "parse_shift",
    "scale_stain",
]


def _check_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"a shift needs an H x W x 3 uint8 RGB image, got shape {image.shape} dtype {image.dtype}")
    return image


# ---------------------------------------------------------------------------------------------------------------
# The shifts (plain functions: uint8 H x W x 3 RGB in, a new array of the same shape and dtype out)
# ---------------------------------------------------------------------------------------------------------------


def scale_stain(image: np.ndarray, stain: int, factor: float) -> np.ndarray:
    """Multiply one stain's concentration (0 haematoxylin, 1 eosin) by ``factor``; the other stains unchanged."""
    image = _check_rgb(image)
    if factor == 1.0:
        return image.copy()
    alpha = np.ones(3, dtype=np.float32)
    alpha[stain] = factor
    return HEDJitterTransform(alpha, np.zeros(3, dtype=np.float32)).apply_image(image)


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of ``sigma`` pixels, mirrored borders (0 = unchanged)."""
    return GaussianBlurTransform(sigma).apply_image(_check_rgb(image)).copy()


def noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise of ``sigma`` grey levels, clipped; the same ``seed`` gives the same noise."""
    return GaussianNoiseTransform(sigma, seed).apply_image(_check_rgb(image)).copy()


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Encode as JPEG at ``quality`` (1-100, OpenCV's libjpeg, 4:2:0 chroma) and decode again."""
    image = _check_rgb(image)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ValueError(f"JPEG encoding failed for an image of shape {image.shape}")
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def lowmag(image: np.ndarray, factor: float) -> np.ndarray:
    """Downsample by ``factor`` (area), upsample back to the same size (bilinear): a lower-magnification scan
    resampled to the training pixel size. 1 = unchanged."""
    image = _check_rgb(image)
    if factor == 1.0:
        return image.copy()
    h, w = image.shape[:2]
    small = cv2.resize(image, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class ScannerProfile:
    """A synthetic scanner colour rendering: ``out = white * (M @ in**gamma)`` on RGB in [0, 1].

    ``gamma`` bends each channel's tone curve (> 1 darker mid-tones), the rows of ``matrix`` sum to 1 (grey stays
    grey; off-diagonal terms change saturation and hue) and ``white`` tints the glass background. Chosen by us to
    resemble the kind of difference between vendors; NOT a measured ICC profile.
    """

    gamma: tuple[float, float, float]
    matrix: tuple[tuple[float, float, float], tuple[float, float, float], tuple[float, float, float]]
    white: tuple[float, float, float]
    description: str


def _saturation(s: float) -> tuple[tuple[float, float, float], ...]:
    """3x3 matrix with rows summing to 1 scaling the chroma (distance from grey) by ``s``."""
    m = (1 - s) / 3 * np.ones((3, 3)) + s * np.eye(3)
    return tuple(tuple(float(v) for v in row) for row in m)  # type: ignore[return-value]


#: Named synthetic scanner renderings (see :class:`ScannerProfile`: our approximations, not vendor profiles).
SCANNER_PROFILES: dict[str, ScannerProfile] = {
    "hamamatsu-like": ScannerProfile(
        gamma=(1.15, 1.2, 0.95), matrix=_saturation(1.25), white=(0.95, 0.96, 1.0),
        description="darker, more saturated, blue-purple cast, cool white"),
    "aperio-like": ScannerProfile(
        gamma=(0.8, 0.85, 1.0), matrix=_saturation(0.75), white=(1.0, 0.97, 0.88),
        description="lighter, washed-out colours, warm yellow background"),
    "3dhistech-like": ScannerProfile(
        gamma=(1.0, 1.25, 1.05),
        matrix=((1.10, -0.06, -0.04), (-0.04, 1.02, 0.02), (0.02, -0.10, 1.08)),
        white=(0.99, 0.94, 0.98),
        description="magenta-pink cast, green mid-tones darker, slightly pink white"),
}


def apply_scanner_profile(image: np.ndarray, profile: str | ScannerProfile) -> np.ndarray:
    """Render ``image`` with a scanner profile (a name of :data:`SCANNER_PROFILES` or a :class:`ScannerProfile`)."""
    image = _check_rgb(image)
    p = SCANNER_PROFILES[profile] if isinstance(profile, str) else profile
    lut = np.arange(256, dtype=np.float32) / np.float32(255.0)
    x = np.stack([(lut ** np.float32(g))[image[:, :, c]] for c, g in enumerate(p.gamma)], axis=2)
    m = np.asarray(p.matrix, dtype=np.float32) * np.asarray(p.white, dtype=np.float32)[:, None]
    out = x.reshape(-1, 3) @ m.T
    return np.clip(np.rint(out * np.float32(255.0)), 0, 255).astype(np.uint8).reshape(image.shape)


# ---------------------------------------------------------------------------------------------------------------
# Registry and parser
# ---------------------------------------------------------------------------------------------------------------


def _number(low: float, high: float | None = None, integer: bool = False) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        ok = np.isfinite(v) and v >= low and (high is None or v <= high) and (not integer or v == int(v))
        if not ok:
            what = "an integer" if integer else "a number"
            bound = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
            raise ValueError(f"strength must be {what} {bound}, got {text!r}")
        return int(v) if integer else v
    return parse


def _profile(text: str) -> str:
    if text not in SCANNER_PROFILES:
        raise ValueError(f"unknown scanner profile {text!r}; known: {', '.join(SCANNER_PROFILES)}")
    return text


@dataclass(frozen=True)
class ShiftKind:
    """One kind of shift: how to read its strength, how to apply it, and what it is for (one line)."""

    name: str
    apply: Callable[[np.ndarray, Any], np.ndarray]
    parse: Callable[[str], Any]
    help: str


#: Every kind of shift, by name.
SHIFT_KINDS: dict[str, ShiftKind] = {k.name: k for k in (
    ShiftKind("none", lambda im, _: _check_rgb(im).copy(), lambda t: None, "the image unchanged"),
    ShiftKind("hematoxylin", lambda im, s: scale_stain(im, 0, s), _number(0.0),
              "haematoxylin concentration times s (0.6 faint, 1.5 heavy nuclear staining)"),
    ShiftKind("eosin", lambda im, s: scale_stain(im, 1, s), _number(0.0),
              "eosin concentration times s (0.6 pale, 1.5 dark pink cytoplasm and stroma)"),
    ShiftKind("scanner", apply_scanner_profile, _profile,
              f"synthetic scanner colour profile, one of {', '.join(SCANNER_PROFILES)} (not measured ICC profiles)"),
    ShiftKind("blur", blur, _number(0.0), "Gaussian blur of sigma px (out-of-focus scan)"),
    ShiftKind("jpeg", jpeg, _number(1, 100, integer=True), "JPEG compression at quality q (1-100)"),
    ShiftKind("lowmag", lowmag, _number(1.0), "down by factor (area) and back up (bilinear): 20x resampled to 40x"),
    ShiftKind("noise", noise, _number(0.0), "additive Gaussian noise of sigma grey levels (fixed seed)"),
)}

#: The default set of ``benchmarks/robustness.py``: strong but realistic shifts, one or two strengths per kind.
STRONG_SHIFTS: tuple[str, ...] = (
    "hematoxylin:0.6", "hematoxylin:1.5", "eosin:0.6", "eosin:1.5",
    "scanner:hamamatsu-like", "scanner:aperio-like", "scanner:3dhistech-like",
    "blur:1", "blur:2", "jpeg:30", "lowmag:2",
)


@dataclass(frozen=True)
class Shift:
    """A parsed shift (``kind:strength``); call it on a uint8 RGB image."""

    kind: str
    strength: Any
    name: str

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return SHIFT_KINDS[self.kind].apply(image, self.strength)


def parse_shift(text: str) -> Shift:
    """``"blur:2"`` -> a :class:`Shift`; ``""`` and ``"none"`` are the identity. Raises a one-line ValueError naming
    the shift and the known kinds (or the valid strengths)."""
    text = str(text).strip()
    if text in ("", "none"):
        return Shift("none", None, "none")
    kind, sep, strength = text.partition(":")
    kind = kind.strip().lower()
    if kind not in SHIFT_KINDS or kind == "none":
        raise ValueError(f"unknown shift {text!r}; known: {', '.join(k for k in SHIFT_KINDS if k != 'none')} "
                         "(as kind:strength, e.g. blur:2, scanner:aperio-like) or none")
    if not sep or not strength.strip():
        raise ValueError(f"shift {text!r} needs a strength, as {kind}:<strength> ({SHIFT_KINDS[kind].help})")
    try:
        value = SHIFT_KINDS[kind].parse(strength.strip())
    except ValueError as e:
        raise ValueError(f"shift {text!r}: {e}") from None
    return Shift(kind, value, f"{kind}:{strength.strip()}")


def apply_shift(image: np.ndarray, shift: str | Shift) -> np.ndarray:
    """Apply a shift given by name (``"jpeg:30"``) or parsed; returns a new uint8 RGB image of the same shape."""
    return (parse_shift(shift) if isinstance(shift, str) else shift)(image)


class ShiftTransform(_PhotometricTransform):
    """A shift as a Detectron2 transform: the image's first three channels change, labels and geometry do not."""

    def __init__(self, shift: str | Shift):
        super().__init__()
        self._set_attributes({"shift": parse_shift(shift) if isinstance(shift, str) else shift})

    def _apply_rgb(self, rgb: np.ndarray) -> np.ndarray:
        return self.shift(rgb)

    def __repr__(self) -> str:
        return f"ShiftTransform({self.shift.name})"

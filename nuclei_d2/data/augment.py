"""Detectron2 augmentations for H&E nuclei: geometric ones move image and label map together, colour ones touch
only the image.

Every class here is a Detectron2 ``Augmentation`` (random, draws parameters) producing an fvcore ``Transform``
(deterministic, re-applicable). Contract with :class:`~nuclei_d2.data.mapper.NucleiDatasetMapper`:

* the image is ``H x W x C`` (uint8 RGB, or float, any number of channels for geometric transforms; colour
  transforms change only the first three channels);
* the label map goes through ``apply_segmentation``: geometric transforms resample it with **nearest neighbour**
  (so labels stay integers from the original set; int32 and other integer dtypes are supported), colour transforms
  return it unchanged;
* ``apply_coords`` is implemented for every geometric transform (exact, except for the elastic deformation, where
  it is a first-order approximation), and :class:`Rot90Transform` / :class:`RescaleTransform` have exact
  ``inverse()`` (used by test-time augmentation).

Randomness comes from numpy's global generator, which Detectron2 seeds per data-loader worker, exactly like its own
augmentations.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import cv2
import numpy as np
from detectron2.data import transforms as T
from fvcore.transforms.transform import NoOpTransform, Transform

from ..stain.deconvolution import OD_MAX, RUIFROK_HE, complete_stain_matrix, od_to_rgb, rgb_to_od
from ..stain.normalizer import StainEstimationError, StainNormalizationWarning, StainNormalizer
from .targets import touching_pixels

__all__ = [
    "BrightnessContrastTransform",
    "ElasticTransform",
    "GaussianBlurTransform",
    "GaussianNoiseTransform",
    "HEDJitterTransform",
    "HueTransform",
    "NucleiAwareRandomCrop",
    "NucleiResizeShortestEdge",
    "RandomBrightnessContrast",
    "RandomElastic",
    "RandomGaussianBlur",
    "RandomGaussianNoise",
    "RandomHEDJitter",
    "RandomHue",
    "RandomRescale",
    "RandomRot90",
    "RescaleTransform",
    "Rot90Transform",
    "StainNormalization",
    "StainNormalizationTransform",
    "build_nuclei_augmentation",
    "build_stain_normalizer",
]

logger = logging.getLogger(__name__)

_INTERP = {"nearest": cv2.INTER_NEAREST, "linear": cv2.INTER_LINEAR, "bilinear": cv2.INTER_LINEAR,
           "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA}


def _interp_flag(interp: str) -> int:
    try:
        return _INTERP[interp]
    except KeyError:
        raise ValueError(f"unknown interpolation {interp!r}; use one of {sorted(_INTERP)}") from None


def _cv2_safe(fn, img: np.ndarray, *, is_label: bool) -> np.ndarray:
    """Run an OpenCV resampling ``fn`` on ``img`` keeping its dtype and a trailing channel axis of size 1.

    OpenCV has no int64/uint32 path; such label maps are resampled as int32 (values checked to fit).
    """
    arr = np.ascontiguousarray(img)
    dtype = arr.dtype
    work = arr
    if dtype in (np.int64, np.uint32, np.uint64, np.int8, np.bool_):
        if arr.size and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
            raise ValueError(f"label values {arr.min()}..{arr.max()} do not fit int32 for resampling")
        work = arr.astype(np.int32)
    elif dtype == np.float64 and not is_label:
        work = arr.astype(np.float32)
    out = fn(work)
    if arr.ndim == 3 and out.ndim == 2:
        out = out[:, :, None]
    return out.astype(dtype, copy=False)


# ---------------------------------------------------------------------------------------------------------------
# Geometric transforms
# ---------------------------------------------------------------------------------------------------------------


class Rot90Transform(Transform):
    """Rotate by ``k`` x 90 degrees counter-clockwise (``np.rot90`` convention), exactly and invertibly.

    H&E sections have no preferred orientation, so the dihedral group (with flips) is free augmentation and the
    standard test-time augmentation set. No interpolation happens, so labels and pixels move exactly.
    """

    def __init__(self, h: int, w: int, k: int):
        super().__init__()
        self._set_attributes({"h": int(h), "w": int(w), "k": int(k) % 4})

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(f"Rot90Transform built for {self.h}x{self.w} got an image of {img.shape[:2]}")
        return np.ascontiguousarray(np.rot90(img, self.k, axes=(0, 1)))

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self.apply_image(segmentation)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """Continuous (x, y) coordinates (pixel i spans [i, i+1]) of the source -> of the rotated image."""
        x, y = coords[:, 0].copy(), coords[:, 1].copy()
        if self.k == 1:
            coords[:, 0], coords[:, 1] = y, self.w - x
        elif self.k == 2:
            coords[:, 0], coords[:, 1] = self.w - x, self.h - y
        elif self.k == 3:
            coords[:, 0], coords[:, 1] = self.h - y, x
        return coords

    def inverse(self) -> Transform:
        oh, ow = (self.w, self.h) if self.k % 2 else (self.h, self.w)
        return Rot90Transform(oh, ow, (4 - self.k) % 4)

    @property
    def output_size(self) -> tuple[int, int]:
        return (self.w, self.h) if self.k % 2 else (self.h, self.w)


class RescaleTransform(Transform):
    """Resize ``h x w -> new_h x new_w`` with OpenCV: ``interp`` for the image, nearest for label maps.

    Unlike Detectron2's ``ResizeTransform`` it accepts int32 label maps (which torch's nearest interpolation refuses)
    and images with any number of channels.
    """

    def __init__(self, h: int, w: int, new_h: int, new_w: int, interp: str = "linear"):
        super().__init__()
        _interp_flag(interp)
        self._set_attributes({"h": int(h), "w": int(w), "new_h": int(new_h), "new_w": int(new_w),
                              "interp": interp})

    def _resize(self, img: np.ndarray, flag: int, is_label: bool) -> np.ndarray:
        if img.shape[:2] != (self.h, self.w):
            raise ValueError(f"RescaleTransform built for {self.h}x{self.w} got an image of {img.shape[:2]}")
        if (self.new_h, self.new_w) == (self.h, self.w):
            return img
        return _cv2_safe(lambda a: cv2.resize(a, (self.new_w, self.new_h), interpolation=flag), img,
                         is_label=is_label)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self._resize(img, _interp_flag(self.interp), is_label=False)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self._resize(segmentation, cv2.INTER_NEAREST, is_label=True)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] = coords[:, 0] * (self.new_w / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h / self.h)
        return coords

    def inverse(self) -> Transform:
        return RescaleTransform(self.new_h, self.new_w, self.h, self.w, self.interp)


class ElasticTransform(Transform):
    """Elastic deformation (Simard et al., ICDAR 2003): ``out(p) = in(p + d(p))`` for a smooth displacement field d.

    The image is resampled with ``interp`` (bilinear by default), label maps with nearest neighbour, both with
    mirrored borders, so image and labels stay aligned and labels stay in their original set.
    """

    def __init__(self, dx: np.ndarray, dy: np.ndarray, interp: str = "linear"):
        super().__init__()
        if dx.shape != dy.shape or dx.ndim != 2:
            raise ValueError(f"displacement fields must be two H x W arrays, got {dx.shape} and {dy.shape}")
        _interp_flag(interp)
        self._set_attributes({"dx": dx.astype(np.float32), "dy": dy.astype(np.float32), "interp": interp})

    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        h, w = self.dx.shape
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        return gx + self.dx, gy + self.dy

    def _remap(self, img: np.ndarray, flag: int, is_label: bool) -> np.ndarray:
        if img.shape[:2] != self.dx.shape:
            raise ValueError(f"ElasticTransform built for {self.dx.shape} got an image of {img.shape[:2]}")
        mx, my = self._maps()
        return _cv2_safe(lambda a: cv2.remap(a, mx, my, flag, borderMode=cv2.BORDER_REFLECT_101), img,
                         is_label=is_label)

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        return self._remap(img, _interp_flag(self.interp), is_label=False)

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return self._remap(segmentation, cv2.INTER_NEAREST, is_label=True)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        """First-order approximation ``p' = p - d(p)`` (the exact inverse of a dense warp has no closed form)."""
        h, w = self.dx.shape
        xi = np.clip(np.floor(coords[:, 0]).astype(np.int64), 0, w - 1)
        yi = np.clip(np.floor(coords[:, 1]).astype(np.int64), 0, h - 1)
        coords[:, 0] = coords[:, 0] - self.dx[yi, xi]
        coords[:, 1] = coords[:, 1] - self.dy[yi, xi]
        return coords


# ---------------------------------------------------------------------------------------------------------------
# Photometric transforms: image only
# ---------------------------------------------------------------------------------------------------------------


class _PhotometricTransform(Transform):
    """Changes the colours of the first three (RGB) channels; geometry, labels and extra channels are untouched."""

    def _apply_rgb(self, rgb: np.ndarray) -> np.ndarray:  # uint8 H x W x 3 -> uint8 H x W x 3
        raise NotImplementedError

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.ndim != 3 or img.shape[2] < 3:
            raise ValueError(f"{type(self).__name__} needs an H x W x C image with C >= 3, got shape {img.shape}")
        rgb = img[:, :, :3]
        if img.dtype == np.uint8:
            out_rgb = self._apply_rgb(np.ascontiguousarray(rgb))
        else:  # float images in 0..255: round-trip through uint8 for the colour maths
            scale = 255.0 if float(np.nanmax(rgb, initial=0.0)) <= 1.0 else 1.0
            u8 = np.clip(np.rint(rgb * scale), 0, 255).astype(np.uint8)
            out_rgb = (self._apply_rgb(u8).astype(img.dtype) / scale).astype(img.dtype)
        if img.shape[2] == 3:
            return out_rgb
        out = img.copy()
        out[:, :, :3] = out_rgb
        return out

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def inverse(self) -> Transform:
        return NoOpTransform()


class HEDJitterTransform(_PhotometricTransform):
    """Perturb the stain concentrations in HED space: ``c_i' = alpha_i * c_i + beta_i`` for H, E and residual.

    Tellez et al., "Whole-slide mitosis detection in H&E breast histology using PHH3 as a reference to train
    distilled stain-invariant convolutional networks", IEEE TMI 2018 (and "Quantifying the effects of data
    augmentation and stain color normalization...", MedIA 2019): the image is deconvolved with Ruifrok & Johnston's
    matrix, each stain's concentration is scaled and shifted, and the image is recomposed. ``beta`` is in OD units.
    """

    def __init__(self, alpha: np.ndarray, beta: np.ndarray, stains: np.ndarray | None = None):
        super().__init__()
        m = complete_stain_matrix(RUIFROK_HE if stains is None else stains)
        self._set_attributes({"alpha": np.asarray(alpha, dtype=np.float32).reshape(3),
                              "beta": np.asarray(beta, dtype=np.float32).reshape(3), "stains": m})

    def _apply_rgb(self, rgb: np.ndarray) -> np.ndarray:
        od = rgb_to_od(rgb).reshape(-1, 3)
        m = self.stains.astype(np.float32)
        # conc = od @ inv(m); conc' = conc * alpha + beta; od' = conc' @ m  -> one affine map of the OD.
        lin = (np.linalg.inv(self.stains) * self.alpha[None, :].astype(np.float64)) @ self.stains
        shift = self.beta @ m
        od2 = od @ lin.astype(np.float32) + shift
        np.clip(od2, 0.0, OD_MAX, out=od2)
        return od_to_rgb(od2).reshape(rgb.shape)


class HueTransform(_PhotometricTransform):
    """Rotate the hue by ``delta`` (fraction of the colour circle, e.g. 0.05 = 18 degrees) in HSV."""

    def __init__(self, delta: float):
        super().__init__()
        self._set_attributes({"delta": float(delta)})

    def _apply_rgb(self, rgb: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)  # hue 0..255 for the full circle
        shift = int(round(self.delta * 256)) % 256
        hsv[:, :, 0] = ((hsv[:, :, 0].astype(np.int16) + shift) % 256).astype(np.uint8)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


class BrightnessContrastTransform(_PhotometricTransform):
    """``out = (img - mean) * contrast + mean * brightness`` per image (mean = mean grey level), clipped to 0..255."""

    def __init__(self, brightness: float, contrast: float):
        super().__init__()
        self._set_attributes({"brightness": float(brightness), "contrast": float(contrast)})

    def _apply_rgb(self, rgb: np.ndarray) -> np.ndarray:
        f = rgb.astype(np.float32)
        mean = float(f.mean())
        out = (f - mean) * self.contrast + mean * self.brightness
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class GaussianBlurTransform(_PhotometricTransform):
    """Gaussian blur of standard deviation ``sigma`` pixels (out-of-focus scanning)."""

    def __init__(self, sigma: float):
        super().__init__()
        self._set_attributes({"sigma": float(sigma)})

    def _apply_rgb(self, rgb: np.ndarray) -> np.ndarray:
        if self.sigma <= 0:
            return rgb
        return cv2.GaussianBlur(rgb, (0, 0), self.sigma, borderType=cv2.BORDER_REFLECT_101)


class GaussianNoiseTransform(_PhotometricTransform):
    """Additive Gaussian noise of standard deviation ``std`` grey levels; ``seed`` makes it re-applicable."""

    def __init__(self, std: float, seed: int):
        super().__init__()
        self._set_attributes({"std": float(std), "seed": int(seed)})

    def _apply_rgb(self, rgb: np.ndarray) -> np.ndarray:
        if self.std <= 0:
            return rgb
        noise = np.random.default_rng(self.seed).standard_normal(rgb.shape, dtype=np.float32) * self.std
        return np.clip(np.rint(rgb.astype(np.float32) + noise), 0, 255).astype(np.uint8)


class StainNormalizationTransform(_PhotometricTransform):
    """Apply a fitted :class:`~nuclei_d2.stain.StainNormalizer` with the image's precomputed stain estimate."""

    def __init__(self, normalizer: StainNormalizer, source: Any):
        super().__init__()
        self._set_attributes({"normalizer": normalizer, "source": source})

    def _apply_rgb(self, rgb: np.ndarray) -> np.ndarray:
        return self.normalizer.apply(rgb, self.source)


# ---------------------------------------------------------------------------------------------------------------
# Augmentations (random parameter draws)
# ---------------------------------------------------------------------------------------------------------------


def _uniform(low: float, high: float, size: int | tuple[int, ...] | None = None) -> Any:
    # numpy's *global* generator on purpose: Detectron2 seeds it per data-loader worker (seed_all_rng), as for its
    # own augmentations, so runs are reproducible with SEED.
    return np.random.uniform(low, high, size)  # noqa: NPY002


def _randint(low: int, high: int | None = None) -> int:
    return int(np.random.randint(low, high))  # noqa: NPY002


def _skip(prob: float) -> bool:
    return prob <= 0 or (prob < 1 and _uniform(0.0, 1.0) >= prob)


class RandomRot90(T.Augmentation):
    """Rotate by 0, 90, 180 or 270 degrees, each with probability 1/4 (``prob`` = chance of rotating at all)."""

    def __init__(self, prob: float = 1.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        if _skip(self.prob):
            return NoOpTransform()
        k = _randint(4)
        return NoOpTransform() if k == 0 else Rot90Transform(h, w, k)


class NucleiAwareRandomCrop(T.Augmentation):
    """Random ``crop_size`` crop that, with probability ``nucleus_prob``, is centred near a random nucleus pixel, and
    with probability ``contact_prob`` (drawn first) near a random pixel where two nuclei touch.

    Plain uniform crops of sparse tissue often hold no nucleus (useless for instance heads, filtered by the
    mapper); centring on a uniformly drawn foreground pixel prefers crops with nuclei without always showing the
    same ones. Touching nuclei are where instance models merge two nuclei into one (most of an R-CNN's
    under-segmentation on the Kumar test tiles), so ``contact_prob`` shows the crowded parts of a tile more often; a
    crop with no touching nuclei falls back to the nucleus-pixel draw. Images smaller than the crop are cropped to
    their own size along that axis (not padded).
    """

    def __init__(self, crop_size: int | tuple[int, int], nucleus_prob: float = 0.5, contact_prob: float = 0.0):
        super().__init__()
        if isinstance(crop_size, int):
            crop_size = (crop_size, crop_size)
        crop_size = (int(crop_size[0]), int(crop_size[1]))
        if min(crop_size) <= 0:
            raise ValueError(f"crop_size must be positive, got {crop_size}")
        for name, p in (("nucleus_prob", nucleus_prob), ("contact_prob", contact_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
        self._init({"crop_size": crop_size, "nucleus_prob": float(nucleus_prob), "contact_prob": float(contact_prob)})

    def _centre_pixel(self, sem_seg: np.ndarray | None) -> tuple[int, int] | None:
        """A touching or nucleus pixel ``(y, x)`` to place the crop around, or None for a uniform crop."""
        if sem_seg is None:
            return None
        mask = None
        if self.contact_prob > 0 and _uniform(0.0, 1.0) < self.contact_prob:
            mask = touching_pixels(sem_seg)
            if not mask.any():
                mask = sem_seg > 0
        elif self.nucleus_prob > 0 and _uniform(0.0, 1.0) < self.nucleus_prob:
            mask = sem_seg > 0
        if mask is None:
            return None
        ys, xs = np.nonzero(mask)
        if not ys.size:
            return None
        i = _randint(ys.size)
        return int(ys[i]), int(xs[i])

    def get_transform(self, image: np.ndarray, sem_seg: np.ndarray | None) -> Transform:
        h, w = image.shape[:2]
        ch, cw = min(self.crop_size[0], h), min(self.crop_size[1], w)
        if (ch, cw) == (h, w):
            return NoOpTransform()
        centre = self._centre_pixel(sem_seg)
        if centre is not None:
            # The chosen pixel lands at a random position of the crop's central half, so nuclei are not always
            # exactly centred.
            oy = _randint(ch // 4, max(ch - ch // 4, ch // 4 + 1))
            ox = _randint(cw // 4, max(cw - cw // 4, cw // 4 + 1))
            y0 = int(np.clip(centre[0] - oy, 0, h - ch))
            x0 = int(np.clip(centre[1] - ox, 0, w - cw))
        else:
            y0 = _randint(h - ch + 1)
            x0 = _randint(w - cw + 1)
        return T.CropTransform(x0, y0, cw, ch, orig_w=w, orig_h=h)


class RandomRescale(T.Augmentation):
    """Rescale by a factor drawn uniformly from ``scale_range`` (magnification jitter, e.g. 40x vs 20x scanners)."""

    def __init__(self, scale_range: tuple[float, float] = (0.8, 1.25), prob: float = 1.0, interp: str = "linear"):
        super().__init__()
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        _interp_flag(interp)
        self._init({"scale_range": (lo, hi), "prob": prob, "interp": interp})

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        if _skip(self.prob):
            return NoOpTransform()
        s = _uniform(*self.scale_range)
        nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
        return NoOpTransform() if (nh, nw) == (h, w) else RescaleTransform(h, w, nh, nw, self.interp)


class NucleiResizeShortestEdge(T.ResizeShortestEdge):
    """Detectron2's ``ResizeShortestEdge`` producing a :class:`RescaleTransform` (int32 label maps work)."""

    def get_transform(self, image: np.ndarray) -> Transform:
        t = super().get_transform(image)
        if isinstance(t, T.ResizeTransform):
            return RescaleTransform(t.h, t.w, t.new_h, t.new_w, "linear")
        return t


class RandomElastic(T.Augmentation):
    """Elastic deformation with Simard et al.'s parameters: uniform(-1, 1) displacement noise smoothed by a Gaussian
    of ``sigma`` pixels and scaled by ``alpha``.

    The root-mean-square displacement is about ``alpha * 0.577 / (2 * sqrt(pi) * sigma)`` pixels (e.g. 1.6 px for
    alpha=100, sigma=10): nuclei change shape a little without tearing.
    """

    def __init__(self, alpha: float = 100.0, sigma: float = 10.0, prob: float = 1.0, interp: str = "linear"):
        super().__init__()
        if sigma <= 0 or alpha < 0:
            raise ValueError(f"elastic deformation needs sigma > 0 and alpha >= 0, got alpha={alpha}, sigma={sigma}")
        _interp_flag(interp)
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        h, w = image.shape[:2]
        if _skip(self.prob) or self.alpha == 0:
            return NoOpTransform()
        fields = []
        for _ in range(2):
            noise = _uniform(-1.0, 1.0, (h, w)).astype(np.float32)
            fields.append(cv2.GaussianBlur(noise, (0, 0), self.sigma, borderType=cv2.BORDER_REFLECT_101)
                          * np.float32(self.alpha))
        return ElasticTransform(fields[0], fields[1], self.interp)


class RandomHEDJitter(T.Augmentation):
    """HED colour jitter (Tellez et al. 2018): per stain ``alpha ~ U(1 - alpha, 1 + alpha)``, ``beta ~ U(-beta, beta)``.

    Defaults match Tellez et al. 2019's "HED-light" (0.05); 0.2 is their "HED-strong".
    """

    def __init__(self, alpha: float = 0.05, beta: float = 0.05, prob: float = 1.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        if _skip(self.prob):
            return NoOpTransform()
        a = _uniform(1 - self.alpha, 1 + self.alpha, 3)
        b = _uniform(-self.beta, self.beta, 3)
        return HEDJitterTransform(a, b)


class RandomHue(T.Augmentation):
    """Hue rotation by ``U(-delta, delta)`` of the colour circle."""

    def __init__(self, delta: float = 0.05, prob: float = 1.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        if _skip(self.prob):
            return NoOpTransform()
        return HueTransform(_uniform(-self.delta, self.delta))


class RandomBrightnessContrast(T.Augmentation):
    """Brightness factor ``U(1 - brightness, 1 + brightness)`` and contrast factor ``U(1 - contrast, 1 + contrast)``."""

    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, prob: float = 1.0):
        super().__init__()
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> Transform:
        if _skip(self.prob):
            return NoOpTransform()
        return BrightnessContrastTransform(_uniform(1 - self.brightness, 1 + self.brightness),
                                           _uniform(1 - self.contrast, 1 + self.contrast))


class RandomGaussianBlur(T.Augmentation):
    """Gaussian blur with ``sigma ~ U(sigma_range)`` pixels."""

    def __init__(self, sigma_range: tuple[float, float] = (0.1, 1.5), prob: float = 1.0):
        super().__init__()
        self._init({"sigma_range": (float(sigma_range[0]), float(sigma_range[1])), "prob": prob})

    def get_transform(self, image: np.ndarray) -> Transform:
        if _skip(self.prob):
            return NoOpTransform()
        return GaussianBlurTransform(_uniform(*self.sigma_range))


class RandomGaussianNoise(T.Augmentation):
    """Additive Gaussian noise with ``std ~ U(std_range)`` grey levels."""

    def __init__(self, std_range: tuple[float, float] = (1.0, 8.0), prob: float = 1.0):
        super().__init__()
        self._init({"std_range": (float(std_range[0]), float(std_range[1])), "prob": prob})

    def get_transform(self, image: np.ndarray) -> Transform:
        if _skip(self.prob):
            return NoOpTransform()
        return GaussianNoiseTransform(_uniform(*self.std_range), _randint(2 ** 31 - 1))


class StainNormalization(T.Augmentation):
    """Stain normalisation as a (deterministic) mapper step: image only, labels untouched.

    The image's stains are estimated in ``get_transform`` and applied by the returned transform. Images whose stains
    cannot be estimated (white, grey, tiny) pass through unchanged with a
    :class:`~nuclei_d2.stain.StainNormalizationWarning`.
    """

    def __init__(self, normalizer: StainNormalizer):
        super().__init__()
        if not normalizer.is_fitted:
            raise ValueError("StainNormalization needs a fitted StainNormalizer (fit() or load() it first)")
        self._init({"normalizer": normalizer})

    def get_transform(self, image: np.ndarray) -> Transform:
        if image.dtype != np.uint8:
            raise ValueError(f"stain normalisation expects the uint8 RGB image, got dtype {image.dtype}; put it "
                             "before any augmentation that makes the image float")
        try:
            source = self.normalizer.estimate(image[:, :, :3])
        except StainEstimationError as e:
            warnings.warn(f"stain normalisation skipped, image passed through unchanged: {e}",
                          StainNormalizationWarning, stacklevel=2)
            return NoOpTransform()
        return StainNormalizationTransform(self.normalizer, source)


# ---------------------------------------------------------------------------------------------------------------
# From the config
# ---------------------------------------------------------------------------------------------------------------


def build_stain_normalizer(cfg) -> StainNormalizer | None:
    """The fitted normaliser of ``INPUT.NUCLEI.STAIN_NORM`` / ``STAIN_REFERENCE``, or None when it is "none"."""
    method = str(cfg.INPUT.NUCLEI.STAIN_NORM).lower()
    if method in ("", "none"):
        return None
    if method not in ("macenko", "vahadane"):
        raise ValueError(f"INPUT.NUCLEI.STAIN_NORM must be 'none', 'macenko' or 'vahadane', got "
                         f"{cfg.INPUT.NUCLEI.STAIN_NORM!r}")
    ref = cfg.INPUT.NUCLEI.STAIN_REFERENCE
    if not ref:
        raise ValueError(f"INPUT.NUCLEI.STAIN_NORM={method!r} needs INPUT.NUCLEI.STAIN_REFERENCE: a reference image "
                         "or a normaliser JSON saved by StainNormalizer.save()")
    return StainNormalizer.from_reference(ref, method)


def _pair(v: Any) -> tuple[float, float]:
    v = tuple(v) if isinstance(v, (list, tuple)) else (v, v)
    if len(v) != 2:
        raise ValueError(f"expected a (low, high) pair, got {v}")
    return float(v[0]), float(v[1])


def build_nuclei_augmentation(cfg, is_train: bool) -> list[T.Augmentation | Transform]:
    """The augmentation list of the nuclei mapper, from ``cfg.INPUT`` (keys in ``nuclei_d2/config.py``).

    Order: at inference only, the test-time shift ``INPUT.TEST_SHIFT`` (:mod:`nuclei_d2.data.shifts`, robustness
    measurements); stain normalisation (train and test, on the whole image so the stain estimate sees the most tissue);
    the fixed magnification ``INPUT.NUCLEI.SCALE`` (train and test); then, in training only: Detectron2's crop
    (``INPUT.CROP``), shortest-edge resize (``INPUT.MIN_SIZE_TRAIN``, ``(0,)`` = keep resolution), rescale jitter,
    nucleus-aware crop (``INPUT.NUCLEI.CROP_SIZE``), flips, 90-degree rotations, elastic deformation, and the colour
    augmentations (HED, hue, brightness/contrast, blur, noise). At inference only the stain normalisation, the
    magnification and ``INPUT.MIN_SIZE_TEST`` (0 = keep resolution) apply.
    """
    n = cfg.INPUT.NUCLEI
    augs: list[T.Augmentation | Transform] = []
    if not is_train and str(cfg.INPUT.TEST_SHIFT).strip() not in ("", "none"):
        from .shifts import ShiftTransform  # a robustness measurement (INPUT.TEST_SHIFT): before normalisation

        augs.append(ShiftTransform(cfg.INPUT.TEST_SHIFT))
    normalizer = build_stain_normalizer(cfg)
    if normalizer is not None:
        augs.append(StainNormalization(normalizer))
    if float(n.SCALE) != 1.0:  # the fixed magnification, at training and inference (setup_cfg checks it is > 0)
        augs.append(RandomRescale((float(n.SCALE),) * 2, prob=1.0))
    if not is_train:
        if cfg.INPUT.MIN_SIZE_TEST:
            augs.append(NucleiResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice"))
        return augs
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    min_size = cfg.INPUT.MIN_SIZE_TRAIN
    if tuple(min_size) != (0,):
        augs.append(NucleiResizeShortestEdge(min_size, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING))
    if n.RESCALE.PROB > 0:
        augs.append(RandomRescale(_pair(n.RESCALE.RANGE), prob=n.RESCALE.PROB))
    if n.CROP_SIZE:
        augs.append(NucleiAwareRandomCrop(int(n.CROP_SIZE), nucleus_prob=n.CROP_NUCLEUS_PROB,
                                          contact_prob=n.CROP_CONTACT_PROB))
    if n.FLIP:
        augs.append(T.RandomFlip(prob=0.5, horizontal=True, vertical=False))
        augs.append(T.RandomFlip(prob=0.5, horizontal=False, vertical=True))
    if n.ROT90:
        augs.append(RandomRot90())
    if n.ELASTIC.PROB > 0:
        augs.append(RandomElastic(n.ELASTIC.ALPHA, n.ELASTIC.SIGMA, prob=n.ELASTIC.PROB))
    if n.HED_JITTER.PROB > 0:
        augs.append(RandomHEDJitter(n.HED_JITTER.ALPHA, n.HED_JITTER.BETA, prob=n.HED_JITTER.PROB))
    if n.HUE.PROB > 0:
        augs.append(RandomHue(n.HUE.DELTA, prob=n.HUE.PROB))
    if n.BRIGHTNESS_CONTRAST.PROB > 0:
        augs.append(RandomBrightnessContrast(n.BRIGHTNESS_CONTRAST.BRIGHTNESS, n.BRIGHTNESS_CONTRAST.CONTRAST,
                                             prob=n.BRIGHTNESS_CONTRAST.PROB))
    if n.BLUR.PROB > 0:
        augs.append(RandomGaussianBlur(_pair(n.BLUR.SIGMA), prob=n.BLUR.PROB))
    if n.NOISE.PROB > 0:
        augs.append(RandomGaussianNoise(_pair(n.NOISE.STD), prob=n.NOISE.PROB))
    return augs

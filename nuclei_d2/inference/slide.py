"""Reading images of any size region by region: plain images, TIFF pyramids and whole-slide images.

Whole-slide images (SVS, pyramidal TIFF) do not fit in memory at full resolution. Every input is opened as an
:class:`ImageSource` that reads one region of one pyramid level at a time, so the predictor's memory follows its tile
batch, not the slide.

Backends, tried in this order by :func:`open_image`:

* ``tifffile`` (always available): TIFF/SVS/BigTIFF, pyramid levels from the file's series (tifffile/OME sub-IFDs,
  SVS reduced pages). Regions are read by decoding only the tiles (or strips) they touch; nothing else is loaded.
* ``tiffslide`` / ``openslide`` when installed (optional, ``backend="tiffslide"`` / ``"openslide"``): every format
  those libraries know (NDPI, MRXS, ...).
* everything else (PNG, JPEG, BMP, NPY) is read whole with :func:`nuclei_d2.data.io.read_image_rgb`.

Pixels always come back as ``H x W x 3`` uint8 RGB; grey, RGBA and 16-bit inputs are converted (and reported in
:attr:`ImageSource.warnings`) by :func:`nuclei_d2.data.io.to_rgb_uint8`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..data.io import ImageReadError, read_image_rgb, to_rgb_uint8

__all__ = ["ArraySource", "ImageSource", "NoTissueError", "OpenSlideSource", "TiffSource", "open_image",
           "tissue_mask"]

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".ndpi", ".scn", ".bif")


class NoTissueError(ValueError):
    """The tissue mask of a slide is empty: there is nothing to segment."""


class ImageSource:
    """An image readable region by region, at one or more pyramid levels (level 0 = full resolution).

    Attributes:
        name: what error messages call it (the file path).
        level_dims: ``(height, width)`` of every level.
        mpp: microns per pixel at level 0, when the file says it (else None).
        magnification: objective power at level 0 (e.g. 40), when the file says it (else None).
        warnings: conversions made to get RGB uint8 (grey, RGBA, 16-bit), one line each.
    """

    name: str = "<image>"
    level_dims: list[tuple[int, int]]
    mpp: float | None = None
    magnification: float | None = None

    def __init__(self) -> None:
        self.warnings: list[str] = []

    @property
    def level_count(self) -> int:
        return len(self.level_dims)

    def downsample(self, level: int) -> float:
        """Level-0 pixels per pixel of ``level`` (along the width)."""
        return self.level_dims[0][1] / float(self.level_dims[level][1])

    def check_level(self, level: int) -> int:
        if not 0 <= int(level) < self.level_count:
            raise ImageReadError(f"{self.name}: level {level} does not exist (the image has {self.level_count} "
                                 f"level(s): {', '.join(f'{h}x{w}' for h, w in self.level_dims)})")
        return int(level)

    def level_for_magnification(self, magnification: float) -> int:
        """The level whose magnification is closest to ``magnification`` (needs the file's objective power)."""
        if self.magnification is None:
            raise ImageReadError(f"{self.name}: the file does not record its magnification; choose a level instead")
        mags = [self.magnification / self.downsample(i) for i in range(self.level_count)]
        return int(np.argmin([abs(math.log(m / magnification)) for m in mags]))

    def read_region(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        """``height x width x 3`` uint8 RGB of ``level`` from ``(top, left)`` (inside the level)."""
        raise NotImplementedError

    def read_level(self, level: int) -> np.ndarray:
        h, w = self.level_dims[self.check_level(level)]
        return self.read_region(level, 0, 0, h, w)

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The smallest level at least ``max_side`` px long, subsampled to at most ``max_side``; with its downsample
        relative to level 0. Read in bands of rows, so a slide without a pyramid never sits in memory whole."""
        level = 0
        for i, (h, w) in enumerate(self.level_dims):
            if max(h, w) >= max_side or i == 0:
                level = i
        h, w = self.level_dims[level]
        step = max(1, int(math.ceil(max(h, w) / max_side)))
        band = step * max(1, 1024 // step)
        rows = [self.read_region(level, y, 0, min(band, h - y), w)[::step, ::step] for y in range(0, h, band)]
        return np.ascontiguousarray(np.concatenate(rows, axis=0)), self.downsample(level) * step

    def close(self) -> None:
        pass

    def __enter__(self) -> ImageSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class ArraySource(ImageSource):
    """An in-memory RGB image (one level)."""

    def __init__(self, image: np.ndarray, name: str = "<array>"):
        super().__init__()
        self.name = name
        self.image = to_rgb_uint8(image, source=name)
        self.level_dims = [tuple(self.image.shape[:2])]

    def read_region(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        self.check_level(level)
        return self.image[top:top + height, left:left + width]


def _describe_conversion(dtype: np.dtype, channels: int, name: str) -> list[str]:
    out = []
    if channels == 1:
        out.append(f"{name}: greyscale image: replicated to RGB (H&E models expect colour; results may be poor)")
    elif channels == 2:
        out.append(f"{name}: grey + alpha image: alpha dropped, grey replicated to RGB")
    elif channels == 4:
        out.append(f"{name}: RGBA image: alpha channel dropped")
    if np.dtype(dtype) == np.uint16:
        out.append(f"{name}: 16-bit image: scaled to 8 bits (>> 8)")
    elif np.dtype(dtype) != np.uint8:
        out.append(f"{name}: {np.dtype(dtype)} pixels: converted to 8 bits")
    return out


class TiffSource(ImageSource):
    """TIFF/SVS/BigTIFF (pyramidal or not) with ``tifffile``: regions decode only the tiles/strips they touch."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import tifffile

        self.name = str(path)
        try:
            self._tf = tifffile.TiffFile(path)
            series = self._tf.series[0]
            levels = list(getattr(series, "levels", None) or [series])
            # SVS: the pyramid levels are series 0's levels; label/macro images are other series (ignored).
            self._pages = [lv.keyframe for lv in levels]
            series_shape = tuple(series.shape)
        except Exception as e:  # tifffile raises many kinds of errors for corrupt files
            raise ImageReadError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from e
        if int(np.prod(series_shape)) != int(np.prod(self._pages[0].shape)):
            raise ImageReadError(f"{path}: a multi-page TIFF series of shape {series_shape} (a stack or time series?); "
                                 "expected one 2-D image (RGB, RGBA or grey), optionally with pyramid levels")
        dims = []
        for page in self._pages:
            shape = page.shape
            if page.planarconfig == 2 and len(shape) == 3:  # separate planes: C x H x W
                shape = (shape[1], shape[2], shape[0])
            if len(shape) not in (2, 3) or (len(shape) == 3 and not 1 <= shape[2] <= 4):
                raise ImageReadError(f"{path}: expected a 2-D image with 1-4 channels, got shape {page.shape}")
            dims.append((int(shape[0]), int(shape[1])))
        self.level_dims = dims
        first = self._pages[0]
        self.warnings = _describe_conversion(first.dtype, int(first.samplesperpixel), self.name)
        self._parse_metadata(first.description or "")

    def _parse_metadata(self, desc: str) -> None:
        m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
        if m:
            self.mpp = float(m.group(1))
        m = re.search(r"AppMag\s*=\s*([0-9.]+)", desc)
        if m:
            self.magnification = float(m.group(1))

    def read_region(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        page = self._pages[self.check_level(level)]
        lh, lw = self.level_dims[level]
        top, left = max(0, int(top)), max(0, int(left))
        bottom, right = min(lh, top + int(height)), min(lw, left + int(width))
        if bottom <= top or right <= left:
            raise ValueError(f"{self.name}: empty region ({top}, {left}, {height}, {width}) at level {level}")
        try:
            raw = self._read_segments(page, top, left, bottom, right)
        except ImageReadError:
            raise
        except Exception as e:
            raise ImageReadError(f"{self.name}: cannot decode level {level} ({type(e).__name__}: {e})") from e
        return to_rgb_uint8(raw, source=self.name)

    def _read_segments(self, page: Any, top: int, left: int, bottom: int, right: int) -> np.ndarray:
        if page.planarconfig == 2 or not page.dataoffsets:
            # Separate colour planes (rare) or unusual layouts: decode the level whole.
            arr = page.asarray()
            if page.planarconfig == 2 and arr.ndim == 3:
                arr = np.moveaxis(arr, 0, -1)
            return arr[top:bottom, left:right]
        if page.is_tiled:
            th, tw = int(page.tilelength), int(page.tilewidth)
        else:
            th, tw = int(page.rowsperstrip or page.shape[0]), int(page.shape[1])
        lw = int(page.shape[1])
        across = -(-lw // tw)
        spp = int(page.samplesperpixel)
        out = np.zeros((bottom - top, right - left, spp), dtype=page.dtype)
        fh = self._tf.filehandle
        jpegtables = getattr(page, "jpegtables", None)
        for ty in range(top // th, (bottom - 1) // th + 1):
            for tx in range(left // tw, (right - 1) // tw + 1):
                index = ty * across + tx
                offset, count = page.dataoffsets[index], page.databytecounts[index]
                y0, x0 = ty * th, tx * tw
                if count == 0:
                    continue  # sparse tile: zeros
                fh.seek(offset)
                data = fh.read(count)
                seg = page.decode(data, index, jpegtables=jpegtables)[0]
                seg = np.asarray(seg).reshape(seg.shape[-3], seg.shape[-2], -1)
                sy0, sy1 = max(top, y0), min(bottom, y0 + seg.shape[0])
                sx0, sx1 = max(left, x0), min(right, x0 + seg.shape[1])
                out[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = seg[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0]
        return out[:, :, 0] if spp == 1 else out

    def close(self) -> None:
        self._tf.close()


class OpenSlideSource(ImageSource):
    """A slide through ``tiffslide`` or ``openslide`` (optional dependencies; same API)."""

    def __init__(self, path: str | os.PathLike, module: str = "tiffslide"):
        super().__init__()
        import importlib

        self.name = str(path)
        try:
            lib = importlib.import_module(module)
        except ImportError as e:
            pip = {"openslide": "openslide-python openslide-bin"}.get(module, module)
            raise ImageReadError(f"{path}: backend {module!r} is not installed (pip install {pip}, or "
                                 "pip install nuclei-d2[slides] for both whole-slide backends)") from e
        # tiffslide's class is TiffSlide (its OpenSlide alias warns on every use); openslide's is OpenSlide
        cls = getattr(lib, "TiffSlide", None) or lib.OpenSlide
        try:  # tiffslide opens lazily: a broken file fails at the first look at its levels or properties
            self._slide = cls(str(path))
            self.level_dims = [(int(h), int(w)) for w, h in self._slide.level_dimensions]
            props = dict(self._slide.properties)
        except Exception as e:
            raise ImageReadError(f"{path}: {module} cannot open it ({type(e).__name__}: {e})") from e
        mpp = props.get("openslide.mpp-x") or props.get("tiffslide.mpp-x")
        mag = props.get("openslide.objective-power") or props.get("tiffslide.objective-power")
        self.mpp = float(mpp) if mpp else None
        self.magnification = float(mag) if mag else None

    def read_region(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        ds = self.downsample(self.check_level(level))
        # (openslide's location is in level-0 coordinates, the size in level coordinates)
        img = self._slide.read_region((int(round(left * ds)), int(round(top * ds))), level, (int(width), int(height)))
        return to_rgb_uint8(np.asarray(img), source=self.name)

    def close(self) -> None:
        self._slide.close()


def open_image(path: str | os.PathLike, backend: str = "auto") -> ImageSource:
    """Open ``path`` as an :class:`ImageSource` (see the module docstring for the backends).

    Args:
        backend: "auto" (tifffile for TIFF-like files, whole-image reading otherwise), "tifffile", "tiffslide",
            "openslide" or "pil" (read whole).

    Raises:
        FileNotFoundError: no such file.
        ImageReadError: unreadable, unsupported or not an image (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    suffix = path.suffix.lower()
    if backend in ("tiffslide", "openslide"):
        return OpenSlideSource(path, backend)
    if backend == "tifffile" or (backend == "auto" and suffix in TIFF_SUFFIXES):
        return TiffSource(path)
    if backend not in ("auto", "pil"):
        raise ValueError(f"unknown backend {backend!r}; use auto, tifffile, tiffslide, openslide or pil")
    from ..data.io import IMAGE_SUFFIXES, _read_raw

    if suffix not in IMAGE_SUFFIXES:
        known = sorted(set(IMAGE_SUFFIXES) | set(TIFF_SUFFIXES))
        raise ImageReadError(f"{path}: unsupported image format {suffix!r}; use one of {', '.join(known)}")
    try:
        raw = np.asarray(_read_raw(path))
    except Exception as e:
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    channels = 1 if raw.ndim == 2 else int(raw.shape[2]) if raw.ndim == 3 else 0
    src = ArraySource(read_image_rgb(path) if raw.ndim not in (2, 3) else raw, name=str(path))
    src.warnings = _describe_conversion(raw.dtype, channels, str(path))
    return src


def tissue_mask(thumbnail: np.ndarray, threshold: float = 0.08, min_size: int = 64) -> np.ndarray:
    """Boolean tissue mask of an RGB thumbnail: mean optical density above ``threshold`` (glass is near 0 OD),
    closed and opened by a 3x3 square, components smaller than ``min_size`` thumbnail pixels removed.

    A simple, stain-agnostic rule (brightfield glass transmits nearly all light); good enough to skip the empty
    glass that makes up half of a typical slide.
    """
    from scipy import ndimage

    rgb = np.asarray(thumbnail, dtype=np.float32)
    od = -np.log((rgb + 1.0) / 256.0)
    mask = np.pad(od.mean(axis=2) > threshold, 4, mode="edge")  # (so the image border is not eroded)
    mask = ndimage.binary_closing(mask, structure=np.ones((3, 3)), iterations=2)
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3)))[4:-4, 4:-4]
    lab, n = ndimage.label(mask)
    if n:
        sizes = ndimage.sum(mask, lab, index=np.arange(1, n + 1))
        small = np.zeros(n + 1, dtype=bool)
        small[1:] = sizes < min_size
        mask[small[lab]] = False
    return mask

"""Reading images of any size region by region: plain images, TIFF pyramids and whole-slide images.

Whole-slide images (SVS, pyramidal TIFF) do not fit in memory at full resolution. Every input is opened as an
:class:`ImageSource` that reads one region of one pyramid level at a time, so the predictor's memory follows its tile
batch, not the slide.

Backends, tried in this order by :func:`open_image`:

* ``tifffile`` (always available): TIFF/SVS/BigTIFF, pyramid levels from the file's series (tifffile/OME sub-IFDs,
  SVS reduced pages). Regions are read by decoding only the tiles (or strips) they touch; nothing else is loaded.
* ``tiffslide`` / ``openslide`` when installed (optional, ``backend="tiffslide"`` / ``"openslide"``): every format
  those libraries know (NDPI, MRXS, ...).
* everything else (PNG, JPEG, BMP, NPY) is read whole with :func:`nuclei_d2.utils.io.read_image_rgb`.

Pixels always come back as ``H x W x 3`` uint8 RGB; grey, RGBA and 16-bit inputs are converted (and reported in
:attr:`ImageSource.warnings`) by :func:`nuclei_d2.utils.io.to_rgb_uint8`.

Pixel size (``mpp``, microns per level-0 pixel) and magnification, first source that has them wins:

1. Aperio (SVS) description ``MPP = ...`` / ``AppMag = ...``;
2. OME-XML (OME-TIFF): the first image's ``PhysicalSizeX/Y`` (+ ``...Unit``, default µm) and its objective's
   ``NominalMagnification``;
3. resolution tags: TIFF ``XResolution/YResolution`` with ``ResolutionUnit`` inch or centimetre (also tifffile's
   millimetre/micrometre codes), or ImageJ's own ``unit=`` with unit-less tags, **only if** the pixel size lies in
   :data:`TAG_MPP_RANGE`: outside it the tags are a writer's default (72 or 96 dpi = 353 or 265 µm/px), not a
   microscope's; unit "none" is ignored;
4. (magnification only) derived from the pixel size, ``MAGNIFICATION_TIMES_MPP / mpp`` (0.25 µm/px ~ 40x,
   0.5 ~ 20x), with ``magnification_source = "derived"``.

The tiffslide/openslide backends take ``<backend>.mpp-x`` / ``objective-power`` from their libraries, with the same
range check and derived magnification.
"""

from __future__ import annotations

import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.io import ImageReadError, read_image_rgb, to_rgb_uint8

__all__ = ["ArraySource", "ImageSource", "NoTissueError", "OpenSlideSource", "TiffSource", "open_image",
           "tissue_mask"]

TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".btf", ".tf8", ".ndpi", ".scn", ".bif")

#: Pixel sizes (µm) believed from resolution tags (and from the tiffslide/openslide backends, which convert the tags
#: without a check). Brightfield scans are 0.1-1 µm/px, overviews a few µm; screenshots and image editors write 72,
#: 96 or 300 dpi (353, 265, 85 µm/px), which would make every nucleus the size of a coin.
TAG_MPP_RANGE = (0.01, 20.0)

#: Magnification derived from the pixel size when the file records none: ``MAGNIFICATION_TIMES_MPP / mpp``
#: (0.25 µm/px ~ 40x, 0.5 ~ 20x: the usual whole-slide scanner pairs; a given scanner may differ by ~10%).
MAGNIFICATION_TIMES_MPP = 10.0

#: Microns per unit of OME ``PhysicalSize*Unit`` and ImageJ ``unit=`` (lower case).
_UM_PER_UNIT = {"pm": 1e-6, "å": 1e-4, "nm": 1e-3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0, "microns": 1.0,
                "mm": 1e3, "cm": 1e4, "m": 1e6, "in": 25400.0, "inch": 25400.0}

#: Microns per unit of TIFF ``ResolutionUnit``: 2 inch, 3 centimetre (TIFF 6.0); 4 mm, 5 µm (tifffile's extension).
_UM_PER_RESOLUTION_UNIT = {2: 25400.0, 3: 10000.0, 4: 1000.0, 5: 1.0}


class NoTissueError(ValueError):
    """The tissue mask of a slide is empty: there is nothing to segment."""


class ImageSource:
    """An image readable region by region, at one or more pyramid levels (level 0 = full resolution).

    Attributes:
        name: what error messages call it (the file path).
        level_dims: ``(height, width)`` of every level.
        mpp: microns per pixel at level 0, when the file says it (else None; see the module docstring).
        mpp_source: where ``mpp`` came from ("aperio", "ome", "tiff-resolution", "imagej", "tiffslide", "openslide").
        magnification: objective power at level 0 (e.g. 40), when the file says it or its pixel size gives it.
        magnification_source: "aperio", "ome", "tiffslide", "openslide" or "derived" (from ``mpp``).
        warnings: conversions made to get RGB uint8 (grey, RGBA, 16-bit), non-square pixels, a level chosen from a
            derived magnification: one line each.
    """

    name: str = "<image>"
    level_dims: list[tuple[int, int]]
    mpp: float | None = None
    mpp_source: str | None = None
    magnification: float | None = None
    magnification_source: str | None = None

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

    def level_mpp(self, level: int) -> float | None:
        """Microns per pixel of ``level`` (level 0's times the level's downsample), if known."""
        return None if self.mpp is None else self.mpp * self.downsample(self.check_level(level))

    def level_for_magnification(self, magnification: float) -> int:
        """The level whose magnification is closest to ``magnification`` (needs the file's objective power or pixel
        size). A level chosen from a derived magnification is reported in :attr:`warnings` (it is a convention)."""
        if self.magnification is None:
            raise ImageReadError(f"{self.name}: the file records neither its magnification nor its pixel size "
                                 "(no Aperio, OME or microscope-range TIFF resolution metadata); choose a level "
                                 "(--level) instead")
        mags = [self.magnification / self.downsample(i) for i in range(self.level_count)]
        level = int(np.argmin([abs(math.log(m / magnification)) for m in mags]))
        if self.magnification_source == "derived":
            note = (f"{self.name}: magnification {self.magnification:.3g}x derived from the pixel size "
                    f"({self.mpp:.4g} µm/px; {MAGNIFICATION_TIMES_MPP:g} / mpp), level {level} chosen on that basis")
            if note not in self.warnings:
                self.warnings.append(note)
        return level

    def _set_scale(self, mpp: float | None, mpp_source: str | None, magnification: float | None,
                   magnification_source: str | None) -> None:
        """Record the pixel size and magnification; derive the magnification from the pixel size when missing."""
        self.mpp, self.mpp_source = (mpp, mpp_source) if mpp else (None, None)
        if magnification:
            self.magnification, self.magnification_source = magnification, magnification_source
        elif self.mpp:
            self.magnification, self.magnification_source = MAGNIFICATION_TIMES_MPP / self.mpp, "derived"
        else:
            self.magnification, self.magnification_source = None, None

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
        self._parse_metadata(first)

    def _parse_metadata(self, page: Any) -> None:
        """Pixel size and magnification of level 0, in the order of precedence of the module docstring."""
        desc = page.description or ""
        mpp, mpp_y, mpp_source, mag, mag_source = None, None, None, None, None
        m = re.search(r"MPP\s*=\s*([0-9.]+)", desc)
        if m and _positive(m.group(1)):
            mpp, mpp_source = _positive(m.group(1)), "aperio"
        m = re.search(r"AppMag\s*=\s*([0-9.]+)", desc)
        if m and _positive(m.group(1)):
            mag, mag_source = _positive(m.group(1)), "aperio"
        if self._tf.is_ome and (mpp is None or mag is None):
            ome_x, ome_y, ome_mag, notes = _ome_scale(self._tf.ome_metadata or "", self.name)
            self.warnings += notes
            if mpp is None and ome_x:
                mpp, mpp_y, mpp_source = ome_x, ome_y, "ome"
            if mag is None and ome_mag:
                mag, mag_source = ome_mag, "ome"
        if mpp is None:
            mpp, mpp_y, mpp_source = _resolution_tags_scale(page, self._tf)
        if mpp and mpp_y and abs(mpp_y / mpp - 1) > 0.01:
            self.warnings.append(f"{self.name}: pixels are not square ({mpp:.4g} x {mpp_y:.4g} µm): µm measurements "
                                 "use the width")
        self._set_scale(mpp, mpp_source, mag, mag_source)

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
        # the libraries convert any resolution tags (tiffslide: 72 dpi -> 352.8 µm/px): the same range check as ours
        mpp = _in_tag_range(_positive(props.get("openslide.mpp-x") or props.get("tiffslide.mpp-x")))
        mag = _positive(props.get("openslide.objective-power") or props.get("tiffslide.objective-power"))
        self._set_scale(mpp, module, mag, module)

    def read_region(self, level: int, top: int, left: int, height: int, width: int) -> np.ndarray:
        ds = self.downsample(self.check_level(level))
        # (openslide's location is in level-0 coordinates, the size in level coordinates)
        img = self._slide.read_region((int(round(left * ds)), int(round(top * ds))), level, (int(width), int(height)))
        return to_rgb_uint8(np.asarray(img), source=self.name)

    def close(self) -> None:
        self._slide.close()


def _positive(value: Any) -> float | None:
    """``value`` as a finite positive float, else None (metadata fields can hold anything)."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v > 0 else None


def _in_tag_range(mpp: float | None) -> float | None:
    return mpp if mpp is not None and TAG_MPP_RANGE[0] <= mpp <= TAG_MPP_RANGE[1] else None


def _length_um(value: Any, unit: Any) -> float | None:
    """A length in microns from a value and an OME/ImageJ unit name (None when either is unusable)."""
    v = _positive(value)
    factor = _UM_PER_UNIT.get(str(unit).strip().lower().replace("\\u00b5", "µ"))
    return v * factor if v is not None and factor is not None else None


def _ome_scale(xml: str, name: str) -> tuple[float | None, float | None, float | None, list[str]]:
    """``(mpp_x, mpp_y, nominal magnification, notes)`` of the first image of an OME-XML document."""
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as e:
        return None, None, None, [f"{name}: unreadable OME-XML ({e}): its pixel size is not used"]

    def local(el: ET.Element) -> str:
        return el.tag.rsplit("}", 1)[-1]

    image = next((el for el in root.iter() if local(el) == "Image"), None)
    if image is None:
        return None, None, None, []
    pixels = next((el for el in image if local(el) == "Pixels"), None)
    notes, sizes = [], []
    for axis in ("X", "Y"):
        value = None if pixels is None else pixels.get(f"PhysicalSize{axis}")
        unit = "µm" if pixels is None else pixels.get(f"PhysicalSize{axis}Unit", "µm")
        size = _length_um(value, unit)
        if value is not None and size is None:
            notes.append(f"{name}: OME PhysicalSize{axis}={value!r} {unit!r} is not a length: pixel size not used")
        sizes.append(size)
    x, y = sizes
    if x is None:
        x, y = y, None
    objectives = [el for el in root.iter() if local(el) == "Objective"]
    ref = next((el.get("ID") for el in image if local(el) == "ObjectiveSettings"), None)
    chosen = [o for o in objectives if o.get("ID") == ref] if ref else objectives if len(objectives) == 1 else []
    mag = _positive(chosen[0].get("NominalMagnification")) if chosen else None
    return x, y, mag, notes


def _resolution_tags_scale(page: Any, tf: Any) -> tuple[float | None, float | None, str | None]:
    """``(mpp_x, mpp_y, source)`` from XResolution/YResolution (pixels per unit) when they give a microscope's pixel
    size (:data:`TAG_MPP_RANGE`); ImageJ's ``unit=`` gives the unit of unit-less tags."""

    def pixels_per_unit(tag_name: str) -> float | None:
        tag = page.tags.get(tag_name)
        try:
            num, den = tag.value
            return _positive(num / den)
        except (AttributeError, TypeError, ValueError, ZeroDivisionError):
            return None

    xres, yres = pixels_per_unit("XResolution"), pixels_per_unit("YResolution")
    if xres is None:
        return None, None, None
    yres = yres or xres
    unit_tag = page.tags.get("ResolutionUnit")
    unit = int(unit_tag.value) if unit_tag is not None else 2  # TIFF 6.0: inch when absent
    if unit in _UM_PER_RESOLUTION_UNIT:
        per, source = _UM_PER_RESOLUTION_UNIT[unit], "tiff-resolution"
    elif unit == 1 and tf.is_imagej and _length_um(1, (tf.imagej_metadata or {}).get("unit")):
        per, source = _length_um(1, tf.imagej_metadata["unit"]), "imagej"
    else:
        return None, None, None  # "no absolute unit": an aspect ratio at most
    x, y = _in_tag_range(per / xres), _in_tag_range(per / yres)
    return (x, y, source) if x and y else (None, None, None)


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
    from ..utils.io import IMAGE_SUFFIXES, _read_raw

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

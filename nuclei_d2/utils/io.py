"""Reading images and label maps forgivingly, and writing outputs atomically.

Real slides come as RGB, RGBA (DSB2018 PNGs), greyscale, 16-bit or palette images; everything downstream wants an
``H x W x 3`` uint8 RGB array, so every reader in the project goes through :func:`read_image_rgb`. Errors name the
file and what is wrong with it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "file_sha256",
    "ImageReadError",
    "atomic_write",
    "IMAGE_SUFFIXES",
    "read_image_rgb",
    "read_image_size",
    "read_json",
    "read_label_map",
    "to_rgb_uint8",
    "write_json_atomic",
    "write_label_map",
]

_LABEL_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
#: Image file suffixes the converters and readers look for (lower case).
IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")


class ImageReadError(ValueError):
    """An image or label file could not be read or has an unusable layout. The message names the file."""


def to_rgb_uint8(image: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Convert grey / grey+alpha / RGB / RGBA, uint8 / uint16 / float images to ``H x W x 3`` uint8 RGB.

    16-bit images are scaled by their dtype range (``>> 8``), floats in [0, 1] by 255; alpha is dropped.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise ImageReadError(f"{source}: expected a 2-D image (H x W or H x W x C), got shape {img.shape}")
    c = img.shape[2]
    if c in (1, 2):  # grey, grey + alpha
        img = np.repeat(img[:, :, :1], 3, axis=2)
    elif c >= 3:  # RGB, RGBA (alpha dropped); more channels are not an image we understand
        if c > 4:
            raise ImageReadError(f"{source}: {c} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)")
        img = img[:, :, :3]
    if img.dtype == np.uint8:
        return np.ascontiguousarray(img)
    if img.dtype == np.uint16:
        return np.ascontiguousarray((img >> 8).astype(np.uint8))
    if img.dtype == bool:
        return np.ascontiguousarray(img.astype(np.uint8) * 255)
    if np.issubdtype(img.dtype, np.floating):
        finite = img[np.isfinite(img)]
        if finite.size and (finite.min() < 0 or finite.max() > 255):
            raise ImageReadError(f"{source}: float image with values outside [0, 255] ({finite.min()}..{finite.max()})")
        scale = 255.0 if (finite.size == 0 or finite.max() <= 1.0) else 1.0
        return np.ascontiguousarray(np.clip(np.nan_to_num(img) * scale + 0.5, 0, 255).astype(np.uint8))
    if np.issubdtype(img.dtype, np.integer):
        if img.min() < 0 or img.max() > 255:
            raise ImageReadError(f"{source}: integer image of dtype {img.dtype} with values outside 0..255")
        return np.ascontiguousarray(img.astype(np.uint8))
    raise ImageReadError(f"{source}: unsupported pixel type {img.dtype}")


def _read_raw(path: Path) -> np.ndarray:
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix in (".tif", ".tiff"):
        import tifffile

        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode in ("I;16", "I;16B", "I;16L"):
            return np.array(im, dtype=np.uint16)
        elif im.mode == "CMYK":
            im = im.convert("RGB")
        return np.array(im)


def read_image_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``H x W x 3`` uint8 RGB (see :func:`to_rgb_uint8` for the conversions)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        raw = _read_raw(path)
    except Exception as e:  # PIL/tifffile raise many types for corrupt files
        raise ImageReadError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    return to_rgb_uint8(raw, source=str(path))


def read_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header only (no pixel decoding: ~0.3 ms for a 1000x1000 TIFF).

    Checks that the layout is one :func:`read_image_rgb` accepts (2-D, 1-4 channels), so a converter can record the
    size without decoding every tile and still fail early, naming the file, on something that is not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            shape = tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            with tifffile.TiffFile(path) as tf:
                page = tf.pages[0]
                h, w, c = int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel)
            shape = (h, w) if c == 1 else (h, w, c)
        else:
            from PIL import Image

            with Image.open(path) as im:
                w, h = im.size
                c = len(im.getbands())
            shape = (h, w) if c == 1 else (h, w, c)
    except Exception as e:  # PIL/tifffile raise many types for corrupt files
        raise ImageReadError(f"{path}: cannot read image header ({type(e).__name__}: {e})") from e
    if len(shape) not in (2, 3) or shape[0] == 0 or shape[1] == 0 or (len(shape) == 3 and not 1 <= shape[2] <= 4):
        raise ImageReadError(f"{path}: expected a 2-D image with 1-4 channels, got shape {shape}")
    return int(shape[0]), int(shape[1])


def read_label_map(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """Read an instance label map (PNG/TIFF/NPY of integers, 0 = background) as a 2-D int32 array.

    Args:
        shape: if given, the ``(height, width)`` the label map must have (e.g. its image's size).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: label file not found")
    if path.suffix.lower() not in _LABEL_SUFFIXES:
        raise ImageReadError(f"{path}: unsupported label format {path.suffix!r}; use one of {_LABEL_SUFFIXES}")
    try:
        raw = _read_raw(path)
    except Exception as e:
        raise ImageReadError(f"{path}: cannot read label map ({type(e).__name__}: {e})") from e
    raw = np.asarray(raw)
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    if raw.ndim != 2:
        raise ImageReadError(f"{path}: a label map must be single-channel, got shape {raw.shape}")
    if np.issubdtype(raw.dtype, np.floating):
        if not np.all(np.mod(raw, 1) == 0):
            raise ImageReadError(f"{path}: label map holds non-integer values")
    elif not (np.issubdtype(raw.dtype, np.integer) or raw.dtype == bool):
        raise ImageReadError(f"{path}: label map has unsupported dtype {raw.dtype}")
    if raw.size and (raw.min() < 0 or raw.max() > np.iinfo(np.int32).max):
        raise ImageReadError(f"{path}: label values must be in 0..2^31-1, got {raw.min()}..{raw.max()}")
    if shape is not None and tuple(raw.shape) != tuple(shape):
        raise ImageReadError(f"{path}: label map is {raw.shape[0]}x{raw.shape[1]} but its image is "
                             f"{shape[0]}x{shape[1]}")
    return raw.astype(np.int32)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (zoo entries, export sidecars)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: str | os.PathLike, what: str = "JSON file", error: type[Exception] = ValueError,
              missing: type[Exception] = FileNotFoundError) -> Any:
    """Parse a JSON file; every way it can fail is one line naming the file.

    Raises:
        missing: ``"<path>: <what> not found"``.
        error: ``"<path>: is a folder, not a <what>"`` or ``"<path>: not valid JSON (<parser message>)"`` (also for
            bytes that are not UTF-8). Callers pass their own error types (e.g. ``ConversionError``) so a tool's
            ``except`` clause stays the same.
    """
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise missing(f"{path}: {what} not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, not a {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Signals whose Python handlers may raise (KeyboardInterrupt, SystemExit from a SIGTERM handler): held back while
# atomic_write creates its temporary file, so a handler never runs between its creation and the cleanup's try.
_DEFERRED_SIGNALS = frozenset(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))


def _hold_signals() -> set | None:
    """Block :data:`_DEFERRED_SIGNALS` for this thread; the previous mask, or None where masks do not exist."""
    if not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED_SIGNALS)


def _release_signals(old_mask: set | None) -> None:
    if old_mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` only if it succeeded.

    The temporary file sits in the same folder (so the rename is atomic) and keeps ``path``'s suffix (so writers
    that choose a format by extension still work). A failed or interrupted write leaves ``path`` untouched and no
    temporary file behind: interrupt signals are held back while the file is created, and delivered (their handlers
    run) only once its cleanup is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Named before it exists: a handler that runs at any point below (another thread may take a signal that this
    # thread holds back, and Python then runs the handler here at once) finds the file to remove.
    tmp_path = path.parent / f".{path.stem}.{secrets.token_hex(8)}.tmp{path.suffix}"
    old_mask = _hold_signals()
    try:
        os.close(_create_exclusive(tmp_path))
        _release_signals(old_mask)  # a signal that came meanwhile is handled from here on, inside the try
        old_mask = None
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    finally:
        _release_signals(old_mask)
    return path


def _create_exclusive(path: Path) -> int:
    """Create ``path`` (mode 0600, failing if it exists, as ``mkstemp`` does) and return its descriptor."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically."""

    def _write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)

    return atomic_write(path, _write)


def write_label_map(path: str | os.PathLike, label: np.ndarray) -> Path:
    """Write a label map atomically: PNG (uint16, up to 65,535 nuclei), TIFF or NPY (int32) by suffix."""
    path = Path(path)
    label = np.asarray(label)
    suffix = path.suffix.lower()

    def _write(tmp: Path) -> None:
        if suffix == ".npy":
            with open(tmp, "wb") as f:
                np.save(f, label.astype(np.int32))
        elif suffix in (".tif", ".tiff"):
            import tifffile

            tifffile.imwrite(tmp, label.astype(np.int32), compression="zlib")
        elif suffix == ".png":
            if label.max(initial=0) > 65535:
                raise ValueError(f"{path}: {label.max()} exceeds PNG's 16-bit range; write .tif or .npy instead")
            from PIL import Image

            Image.fromarray(label.astype(np.uint16)).save(tmp, format="PNG")
        else:
            raise ValueError(f"{path}: unsupported label format {suffix!r}; use one of {_LABEL_SUFFIXES}")

    return atomic_write(path, _write)


# ---- output locations: checked before any work -----------------------------------------------------------------

def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder where creating ``path`` starts)."""
    cand = path
    while not cand.exists() and cand != cand.parent:
        cand = cand.parent
    return cand


def probe_writable(folder: Path, target: Path, what: str, error: type[Exception] = ValueError) -> None:
    """Create and remove a hidden folder in ``folder``: the only test that also works for root, read-only mounts
    and pseudo file systems (``/proc``), where permission bits say nothing."""
    try:
        probe = tempfile.mkdtemp(prefix=".nuclei_d2_probe_", dir=folder)
    except OSError as e:
        where = "" if folder == target else f" (in {folder})"
        raise error(f"{target}: cannot write the {what} there{where}: {e.strerror or e}") from None
    os.rmdir(probe)


def check_output_dir(path: str | os.PathLike, what: str = "output folder",
                     error: type[Exception] = ValueError) -> Path:
    """Check, before any work, that the folder ``path`` exists or can be created and accepts new files; raises
    ``error`` with one line naming the path otherwise. Creates nothing (the tools call it before reading inputs)."""
    path = Path(os.path.abspath(path))
    try:
        base = nearest_existing(path)
        if not base.is_dir():
            if base == path:
                raise error(f"{path}: the {what} is an existing file, not a folder")
            raise error(f"{path}: cannot create the {what}: {base} is a file, not a folder")
    except OSError as e:
        raise error(f"{path}: cannot check the {what}: {e.strerror or e}") from None
    probe_writable(base, path, what, error)
    return path

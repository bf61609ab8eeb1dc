"""Finished tiles of an input kept on disk, so a killed whole-slide run resumes instead of starting from zero.

A 40x slide is thousands of tiles and hours of CPU. While ``tools/predict.py`` works on an input of more than one
tile, every tile's final nuclei (after the stitching rule, :func:`nuclei_d2.inference.stitching.owned_selection`) are
written to ``<output>/<stem>.partial/tile_<index>.npz`` (atomically: a file that exists is complete), beside a
``manifest.json`` recording what the tiles depend on (input file, level, tile size and overlap, config, weights).
A rerun with the same manifest loads the finished tiles instead of predicting them again; any difference in the
manifest discards the folder and starts over. The folder is removed once the input's outputs are written.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..structures import CropMasks
from ..utils.io import atomic_write, write_json_atomic

__all__ = ["PARTIAL_SUFFIX", "TileStore", "partial_dir"]

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_TILE = re.compile(r"^tile_(\d+)\.npz$")
_MANIFEST = "manifest.json"


def partial_dir(output_dir: str | os.PathLike, stem: str) -> Path:
    """Where the finished tiles of input ``stem`` are kept until it is done."""
    return Path(output_dir) / f"{stem}{PARTIAL_SUFFIX}"


class TileStore:
    """The finished tiles of one input (see the module docstring).

    Args:
        folder: the ``<stem>.partial`` folder (created if needed).
        manifest: JSON-serialisable description of everything the tile results depend on.
        fresh: discard any finished tiles (``--overwrite``).
    """

    def __init__(self, folder: str | os.PathLike, manifest: dict[str, Any], fresh: bool = False):
        self.folder = Path(folder)
        self.manifest = json.loads(json.dumps(manifest))  # the form it takes on disk (lists, not tuples)
        self.reused = 0
        if self.folder.exists() and (fresh or self._stored_manifest() != self.manifest):
            if not fresh:
                logger.info("%s: finished tiles were made with other settings (or another input/model); starting over",
                            self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.done: set[int] = set()
        for p in self.folder.iterdir():
            m = _TILE.match(p.name)
            if m:
                self.done.add(int(m.group(1)))
            elif p.name != _MANIFEST:  # a temporary file of a killed write, or a stray: ours to remove
                if p.is_dir():
                    shutil.rmtree(p)
                else:
                    p.unlink()
        if not (self.folder / _MANIFEST).is_file():
            write_json_atomic(self.folder / _MANIFEST, self.manifest, indent=1)

    def _stored_manifest(self) -> Any:
        try:
            return json.loads((self.folder / _MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def _path(self, index: int) -> Path:
        return self.folder / f"tile_{int(index):06d}.npz"

    def save(self, index: int, crops: CropMasks) -> None:
        """Keep tile ``index``'s final nuclei (binary masks in the image frame)."""
        masks = [np.asarray(m) >= 0.5 for m in crops.masks]
        shapes = np.array([m.shape for m in masks], np.int64).reshape(-1, 2)
        flat = np.concatenate([m.ravel() for m in masks]) if masks else np.zeros(0, bool)

        # Zipped in memory, then written in one call: a signal arriving inside np.savez would otherwise leave a
        # ZipFile over a file atomic_write has closed, whose __del__ prints a traceback at exit.
        buffer = io.BytesIO()
        np.savez_compressed(buffer, image_size=np.asarray(crops.image_size, np.int64), boxes=crops.boxes,
                            scores=crops.scores, classes=crops.classes, shapes=shapes, masks=flat)
        atomic_write(self._path(index), lambda tmp: tmp.write_bytes(buffer.getvalue()))
        self.done.add(int(index))

    def load(self, index: int) -> CropMasks | None:
        """Tile ``index``'s nuclei as saved, or None (and forgotten) if its file cannot be read."""
        path = self._path(index)
        try:
            with np.load(path, allow_pickle=False) as z:
                shapes, flat = z["shapes"], z["masks"]
                ends = np.cumsum(shapes[:, 0] * shapes[:, 1])
                masks = [m.reshape(s).astype(np.float32)
                         for m, s in zip(np.split(flat, ends[:-1]) if len(ends) else [], shapes)]
                crops = CropMasks(tuple(z["image_size"]), z["boxes"], masks, z["scores"], z["classes"])
        except Exception as e:  # a damaged file: predict the tile again
            logger.warning("%s: cannot read a finished tile (%s: %s); predicting it again", path, type(e).__name__, e)
            path.unlink(missing_ok=True)
            self.done.discard(int(index))
            return None
        self.reused += 1
        return crops

    def remove(self) -> None:
        """The input is done: its finished tiles are no longer needed."""
        shutil.rmtree(self.folder, ignore_errors=True)

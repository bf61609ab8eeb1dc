"""A byte-bounded LRU cache of decoded training tiles (image + painted label map) for the dataset mapper.

Training crops a small window (128-256 px) out of a large tile (a 1000x1000 MoNuSeg tile holds ~1,000 nuclei)
every iteration. Decoding the TIFF and painting every annotation into a label map costs ~0.15 s per sample on one
core, about as much as a U-Net step on a 128 px batch, so without a cache the data loader, not the model, sets the
training speed on a CPU. The cache keeps the decoded arrays of recently used tiles in each loader process
(``INPUT.NUCLEI.DECODE_CACHE_MB`` per process) and hands out copies, so augmentations may write into what they get.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["DecodeCache"]


class DecodeCache:
    """LRU cache of tuples of numpy arrays (or None), bounded by their total size in bytes.

    ``get`` returns copies of the stored arrays so callers may modify them; ``put`` stores copies for the same
    reason. An entry larger than the whole budget is not stored. A budget of 0 disables the cache.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Any, tuple[np.ndarray | None, ...]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _size(arrays: tuple[np.ndarray | None, ...]) -> int:
        return sum(a.nbytes for a in arrays if a is not None)

    def get(self, key: Any) -> tuple[np.ndarray | None, ...] | None:
        """Copies of the arrays stored under ``key`` (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return tuple(None if a is None else a.copy() for a in entry)

    def put(self, key: Any, arrays: tuple[np.ndarray | None, ...]) -> None:
        """Store copies of ``arrays`` under ``key``, evicting the least recently used entries to stay in budget."""
        size = self._size(arrays)
        if size > self.max_bytes:
            return
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= self._size(old)
        while self._entries and self.nbytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.nbytes -= self._size(evicted)
        self._entries[key] = tuple(None if a is None else np.array(a, copy=True) for a in arrays)
        self.nbytes += size

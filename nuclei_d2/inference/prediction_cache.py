"""``PredictionCache``: member predictions shared by test-time wrappers of the same models.

Choosing a wrapper's copies or merge (``tools/tune_inference.py``) and comparing ensembles of the same members
(``benchmarks/ensemble.py``) evaluate many wrappers whose members predict the same copies of the same images. With
one cache (:attr:`TestTimeWrapper.prediction_cache <nuclei_d2.inference.test_time.TestTimeWrapper.prediction_cache>`)
each copy is predicted once. Every entry keeps the seconds it took, so a benchmark can report a row's inference time
as if the row had predicted alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from typing import Any

__all__ = ["PredictionCache"]


class PredictionCache:
    """Values by key, each with the seconds it took to compute; counts what was computed and what reused."""

    def __init__(self) -> None:
        self.entries: dict[Hashable, tuple[Any, float]] = {}
        self.computed = 0
        self.reused = 0

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self.entries

    def get(self, key: Hashable, compute: Callable[[], Any]) -> tuple[Any, float, bool]:
        """``(value, seconds it took, computed now)``: the stored value, or ``compute()`` stored under ``key``."""
        hit = self.entries.get(key)
        if hit is not None:
            self.reused += 1
            return hit[0], hit[1], False
        t0 = time.perf_counter()
        value = compute()
        seconds = time.perf_counter() - t0
        self.entries[key] = (value, seconds)
        self.computed += 1
        return value, seconds, True

    def put(self, key: Hashable, value: Any, seconds: float) -> None:
        """Store a value computed elsewhere (kept if ``key`` is already there)."""
        if key not in self.entries:
            self.entries[key] = (value, float(seconds))
            self.computed += 1

"""Counting dense fallbacks: every place sparse attention runs dense instead is counted by reason."""

from __future__ import annotations

import threading
from collections import Counter

from .errors import DenseFallbackError


class FallbackCounter:
    """Thread-safe counts of dense fallbacks per reason (e.g. "min_seq_len")."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def record(self, reason: str, *, strict: bool) -> None:
        if strict:
            raise DenseFallbackError(
                f"sparse attention would fall back to dense ({reason}) and strict mode is on"
            )
        with self._lock:
            self._counts[reason] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()


GLOBAL_FALLBACKS = FallbackCounter()


def fallback_counts() -> dict[str, int]:
    """Dense fallbacks of the functional API in this process, per reason."""
    return GLOBAL_FALLBACKS.counts()


def reset_fallback_counts() -> None:
    GLOBAL_FALLBACKS.reset()

"""Every environment variable sparse_attn reads, in one place, read at call time (never at import).

| variable | values | effect |
|---|---|---|
| ``SPARSE_ATTN_BACKEND`` | ``auto`` (default), ``torch`` | kernel backend when a call passes ``backend="auto"`` |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import BackendError

BACKENDS = ("auto", "torch")


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"


def read_settings() -> Settings:
    backend = os.environ.get("SPARSE_ATTN_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise BackendError(f"SPARSE_ATTN_BACKEND must be one of {BACKENDS}, got {backend!r}")
    return Settings(backend=backend)

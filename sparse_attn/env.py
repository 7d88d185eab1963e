"""Every environment variable sparse_attn reads, in one place, read at call time (never at import).

| variable | values | effect |
|---|---|---|
| ``SPARSE_ATTN_BACKEND`` | ``auto`` (default), ``torch``, ``triton`` | kernel backend when a call passes ``backend="auto"`` |
| ``TRITON_INTERPRET`` | ``1`` | lets the Triton backend run on CPU tensors in Triton's interpreter (tests only) |
| ``SPARSE_ATTN_CONFIG`` | a preset name, a config ``.json`` path or inline JSON | the sparse config of the vLLM plugin when ``--additional-config`` has no ``sparse_attn`` entry |
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import BackendError

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    triton_interpret: bool = False
    vllm_config: str | None = None


def read_settings() -> Settings:
    backend = os.environ.get("SPARSE_ATTN_BACKEND", "auto").strip().lower() or "auto"
    if backend not in BACKENDS:
        raise BackendError(f"SPARSE_ATTN_BACKEND must be one of {BACKENDS}, got {backend!r}")
    config = os.environ.get("SPARSE_ATTN_CONFIG", "").strip() or None
    return Settings(
        backend=backend,
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
        vllm_config=config,
    )

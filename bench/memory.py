"""Peak extra memory of a callable: resident memory (RSS) on Linux, the CUDA allocator's peak on GPU.

Method: collect garbage and return freed heap pages to the OS (``malloc_trim``), read ``VmRSS``,
reset the high-water mark by writing "5" to ``/proc/self/clear_refs``, call the function, read
``VmHWM``. The difference is the peak extra memory the call needed (its output included). Where
``/proc`` or ``clear_refs`` is not available the measurement is ``None``.

glibc's mmap threshold is left alone on purpose: pinning it low would make every large temporary a
fresh mmap (page faults on each call) and slowed the sparse kernels about 2x in the timed runs of
the same process; ``malloc_trim`` before each measurement is enough to return freed heap pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from collections.abc import Callable
from typing import Any

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"
_libc: Any = None
_libc_loaded = False


def _get_libc() -> Any:
    global _libc, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        try:
            name = ctypes.util.find_library("c") or "libc.so.6"
            lib = ctypes.CDLL(name)
            lib.malloc_trim  # noqa: B018 - glibc only
            _libc = lib
        except (OSError, AttributeError):
            _libc = None
    return _libc


def _read_status_kib(key: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def supported() -> bool:
    """True when peak RSS can be measured here (Linux with a writable clear_refs)."""
    return sys.platform.startswith("linux") and _read_status_kib("VmHWM") is not None and _reset_hwm()


def peak_extra_rss(fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """Call ``fn()`` and return ``(result, peak_extra_bytes)``; bytes is None where unsupported."""
    if not sys.platform.startswith("linux"):
        return fn(), None
    gc.collect()
    lib = _get_libc()
    if lib is not None:
        lib.malloc_trim(0)
    if not _reset_hwm():
        return fn(), None
    before = _read_status_kib("VmHWM")  # right after the reset: the current RSS
    if before is None:
        return fn(), None
    result = fn()
    peak = _read_status_kib("VmHWM")
    if peak is None:
        return result, None
    return result, max(0, peak - before) * 1024


def peak_extra_cuda(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Call ``fn()`` on the current CUDA device and return ``(result, peak_extra_bytes)``: the caching
    allocator's high-water mark during the call above what was allocated before it (output included)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    return result, max(0, torch.cuda.max_memory_allocated() - before)

"""Timing, devices and the environment record shared by the benchmarks.

``Timer`` times a callable by wall clock (CPU) or CUDA events (GPU): warmup calls, then timed runs
until a repeat count or a time budget, reported as p20/p50/p80 in milliseconds. ``Device`` is where a
benchmark's tensors live (device type, dtype, attention heads, block size) and which timer each mode
uses. ``environment`` is the record stored at the top of every result file: machine (and GPU),
versions, git commit and a UTC timestamp.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100]) of a non-empty sequence."""
    if not values:
        raise ValueError("values must not be empty")
    xs = sorted(values)
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


@dataclass
class Timing:
    """Times of the timed runs, in milliseconds."""

    samples_ms: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def p20(self) -> float:
        return percentile(self.samples_ms, 20)

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p80(self) -> float:
        return percentile(self.samples_ms, 80)

    def summary(self) -> dict[str, float]:
        return {"p20": round(self.p20, 4), "p50": round(self.p50, 4), "p80": round(self.p80, 4)}


CLOCKS = ("wall", "cuda")
_FLUSH_BUFFERS: dict[tuple[int, str], Any] = {}


@dataclass(frozen=True)
class Timer:
    """How a callable is timed: ``warmup`` untimed calls, then timed calls until ``max_repeats`` runs,
    or earlier once ``budget_s`` seconds of timed runs were spent and ``min_repeats`` runs made.

    ``clock`` "wall" reads ``time.perf_counter`` around each call (CPU ops have finished when they
    return); "cuda" records CUDA events around it and waits for the end event, so a sample is the
    GPU time of the call (launch latency included when the GPU was idle before it). With
    ``flush_bytes`` a buffer that large is zeroed before each timed call, outside the timing, so a
    call reads its inputs from memory rather than from a warm L2 (what a decode step sees in a
    model, where the layers between two steps evict the cache).
    """

    clock: str = "wall"
    warmup: int = 0
    min_repeats: int = 1
    max_repeats: int = 5
    budget_s: float | None = None
    flush_bytes: int = 0

    def __post_init__(self) -> None:
        if self.clock not in CLOCKS:
            raise ValueError(f"clock must be one of {CLOCKS}, got {self.clock!r}")
        if self.max_repeats < 1:
            raise ValueError(f"max_repeats must be >= 1, got {self.max_repeats}")

    def time(self, fn: Callable[[], Any]) -> Timing:
        """Time ``fn()``; the timed runs' samples in ms."""
        for _ in range(max(0, self.warmup)):
            fn()
        start, stop = _cuda_clock() if self.clock == "cuda" else _wall_clock()
        flush = self.flush_buffer()
        timing = Timing(warmup=max(0, self.warmup))
        spent_ms = 0.0
        min_repeats = min(self.min_repeats, self.max_repeats)
        while len(timing.samples_ms) < self.max_repeats:
            if flush is not None:
                flush.zero_()
            mark = start()
            fn()
            ms = stop(mark)
            timing.samples_ms.append(ms)
            spent_ms += ms
            done = len(timing.samples_ms) >= min_repeats
            if self.budget_s is not None and done and spent_ms >= self.budget_s * 1e3:
                break
        return timing

    def describe(self) -> dict[str, Any]:
        """The timer's settings, for a result's config."""
        return {
            "clock": {"wall": "time.perf_counter", "cuda": "CUDA events"}[self.clock],
            "warmup": self.warmup,
            "min_repeats": min(self.min_repeats, self.max_repeats),
            "max_repeats": self.max_repeats,
            "budget_s": self.budget_s,
            "flush_bytes": self.flush_bytes,
        }

    def flush_buffer(self) -> Any:
        """The buffer zeroed before each timed call (None without flushing), one per size and device."""
        if self.flush_bytes <= 0:
            return None
        import torch

        device = "cuda" if self.clock == "cuda" else "cpu"
        key = (self.flush_bytes, device)
        if key not in _FLUSH_BUFFERS:
            _FLUSH_BUFFERS[key] = torch.empty(self.flush_bytes, dtype=torch.int8, device=device)
        return _FLUSH_BUFFERS[key]


def _wall_clock() -> tuple[Callable[[], Any], Callable[[Any], float]]:
    def stop(t0: float) -> float:
        return (time.perf_counter() - t0) * 1e3

    return time.perf_counter, stop


def _cuda_clock() -> tuple[Callable[[], Any], Callable[[Any], float]]:
    import torch

    torch.cuda.synchronize()  # the warmup calls' work must not land in the first sample

    def start() -> Any:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(begin: Any) -> float:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        end.synchronize()
        return float(begin.elapsed_time(end))

    return start, stop


@dataclass(frozen=True)
class Device:
    """Where a benchmark runs: torch device type and dtype, the attention heads and sparse block size,
    and the timer of each mode ("prefill", "decode")."""

    type: str
    dtype: Any  # a torch.dtype (torch is imported only when a benchmark runs)
    q_heads: int
    kv_heads: int
    head_dim: int
    block: int
    prefill_timer: Timer
    decode_timer: Timer

    def timer(self, mode: str) -> Timer:
        return self.prefill_timer if mode == "prefill" else self.decode_timer

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def qkv(self, batch: int, sq: int, skv: int, seed: int) -> tuple[Any, Any, Any]:
        """Random q [B, Hq, sq, D], k and v [B, Hkv, skv, D] from a generator on the device."""
        import torch

        g = torch.Generator(device=self.type).manual_seed(seed)

        def randn(heads: int, length: int) -> torch.Tensor:
            size = (batch, heads, length, self.head_dim)
            return torch.randn(*size, generator=g, device=self.type, dtype=self.dtype)

        return randn(self.q_heads, sq), randn(self.kv_heads, skv), randn(self.kv_heads, skv)

    def shape(self, batch: int, sq: int, skv: int) -> dict[str, Any]:
        """A row's ``shape`` record."""
        return {
            "B": batch,
            "Hq": self.q_heads,
            "Hkv": self.kv_heads,
            "Sq": sq,
            "Skv": skv,
            "D": self.head_dim,
            "dtype": self.dtype_name,
        }

    def sync(self) -> None:
        """Wait for the device's queued work (a no-op on CPU, whose ops finish before they return)."""
        if self.type == "cuda":
            import torch

            torch.cuda.synchronize()

    def release(self) -> None:
        """Hand cached device memory back between lengths (the CUDA caching allocator keeps it)."""
        if self.type == "cuda":
            import torch

            torch.cuda.empty_cache()

    def peak_extra_memory(self, fn: Callable[[], Any]) -> tuple[Any, int | None]:
        """``(fn(), peak extra bytes)``: resident memory on CPU, the CUDA allocator's peak on GPU."""
        from . import memory

        return memory.peak_extra_cuda(fn) if self.type == "cuda" else memory.peak_extra_rss(fn)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def load_avg() -> list[float] | None:
    """1/5/15-minute load averages: other work on the machine skews the timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _busy_jiffies() -> tuple[int, int] | None:
    """(busy jiffies of the whole machine, jiffies used by this process), Linux only."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = fh.readline().split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        with open("/proc/self/stat", encoding="ascii") as fh:
            own = fh.read().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq + steal, int(own[11]) + int(own[12])
    except (OSError, ValueError, IndexError):
        return None


class OtherLoad:
    """How busy the rest of the machine was between ``start()`` and ``stop()``.

    ``stop()`` returns the CPU time used by other processes as a fraction of all cores over the
    interval (0 = this benchmark had the machine to itself), or None where unsupported. Other work
    skews every timing, so the result files record it.
    """

    def __init__(self) -> None:
        self._start: tuple[int, int] | None = None
        self._t0 = 0.0

    def start(self) -> None:
        self._start = _busy_jiffies()
        self._t0 = time.perf_counter()

    def stop(self) -> float | None:
        end = _busy_jiffies()
        wall = time.perf_counter() - self._t0
        cores = os.cpu_count() or 1
        if self._start is None or end is None or wall <= 0:
            return None
        hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        other = (end[0] - self._start[0]) - (end[1] - self._start[1])
        return round(max(0.0, other / hz / (wall * cores)), 4)


def git_commit(path: str | os.PathLike[str] | None = None) -> str:
    """``git rev-parse HEAD`` of the checkout holding ``path`` (default: this package), or "unknown"."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = res.stdout.strip()
    return sha if res.returncode == 0 and sha else "unknown"


def _sparse_attn_version() -> str:
    try:
        from importlib.metadata import version

        return version("sparse-attn")
    except Exception:  # not installed, e.g. run from a checkout on sys.path
        pass
    try:
        import sparse_attn

        return str(getattr(sparse_attn, "__version__", "unknown"))
    except Exception:
        return "unknown"


def environment(device_type: str = "cpu") -> dict[str, Any]:
    """The environment record: machine, versions, commit, UTC timestamp; on "cuda" also the GPU and
    the CUDA, Triton and flash-attn versions."""
    import torch

    env: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpu_model": _cpu_model(),
            "cores": os.cpu_count(),
            "usable_cores": _usable_cores(),
            "torch_threads": torch.get_num_threads(),
            "load_avg": load_avg(),
        },
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "sparse_attn": _sparse_attn_version(),
        "git_commit": git_commit(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
        }
        env["cuda"] = torch.version.cuda
        env["triton"] = _optional_version("triton")
        env["flash_attn"] = _optional_version("flash_attn")
    return env


def _optional_version(module: str) -> str | None:
    """The version of an optional package, None when it is not installed."""
    import importlib

    try:
        return str(getattr(importlib.import_module(module), "__version__", "unknown"))
    except ImportError:
        return None


def slug(name: str) -> str:
    """``name`` in lower case with every run of other characters than letters and digits as one '-'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def default_json_path(stem: str, quick: bool = False) -> Path:
    """``bench/results/<stem>-<UTC date>[-quick].json``."""
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return Path("bench") / "results" / f"{stem}-{date}{'-quick' if quick else ''}.json"


def short_error(exc: BaseException, limit: int = 200) -> str:
    """One line naming an exception, for a row's status."""
    text = str(exc).strip().splitlines()
    msg = f"{type(exc).__name__}: {text[0] if text else ''}".strip()
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def finite(x: Any) -> Any:
    """Make a value JSON-safe: non-finite floats become None (recursively)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (int, str)):
        return finite(x.tolist())
    return x


def method_params(method: Any) -> dict[str, Any]:
    """A method's parameters for a row: its to_dict(), or its dataclass fields."""
    try:
        d = dict(method.to_dict())
    except Exception:  # a method without to_dict still gets a row
        d = (
            {f.name: getattr(method, f.name) for f in dataclasses.fields(method)}
            if dataclasses.is_dataclass(method)
            else {}
        )
    return finite(d)


def write_json(result: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a result document (non-finite floats as null; parent folders created); returns the path."""
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return out

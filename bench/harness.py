"""Timing and environment record shared by the benchmarks.

``time_callable`` runs a callable ``warmup`` times untimed, then up to ``repeats`` timed runs (fewer
when a per-case time budget runs out, never fewer than ``min_repeats``), and reports the p20/p50/p80
of the timed runs in milliseconds. ``environment`` is the record stored at the top of every result
file: machine, versions, git commit and a UTC timestamp.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
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
    """Wall-clock times of the timed runs, in milliseconds."""

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


def time_callable(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    min_repeats: int = 1,
    budget_s: float | None = None,
) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then timed calls.

    Timed calls stop after ``repeats`` runs, or earlier once ``budget_s`` seconds of timed runs have
    elapsed and at least ``min_repeats`` runs were made.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    timing = Timing(warmup=max(0, warmup))
    spent = 0.0
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        timing.samples_ms.append(dt * 1e3)
        spent += dt
        if budget_s is not None and i + 1 >= min_repeats and spent >= budget_s:
            break
    return timing


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


def environment() -> dict[str, Any]:
    """The environment record: machine, versions, commit, UTC timestamp."""
    import torch

    return {
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

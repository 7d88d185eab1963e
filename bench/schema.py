"""The result document of the throughput benchmark, the same on every device, and the readers of
older documents.

A document: ``schema_version``, ``benchmark`` ("throughput"), ``device`` ("cpu" / "cuda"), ``env``,
``config``, ``wall_time_s``, ``rows``, ``goals`` (and, on GPU, ``copy_bandwidth``). Every row has
``ROW_FIELDS``; the fields derived from several rows (speedups, TFLOP/s, bandwidth) are filled in by
``add_derived`` once the run is over.

Version 1 came in three kinds: the CPU ``throughput`` document (version 2 is a superset of it), the
GPU prefill ``kernels`` document and the GPU ``kernels-decode`` document (``environment`` for
``env``, one ``goal``, rows without ``length``). ``upgrade`` reads each of them as version 2 without
changing what they recorded.
"""

from __future__ import annotations

import copy
from typing import Any

SCHEMA_VERSION = 2
ROW_FIELDS = (
    "op",
    "method",
    "label",
    "params",
    "mode",
    "length",
    "shape",
    "density",
    "target_density",
    "time_ms",
    "speedup_vs_dense",
    "peak_extra_mem_bytes",
    "status",
)
DENSE_OP = "sdpa"  # the speedup baseline of every row: dense SDPA at the same mode, length and batch
FLEX_OP = "flex_attention"


def new_row(
    op: str, method: str, label: str, mode: str, shape: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """A row with every field of ``ROW_FIELDS`` (unmeasured ones None), status "ok"."""
    row: dict[str, Any] = {
        "op": op,
        "method": method,
        "label": label,
        "params": {},
        "mode": mode,
        "length": shape["Skv"],
        "shape": shape,
        "density": None,
        "target_density": None,
        "time_ms": None,
        "speedup_vs_dense": None,
        "peak_extra_mem_bytes": None,
        "status": "ok",
    }
    row.update(extra)
    return row


def p50(row: dict[str, Any]) -> float | None:
    return row["time_ms"]["p50"] if row.get("time_ms") else None


def has_failures(result: dict[str, Any]) -> bool:
    """True when a row failed its correctness check or errored ('unsupported' and 'skipped' rows,
    an optional baseline that cannot run here, do not count)."""
    return any(r["status"].startswith(("failed", "error")) for r in result["rows"])


def add_derived(rows: list[dict[str, Any]], sparse_op: str, copy_gbps: float | None = None) -> None:
    """Fill in what compares rows of the same run: ``speedup_vs_dense`` (and ``kernel_speedup_vs_dense``
    from device times) against dense SDPA at the same mode, length and batch; ``speedup_vs_flex`` of
    a ``sparse_op`` row against FlexAttention on the same case; ``tflops_effective`` of prefill rows
    (4 * D * attended pairs: QK^T and PV); ``achieved_GBps`` (bytes / kernel time),
    ``achieved_GBps_eager`` (bytes / p50) and ``bw_fraction`` (of ``copy_gbps``) of rows with bytes."""

    def key(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["mode"], r["length"], r["shape"]["B"]

    dense = {key(r): r for r in rows if r["op"] == DENSE_OP and r["status"] == "ok" and p50(r)}
    flex = {(key(r), r["method"], r["label"]): p50(r) for r in rows if r["op"] == FLEX_OP and p50(r)}
    for r in rows:
        t = p50(r) if r["status"] == "ok" else None
        base = dense.get(key(r))
        r["speedup_vs_dense"] = round(p50(base) / t, 3) if t and base else None
        if r.get("kernel_ms") and base and base.get("kernel_ms"):
            r["kernel_speedup_vs_dense"] = round(base["kernel_ms"] / r["kernel_ms"], 3)
        fx = flex.get((key(r), r["method"], r["label"]))
        r["speedup_vs_flex"] = round(fx / t, 3) if t and fx and r["op"] == sparse_op else None
        if r["mode"] == "prefill" and t and r.get("density"):
            s = r["shape"]
            pairs = r["density"] * s["B"] * s["Hq"] * s["Sq"] * (s["Sq"] + 1) / 2
            r["tflops_effective"] = _significant(4.0 * s["D"] * pairs / (t * 1e-3) / 1e12)
        if r.get("bytes") and t:
            r["achieved_GBps_eager"] = _significant(r["bytes"] / (t * 1e-3) / 1e9)
            if r.get("kernel_ms"):
                gbps = r["bytes"] / (r["kernel_ms"] * 1e-3) / 1e9
                r["achieved_GBps"] = _significant(gbps)
                if copy_gbps:
                    r["bw_fraction"] = round(gbps / copy_gbps, 3)


def _significant(x: float) -> float:
    """Four significant digits: TFLOP/s and GB/s span from the CPU interpreter's 1e-5 to a GPU's 1e3."""
    return float(f"{x:.4g}")


# ----------------------------------------------------------------------------------------------
# older documents


def upgrade(result: dict[str, Any]) -> dict[str, Any]:
    """A benchmark document as the current version (a copy; a current or unknown one is returned
    as it is)."""
    if result.get("schema_version", 1) >= SCHEMA_VERSION:
        return result
    kind = result.get("benchmark")
    if kind == "kernels":
        return _upgrade_kernels(copy.deepcopy(result))
    if kind == "kernels-decode":
        return _upgrade_kernels_decode(copy.deepcopy(result))
    return result  # the CPU throughput document of version 1 reads as version 2


def _upgrade_kernels(doc: dict[str, Any]) -> dict[str, Any]:
    config = doc["config"]
    config["shape"] = {**config["shape"], "block_size": config.get("block_size")}
    config["prefill_lengths"] = config.get("lengths", [])
    thresholds = {
        "prefill_speedup_vs_dense": 0.8,
        "prefill_faster_than_flex": 1.0,
    }  # as their descriptions say
    for name, g in doc["goals"].items():
        g.setdefault("threshold", thresholds.get(name))
    doc.update(schema_version=SCHEMA_VERSION, benchmark="throughput", device="cuda")
    return doc


def _upgrade_kernels_decode(doc: dict[str, Any]) -> dict[str, Any]:
    config = doc["config"]
    env = doc.pop("environment")
    gpu = env.get("gpu", {})
    env["gpu"] = {
        "name": gpu.get("name"),
        "capability": gpu.get("capability"),
        "multiprocessors": gpu.get("sm_count"),
        "memory_gib": gpu.get("memory_GiB"),
    }
    for r in doc["rows"]:
        shape = r["shape"]
        shape["Skv"] = shape.pop("kv_len")
        shape["dtype"] = "bfloat16" if shape["dtype"] == "bf16" else shape["dtype"]
        r["length"] = shape["Skv"]
        r["target_density"] = r["density"]
        r["label"] = f"1/{round(1 / r['density'])} {r['cache']}" if r["density"] < 1 else r["cache"]
        r.setdefault("peak_extra_mem_bytes", None)
        r.setdefault("params", {})
    goal = doc.pop("goal")
    doc.update(
        schema_version=SCHEMA_VERSION,
        benchmark="throughput",
        device="cuda",
        env=env,
        wall_time_s=doc.get("wall_time_s"),
        config={
            "shape": {
                "B": 1,
                "Hq": config["Hq"],
                "Hkv": config["Hkv"],
                "D": config["D"],
                "dtype": "bfloat16",
                "block_size": config["block_k"],
            },
            "prefill_lengths": [],
            "decode_lengths": config["lengths"],
            "decode_batches": config["batches"],
            "decode_fractions": config["fractions"],
            "recorded": config,
        },
        goals={"decode_bandwidth": _decode_bandwidth_goal_v1(goal)},
    )
    return doc


def _decode_bandwidth_goal_v1(goal: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": "median bandwidth of the timed Triton sparse decode rows is >= "
        f"{goal['goal_bw_fraction']} of the device's copy bandwidth",
        "threshold": goal["goal_bw_fraction"],
        "rows": [],
        "value": goal.get("median"),
        "met": goal["met"] if goal.get("rows") else None,
        "recorded": goal,
    }

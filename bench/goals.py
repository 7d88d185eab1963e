"""The issues' performance goals, judged on a run's rows.

Every goal: ``description``, ``threshold``, ``metric`` (the row field it is judged on), ``rows``
(the rows judged, a few fields each), ``value`` (the worst row, or the median where the goal says
so; None unless every judged row has one) and ``met`` (True / False, None when the run did not
measure it). The CPU goals are issue 2's, the Quest, Loki and MagicPIG decode goals and issue 13's; the GPU goals are the Triton
kernels' prefill targets and decode bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

Row = dict[str, Any]

GOAL_PREFILL = {"length": 16384, "target_density": 0.10, "min_speedup": 5.0}
GOAL_DECODE = {"length": 65536, "target_density": 1.0 / 16, "min_speedup": 8.0}
GOAL_QUEST = {"length": 65536, "target_density": 0.05, "min_speedup": 4.0}
# issue 14: Loki at 5% and MagicPIG at its defaults, selection included
GOAL_LOKI = {"length": 65536, "target_density": 0.05, "min_speedup": 2.5}
GOAL_MAGICPIG = {"length": 65536, "min_speedup": 3.0}
GOAL_MEMORY = {"length": 32768, "max_ratio": 2.0}
# issue 13: the CPU fast path
GOAL_PREFILL_FAST = {"length": 16384, "target_density": 0.10, "min_speedup": 6.0}
GOAL_PREFILL_FLEX = {"lengths": (16384, 32768), "target_density": 0.10, "min_ratio": 1.0}
GOAL_DECODE_STEP = {"length": 8192, "target_density": 1.0 / 16, "min_speedup": 5.0}  # ~512 keys
GPU_GOAL_MIN_LENGTH = 32768  # the Triton prefill targets apply from 32k tokens
GPU_GOAL_FACTOR = 0.8  # Triton prefill speedup over dense flash SDPA >= 0.8 / density
GPU_GOAL_BW_FRACTION = 0.7  # median decode bandwidth >= 0.7 of a device-to-device copy's


def goal(
    description: str,
    threshold: float,
    metric: str,
    rows: Sequence[Row],
    fields: Sequence[str],
    *,
    at_least: bool = True,
    value: Callable[[list[float]], float] = min,
    row_met: Callable[[Row], float | None] | None = None,
) -> dict[str, Any]:
    """A goal over ``rows``: each row's ``metric`` (or ``row_met(row)``, the number compared with the
    threshold, recorded under the metric's name) must be >= ``threshold`` (below it with
    ``at_least=False``); ``value`` summarises them."""
    measure = row_met or (lambda r: r.get(metric))
    vals = [measure(r) for r in rows]
    ok = [x is not None and (x >= threshold if at_least else x < threshold) for x in vals]
    return {
        "description": description,
        "threshold": threshold,
        "metric": metric,
        "rows": [{**{f: r.get(f) for f in fields}, metric: x} for r, x in zip(rows, vals)],
        "value": value([x for x in vals if x is not None]) if vals and None not in vals else None,
        "met": None if not rows else all(ok),
    }


def pick(rows: Sequence[Row], mode: str, length: int, target: float, ops: Sequence[str]) -> list[Row]:
    return [
        r
        for r in rows
        if r["mode"] == mode
        and r["length"] == length
        and r["op"] in ops
        and abs((r.get("target_density") or -1) - target) < 1e-9
    ]


def upper_median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


SPEEDUP_FIELDS = ("method", "op", "label", "density", "speedup_vs_dense", "status")


def cpu_goals(rows: Sequence[Row]) -> dict[str, Any]:
    """Issue 2's prefill, decode and memory goals and the Quest decode goal (CPU ops)."""
    bsa, tsa = "block_sparse_attention", "token_sparse_attention"
    quest = [
        r
        for r in pick(rows, "decode", GOAL_QUEST["length"], GOAL_QUEST["target_density"], (tsa,))
        if r["method"] == "quest"
    ]
    memory = [
        r for r in rows if r["mode"] == "prefill" and r["length"] == GOAL_MEMORY["length"] and r["op"] == bsa
    ]
    dense_mem = [
        r.get("peak_extra_mem_ratio")
        for r in rows
        if r["mode"] == "prefill" and r["length"] == GOAL_MEMORY["length"] and r["op"] == "sdpa"
    ]
    mem_goal = goal(
        "peak extra memory of sparse prefill at 32k is below 2x the bytes of q, k, v (every static-method row)",
        GOAL_MEMORY["max_ratio"],
        "peak_extra_mem_ratio",
        memory,
        ("method", "label", "peak_extra_mem_ratio", "status"),
        at_least=False,
        value=max,
    )
    if any(r["status"] != "ok" for r in memory):  # a row that failed cannot meet a memory bound
        mem_goal["met"] = False
    elif mem_goal["met"] is not None and mem_goal["value"] is None:
        mem_goal["met"] = None  # memory not measurable here
    mem_goal["dense_sdpa_ratio"] = dense_mem[0] if dense_mem else None
    return {
        "prefill_16k_10pct_speedup": goal(
            "sparse prefill (block_sparse_attention) at 16k and ~10% density is >= 5x faster than dense "
            "SDPA, for every static method",
            GOAL_PREFILL["min_speedup"],
            "speedup_vs_dense",
            pick(rows, "prefill", GOAL_PREFILL["length"], GOAL_PREFILL["target_density"], (bsa,)),
            SPEEDUP_FIELDS,
        ),
        "decode_64k_1of16_speedup": goal(
            "decode selecting 1/16 of a 64k cache is >= 8x faster than dense SDPA, for every method",
            GOAL_DECODE["min_speedup"],
            "speedup_vs_dense",
            pick(rows, "decode", GOAL_DECODE["length"], GOAL_DECODE["target_density"], (bsa, tsa)),
            SPEEDUP_FIELDS,
        ),
        "quest_decode_64k_5pct_speedup": goal(
            "Quest decode over a 64k cache at 5% density, selection included (side-data update, bounds, "
            "top blocks, token-sparse attention), is >= 4x faster than dense SDPA",
            GOAL_QUEST["min_speedup"],
            "speedup_vs_dense",
            quest,
            SPEEDUP_FIELDS,
        ),
        "loki_decode_64k_5pct_speedup": goal(
            "Loki decode over a 64k cache at 5% density (rank 24 of 64), selection included (side-data "
            "update, low-rank scores, top-k, token-sparse attention), is >= 2.5x faster than dense SDPA",
            GOAL_LOKI["min_speedup"],
            "speedup_vs_dense",
            [
                r
                for r in pick(rows, "decode", GOAL_LOKI["length"], GOAL_LOKI["target_density"], (tsa,))
                if r["method"] == "loki"
            ],
            SPEEDUP_FIELDS,
        ),
        "magicpig_decode_64k_speedup": goal(
            "MagicPIG decode over a 64k cache at its defaults (K=10, L=150), selection included (side-data "
            "update, collisions, sample weights, weighted token-sparse attention), is >= 3x faster than "
            "dense SDPA",
            GOAL_MAGICPIG["min_speedup"],
            "speedup_vs_dense",
            [
                r
                for r in rows
                if r["mode"] == "decode" and r["length"] == GOAL_MAGICPIG["length"] and r["method"] == "magicpig"
            ],
            SPEEDUP_FIELDS,
        ),
        "prefill_32k_extra_memory": mem_goal,
        **fast_path_goals(rows),
    }


def fast_path_goals(rows: Sequence[Row]) -> dict[str, Any]:
    """Issue 13's kernel goals: prefill at 16k/10% >= 6x dense SDPA and at least as fast as compiled
    FlexAttention with the same mask at 16k and 32k, for every static method; one decode step over
    ~512 selected keys of an 8k cache >= 5x dense SDPA (every static and random-key row at 1/16)."""
    bsa, tsa = "block_sparse_attention", "token_sparse_attention"
    flexed = [
        r
        for n in GOAL_PREFILL_FLEX["lengths"]
        for r in pick(rows, "prefill", n, GOAL_PREFILL_FLEX["target_density"], (bsa,))
    ]
    return {
        "prefill_16k_10pct_6x": goal(
            "sparse prefill at 16k and ~10% density is >= 6x faster than dense SDPA, for every static method",
            GOAL_PREFILL_FAST["min_speedup"],
            "speedup_vs_dense",
            pick(rows, "prefill", GOAL_PREFILL_FAST["length"], GOAL_PREFILL_FAST["target_density"], (bsa,)),
            SPEEDUP_FIELDS,
        ),
        "prefill_10pct_vs_flex": goal(
            "sparse prefill at 16k and 32k, ~10% density, is at least as fast as compiled FlexAttention "
            "with the same block mask, for every static method",
            GOAL_PREFILL_FLEX["min_ratio"],
            "speedup_vs_flex",
            flexed,
            ("method", "length", "label", "density", "speedup_vs_flex", "status"),
        ),
        "decode_8k_512_keys_speedup": goal(
            "one decode step over ~512 selected keys (1/16) of an 8k cache is >= 5x faster than dense "
            "SDPA over the 8k keys, for every static and random-key row",
            GOAL_DECODE_STEP["min_speedup"],
            "speedup_vs_dense",
            pick(rows, "decode", GOAL_DECODE_STEP["length"], GOAL_DECODE_STEP["target_density"], (bsa, tsa)),
            SPEEDUP_FIELDS,
        ),
    }


def gpu_goals(rows: Sequence[Row], sparse_op: str, decode_ops: Sequence[str]) -> dict[str, Any]:
    """The Triton kernels' targets: prefill at >= 32k tokens >= 0.8 / density times dense SDPA (flash)
    and faster than FlexAttention with the identical BlockMask; sparse decode at >= 0.7 of the
    device's copy bandwidth (median over the timed rows)."""
    long = [r for r in rows if r["op"] == sparse_op and r["length"] >= GPU_GOAL_MIN_LENGTH]
    fields = ("length", "method", "label", "density", "speedup_vs_dense", "status")

    def factor(r: Row) -> float | None:  # the speedup in units of 1 / density
        s, d = r.get("speedup_vs_dense"), r.get("density")
        return None if s is None or not d else round(s * d, 4)

    with_flex = [r for r in long if r.get("speedup_vs_flex") is not None]
    decode = [r for r in rows if r["op"] in decode_ops and r.get("bw_fraction")]
    bw = goal(
        f"median bandwidth of the timed sparse decode rows is >= {GPU_GOAL_BW_FRACTION} of the device's "
        "copy bandwidth",
        GPU_GOAL_BW_FRACTION,
        "bw_fraction",
        decode,
        ("length", "op", "label", "shape", "bw_fraction"),
        value=upper_median,
    )
    fractions = [r["bw_fraction"] for r in decode]
    if fractions:  # the goal is on the median, not on every row
        bw["met"] = upper_median(fractions) >= GPU_GOAL_BW_FRACTION
        bw["min"], bw["max"] = min(fractions), max(fractions)
        bw["rows_meeting_goal"] = sum(f >= GPU_GOAL_BW_FRACTION for f in fractions)
    return {
        "prefill_speedup_vs_dense": goal(
            f"Triton prefill at >= {GPU_GOAL_MIN_LENGTH} tokens is >= {GPU_GOAL_FACTOR} / density times "
            "faster than dense SDPA (flash backend)",
            GPU_GOAL_FACTOR,
            "speedup_x_density",
            long,
            fields,
            row_met=factor,
        ),
        "prefill_faster_than_flex": goal(
            "Triton prefill is faster than FlexAttention with the identical BlockMask",
            1.0,
            "speedup_vs_flex",
            with_flex,
            ("length", "method", "label", "speedup_vs_flex", "status"),
        ),
        "decode_bandwidth": bw,
    }

"""The throughput result as tables: the printed text table and the markdown table of
``sparse-attn bench report``, from the same columns, for any device.

The columns every result has come first; a column only some results have (batch, speedup against
FlexAttention, TFLOP/s, bandwidth, memory) is shown when a row has a value for it, so a table shows
what its run measured.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import schema

Row = dict[str, Any]

# op -> (name in the tables, what it is)
OPS = {
    "sdpa": ("dense SDPA", "torch scaled_dot_product_attention"),
    "sdpa_cudnn": ("cuDNN SDPA", "scaled_dot_product_attention, cuDNN backend"),
    "flash_attn": ("flash-attn", "flash_attn_func"),
    "block_sparse_attention": ("sparse", "sparse_attn.block_sparse_attention"),
    "token_sparse_attention": ("token", "sparse_attn.token_sparse_attention"),
    "flex_attention": ("flex", "torch.compile(flex_attention) with the identical block mask"),
    "triton_block_sparse": ("triton", "the Triton block-sparse prefill kernel"),
    "triton_token_decode": ("triton token", "the Triton token-selection decode kernel"),
    "triton_block_decode": ("triton blocks", "the Triton key-block decode kernel"),
}


def op_name(op: str) -> str:
    return OPS.get(op, (op, ""))[0]


def cell(x: Any, spec: str, missing: str = "—") -> str:
    return missing if x is None else format(x, spec)


def ms(x: float) -> str:
    """Milliseconds to two decimals; below 0.1 ms (GPU decode) to four."""
    return format(x, ".2f" if x >= 0.1 else ".4f")


@dataclass(frozen=True)
class Column:
    header: str
    value: Callable[[Row], Any]
    fmt: Callable[[Any], str] = str
    width: int = 8  # in the text table
    left: bool = False  # left-aligned (names) rather than right-aligned (numbers)
    shown: Callable[[Sequence[Row]], bool] | None = None  # None: always


def _any(field: str) -> Callable[[Sequence[Row]], bool]:
    return lambda rows: any(r.get(field) is not None for r in rows)


COLUMNS = (
    Column("mode", lambda r: r["mode"], width=7, left=True),
    Column("length", lambda r: r["length"], width=6),
    Column(
        "B",
        lambda r: r["shape"].get("B"),
        width=2,
        shown=lambda rows: any(r["shape"].get("B") != 1 for r in rows),
    ),
    Column("op", lambda r: op_name(r["op"]), width=13, left=True),
    Column("method", lambda r: r["method"], width=12, left=True),
    Column("pattern", lambda r: r.get("label", ""), width=34, left=True),
    Column("density", lambda r: r["density"], lambda x: format(x, ".3f"), width=7),
    Column("p50 ms", schema.p50, ms, width=9),
    Column("speedup", lambda r: r["speedup_vs_dense"], lambda x: format(x, ".2f"), width=7),
    *(
        Column(
            header,
            lambda r, f=field: r.get(f),
            lambda x, spec=spec: format(x, spec),
            width,
            shown=_any(field),
        )
        for header, field, spec, width in (
            ("mem", "peak_extra_mem_ratio", ".2f", 5),
            ("vs flex", "speedup_vs_flex", ".2f", 7),
            ("TFLOP/s", "tflops_effective", ".3g", 7),
            ("GB/s", "achieved_GBps", ".0f", 6),
            ("of copy", "bw_fraction", ".2f", 7),
        )
    ),
)


def columns(rows: Sequence[Row]) -> list[Column]:
    return [c for c in COLUMNS if c.shown is None or c.shown(rows)]


def machine(env: dict[str, Any]) -> str:
    """The machine a result was measured on: the GPU (with CUDA and Triton) or the CPU (threads)."""
    if env.get("gpu"):
        return f"{env['gpu']['name']} (CUDA {env.get('cuda')}, Triton {env.get('triton')})"
    return f"{env['machine']['cpu_model']} ({env['machine']['torch_threads']} threads)"


def markdown_rows(result: dict[str, Any]) -> list[str]:
    """The markdown table of every row (a row that did not run says why after its pattern)."""
    cols = columns(result["rows"])
    lines = [
        "| " + " | ".join(c.header for c in cols) + " |",
        "|" + "|".join("---" if c.left else "---:" for c in cols) + "|",
    ]
    for r in result["rows"]:
        cells = []
        for c in cols:
            x = c.value(r)
            text = "—" if x is None else c.fmt(x)
            if c.header == "pattern" and r["status"] != "ok":
                text += f" ({r['status'].split(':')[0]})"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown_goals(result: dict[str, Any]) -> list[str]:
    lines = ["| goal | threshold | worst row | met |", "|---|---:|---:|---|"]
    for g in result["goals"].values():
        met = {True: "yes", False: "**no**", None: "not measured"}[g["met"]]
        lines.append(
            f"| {g['description']} | {cell(g.get('threshold'), '')} | {cell(g.get('value'), '.2f')} | {met} |"
        )
    return lines


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one line per row with its status, the ops, the goals, the machine."""
    cols = columns(result["rows"])

    def line(values: Sequence[str]) -> str:
        return " ".join(f"{v:<{c.width}}" if c.left else f"{v:>{c.width}}" for c, v in zip(cols, values))

    def text(c: Column, r: Row) -> str:
        x = c.value(r)
        if c.left:
            return str(x if x is not None else "")[: c.width]
        return "-" if x is None else c.fmt(x)

    head = line([c.header for c in cols]) + "  status"
    lines = [head, "-" * len(head)]
    lines += [line([text(c, r) for c in cols]) + f"  {r['status']}" for r in result["rows"]]
    ops = dict.fromkeys(r["op"] for r in result["rows"])
    lines += ["", "ops: " + "; ".join(f"{op_name(op)} = {OPS.get(op, (op, op))[1]}" for op in ops)]
    if any(c.header == "mem" for c in cols):
        lines.append(
            "mem = peak extra memory / bytes of q, k, v (RSS on CPU, the CUDA allocator's peak on GPU)"
        )
    for name, g in result["goals"].items():
        lines.append(f"goal {name}: {_goal_line(g)}")
    env = result["env"]
    m = env["machine"]
    lines.append(
        f"{machine(env)}, torch {env['torch']}, commit {env['git_commit'][:12]}, {result['wall_time_s']} s, "
        f"load avg {m.get('load_avg')} -> {m.get('load_avg_end')}, other processes used "
        f"{cell(m.get('other_processes_cpu_fraction'), '.0%', '-')} of the CPU"
    )
    return "\n".join(lines)


def _goal_line(g: dict[str, Any]) -> str:
    met = {True: "MET", False: "NOT MET", None: "not measured"}[g["met"]]
    metric = g.get("metric", "speedup_vs_dense")
    rows = g["rows"]
    if len(rows) > 8:  # a goal over many rows (GPU prefill): its worst value stands for them
        per_row = f"{len(rows)} rows, worst {cell(g.get('value'), '.2f', '-')}"
    else:
        per_row = ", ".join(
            f"{op_name(r['op']) + ':' if r.get('op') else ''}{r.get('method', '')}"
            f"{' ' + r['label'].split()[0] if r.get('label') else ''}={cell(r.get(metric), '.2f', '-')}"
            for r in rows
        )
    extra = f"; dense SDPA {g['dense_sdpa_ratio']}" if g.get("dense_sdpa_ratio") is not None else ""
    return f"{met} (threshold {g.get('threshold')}; {per_row or 'no rows'}{extra})"

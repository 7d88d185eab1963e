"""Markdown summaries of benchmark JSON: the README's results table is generated here, never by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from . import schema, table


def markdown_summary(result: dict[str, Any]) -> str:
    """A throughput result of any device and schema version: every row, where a content-based decode
    step's time goes, the goal verdicts and the full-model rows."""
    result = schema.upgrade(result)
    env = result["env"]
    if not result["rows"] and result.get("model"):  # a --model-only run: its full-model rows alone
        return "\n".join(
            [
                f"Measured on {table.machine(env)}, torch {env['torch']}, commit `{env['git_commit'][:12]}`, "
                f"{env['timestamp_utc']}; KV cache: {result['model'].get('cache', 'dynamic')}.",
                "",
                *_model_table(result["model"]),
            ]
        )
    shape = result["config"]["shape"]
    cols = {c.header for c in table.columns(result["rows"])}
    batches = result["config"].get("decode_batches") or [1]
    notes = ["Speedup is dense time / method time in the same run"]
    if "mem" in cols:
        memory = "CUDA memory" if result["device"] == "cuda" else "RSS"
        notes.append(f"mem is peak extra {memory} / bytes of q, k, v")
    if "GB/s" in cols:
        notes.append(
            "GB/s is the bytes a row must read / its device time (of copy: / a device-to-device copy's)"
        )
    lines = [
        f"Measured on {table.machine(env)}, torch {env['torch']}, commit `{env['git_commit'][:12]}`, "
        f"{env['timestamp_utc']}; B={shape['B']}{'' if batches == [1] else f' (decode B={batches})'}, "
        f"Hq={shape['Hq']}, Hkv={shape['Hkv']}, D={shape['D']}, {shape['dtype']}, block {shape['block_size']}. "
        + "; ".join(notes)
        + ".",
        "",
        *table.markdown_rows(result),
    ]
    parts = [r for r in result["rows"] if r.get("breakdown_ms") and r["status"] == "ok"]
    if parts:
        lines += [
            "",
            "Where a content-based decode step's time goes (median ms of each part, timed on its own):",
            "",
        ]
        lines += [
            f"- {r['method']} at {r['length']}: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["breakdown_ms"].items())
            + f" (whole step {r['time_ms']['p50']:.2f})"
            for r in parts
        ]
    lines += ["", *table.markdown_goals(result)]
    if result.get("model"):
        lines += ["", *_model_table(result["model"])]
    return "\n".join(lines)


def _model_table(model: dict[str, Any]) -> list[str]:
    repeats = model.get("repeats")
    if model.get("mode") == "decode_pairs":
        head = (
            f"Full model `{model['spec']}` (`--model`, `--model-decode-pairs {model['pairs']}`): decode only, "
            f"median ms of the decode steps after each run's first, {model['pairs']} pairs of unpatched and "
            f"patched runs of {model['decode_tokens']} tokens from one dense prefill, interleaved; x dense "
            "against the paired unpatched steps; density is the last decode step's."
        )
    else:
        head = (
            f"Full model `{model['spec']}` (`--model`): prefill seconds and decode ms/token"
            + (f", median of {repeats} runs after a warm-up" if repeats else "")
            + "; density is the prefill's measured attention density."
        )
    lines = [
        head,
        "",
        "| length | method | density | prefill s | x dense | decode ms/tok | x dense |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in model["rows"]:
        name = r["method"] if r["status"] == "ok" else f"{r['method']} ({r['status'].split(':')[0]})"
        lines.append(
            f"| {r['length']} | {name} | {table.cell(r.get('density'), '.2f')} | {table.cell(r.get('prefill_s'), '.2f')} "
            f"| {table.cell(r.get('prefill_speedup'), '.2f')} | {table.cell(r.get('decode_ms_per_token'), '.1f')} "
            f"| {table.cell(r.get('decode_speedup'), '.2f')} |"
        )
    return lines


def accuracy_summary(result: dict[str, Any]) -> str:
    """An accuracy result: the run's line, its table, how prompts were split, the density sweep."""
    from .accuracy_report import format_table, sweep_table

    env, cfg = result["env"], result["config"]
    lines = [
        f"Measured on {env['machine']['cpu_model']} ({env['machine']['torch_threads']} threads), torch "
        f"{env['torch']}, commit `{env['git_commit'][:12]}`, {env['timestamp_utc']}; model "
        f"`{cfg['model']}`, {', '.join(str(n) for n in cfg['lengths'])} tokens, depths "
        f"{', '.join(f'{d:g}' for d in cfg['depths'])} x {len(cfg['seeds'])} seeds, "
        f"{result['wall_time_s'] / 60:.0f} minutes.",
        "",
        "```",
        format_table(result, sweep=False),
        "```",
    ]
    if cfg.get("sweep"):
        lines += ["", sweep_table(result, markdown=True)]
    return "\n".join(lines)


def summary_of(result: dict[str, Any]) -> str:
    """The markdown summary of any benchmark result this tool knows."""
    kind = result.get("benchmark")
    if kind == "accuracy":
        return accuracy_summary(result)
    if kind == "quest_bound":
        from .quest_bound import format_overview

        return format_overview(result)
    return markdown_summary(result)


def update_readme(readme: str | Path, result_path: str | Path, block: str = "bench-table") -> None:
    """Replace the block between the ``<!-- block -->`` and ``<!-- /block -->`` markers of ``readme``
    with the summary of a result."""
    start, end = f"<!-- {block} -->", f"<!-- /{block} -->"
    path = Path(readme)
    text = path.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{path} needs the markers {start} and {end}")
    result = json.loads(Path(result_path).read_text())
    body = f"{start}\n{summary_of(result)}\n\nSource: `{Path(result_path).as_posix()}`.\n{end}"
    path.write_text(re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: body, text, flags=re.S))

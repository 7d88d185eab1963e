"""CPU throughput benchmark: dense SDPA against the static sparse patterns (and FlexAttention).

Shape: fp32, B=1, Hq=8, Hkv=2 (GQA group 4), D=64 — dense causal SDPA at 32k takes a few seconds
per run on a 2-core CPU. Two modes:

- prefill (Sq = Skv = N, causal) at 4k/16k/32k: dense ``scaled_dot_product_attention`` against
  SinkLocal, S2, BlockSparse A-shape (each at ~5/10/25% density) and MoA (~10%); each method is
  planned once outside the timing (``method.plan``; the plan time is reported separately) and the
  run step ``block_sparse_attention(q, k, v, layout)`` is timed. FlexAttention
  (``torch.compile(flex_attention)``) runs each method's ~10% layout through a BlockMask built from
  the same layout, when it works on this machine.
- decode (Sq = 1) at 16k/32k/64k cache: dense SDPA against SinkLocal and S2 selecting ~1/16 of the
  cache (block layouts) and ``token_sparse_attention`` over a random TokenSelection of N/16 keys.
  The content-based methods at 5% density, their selection cost included in every timed step:
  TopK (exact scores over all keys + top-k + ``token_sparse_attention``, one
  ``sparse_attention(q, k, v, TopK(density=0.05))`` call) and Quest (the side-data store's update
  for the step's new key — the last block's min/max — then ``sparse_attention(..., side=...)``:
  block bounds, top blocks, the selected keys, ``token_sparse_attention``). Quest's timed steps are
  consecutive decode steps, each one key longer (a store only extends by the keys it has not seen):
  the store is built for the first ``N - steps`` keys outside the timing; after the timed steps,
  ``BREAKDOWN_STEPS`` more time the store update, the selection and the attention one by one
  (``breakdown_ms``), ending at N. TopK's row has the same breakdown (selection, attention).

Before any method is timed it must pass a correctness self-check on a small shape (its kernel
output against the float64 dense reference with ``method.mask()``); a method that fails is reported
with status ``failed-correctness`` and no time. Peak extra memory (RSS high-water mark above the
resident set before the call, the output included) is measured during the first, untimed call.
Speedups are against the dense baseline of the same mode and length in the same run.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import flex as flex_baseline
from . import harness, memory

SCHEMA_VERSION = 1
BATCH, HQ, HKV, HEAD_DIM = 1, 8, 2, 64
DTYPE = torch.float32
BLOCK = 64

DEFAULT_PREFILL_LENGTHS = (4096, 16384, 32768)
DEFAULT_DECODE_LENGTHS = (16384, 32768, 65536)
QUICK_PREFILL_LENGTHS = (512,)
QUICK_DECODE_LENGTHS = (1024,)
DEFAULT_REPEATS = 10
PREFILL_DENSITIES = (0.05, 0.10, 0.25)
DECODE_FRACTION = 1.0 / 16
CASE_BUDGET_S = 4.0  # timed runs stop after this much time once MIN_REPEATS runs were made
MIN_REPEATS = 3
CHECK_PREFILL_LEN = 448  # small shapes of the correctness self-check
CHECK_DECODE_LEN = 1024
CHECK_SEED = 1234
DATA_SEED = 0

GOAL_PREFILL = {"length": 16384, "target_density": 0.10, "min_speedup": 5.0}
GOAL_DECODE = {"length": 65536, "target_density": DECODE_FRACTION, "min_speedup": 8.0}
GOAL_MEMORY = {"length": 32768, "max_ratio": 2.0}
DYNAMIC_DENSITY = 0.05
BREAKDOWN_STEPS = 10  # decode steps whose parts are timed one by one (rows' breakdown_ms)
GOAL_QUEST = {"length": 65536, "target_density": DYNAMIC_DENSITY, "min_speedup": 4.0}

ROW_FIELDS = (
    "op",
    "method",
    "params",
    "mode",
    "shape",
    "density",
    "time_ms",
    "speedup_vs_dense",
    "peak_extra_mem_bytes",
    "status",
)


# ----------------------------------------------------------------------------------------------
# cases: a recipe builds a method config for any length, so the self-check can use the same
# recipe at a small length (a sparse pattern there too) as well as the benchmarked config itself.


@dataclass(frozen=True)
class Case:
    method: str  # method name in the rows
    label: str  # short description for the table
    target_density: float
    build: Callable[[int], Any]  # kv length -> method config
    flex: bool = False  # also run FlexAttention on this case's layout


def _window_fraction(density: float) -> float:
    """Fraction x of N for a causal band of width xN with the given density (d = 2x - x^2)."""
    d = min(max(density, 0.0), 1.0)
    return 1.0 - math.sqrt(1.0 - d)


def _n_blocks(n: int) -> int:
    return max(1, -(-n // BLOCK))


def _prefill_cases() -> list[Case]:
    import sparse_attn as sa

    cases: list[Case] = []
    for d in PREFILL_DENSITIES:
        x = _window_fraction(d)
        cases.append(
            Case(
                "sink_local",
                f"~{d:.0%} sink=4 window={x:.4f}N",
                d,
                lambda n, x=x: sa.SinkLocal(
                    sink_tokens=4, window_tokens=max(1, round(x * n)), block_size=BLOCK
                ),
                flex=d == 0.10,
            )
        )
    for d, vs in zip(PREFILL_DENSITIES, (32, 16, 8)):
        r = max(0.0, (d - 1.0 / vs) / (1.0 - 1.0 / vs))
        xr = _window_fraction(r)
        cases.append(
            Case(
                "s2",
                f"~{d:.0%} vert_stride={vs}",
                d,
                lambda n, vs=vs, xr=xr: sa.S2(
                    block_size=BLOCK, local_blocks=max(1, round(xr * _n_blocks(n) + 0.5)), vert_stride=vs
                ),
                flex=d == 0.10,
            )
        )
    for d in PREFILL_DENSITIES:
        x = _window_fraction(d)
        cases.append(
            Case(
                "block_sparse",
                f"~{d:.0%} A-shape sink_blocks=1",
                d,
                lambda n, x=x: sa.BlockSparse(
                    block_size=BLOCK, sink_blocks=1, local_blocks=max(1, round(x * _n_blocks(n) + 0.5))
                ),
                flex=d == 0.10,
            )
        )
    # MoA: one layer, per-head spans alpha + beta*N spread around the ~10% band (length-elastic:
    # the same config at every length).
    x = _window_fraction(0.10)
    betas = tuple(round(x * (0.6 + 0.8 * h / (HQ - 1)), 5) for h in range(HQ))
    alphas = tuple(64.0 for _ in range(HQ))
    cases.append(
        Case(
            "moa",
            "~10% per-head spans",
            0.10,
            lambda n: sa.MoA(
                alphas=(alphas,), betas=(betas,), sink_tokens=64, min_span=64, block_size=BLOCK
            ).for_layer(0),
            flex=True,
        )
    )
    return cases


def _decode_cases() -> list[Case]:
    import sparse_attn as sa

    f = DECODE_FRACTION
    return [
        Case(
            "sink_local",
            "1/16 sink=4 window=N/16",
            f,
            lambda n: sa.SinkLocal(sink_tokens=4, window_tokens=max(1, round(n * f)), block_size=BLOCK),
        ),
        Case(
            # selected blocks ~ L + (nb - L)/32 = nb/16  ->  L = nb/31
            "s2",
            "1/16 vert_stride=32 local=N/31",
            f,
            lambda n: sa.S2(block_size=BLOCK, local_blocks=max(1, round(_n_blocks(n) / 31)), vert_stride=32),
        ),
    ]


# ----------------------------------------------------------------------------------------------
# helpers


def _qkv(sq: int, skv: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(BATCH, HQ, sq, HEAD_DIM, generator=g, dtype=DTYPE)
    k = torch.randn(BATCH, HKV, skv, HEAD_DIM, generator=g, dtype=DTYPE)
    v = torch.randn(BATCH, HKV, skv, HEAD_DIM, generator=g, dtype=DTYPE)
    return q, k, v


def _shape(sq: int, skv: int) -> dict[str, Any]:
    return {"B": BATCH, "Hq": HQ, "Hkv": HKV, "Sq": sq, "Skv": skv, "D": HEAD_DIM, "dtype": "float32"}


def _compare(out: torch.Tensor, ref: torch.Tensor, base_err: float) -> tuple[bool, float, float]:
    """(ok, max_abs_err, tol): tolerance relative to the fp32 error of the same masked computation."""
    tol = max(16.0 * base_err, 1e-5)
    diff = (out.double() - ref.double()).abs()
    if torch.isnan(diff).any():
        return False, float("nan"), tol
    err = float(diff.max()) if diff.numel() else 0.0
    return err <= tol, err, tol


def _reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """float64 reference with ``mask`` [B or 1, Hq, Sq, Skv] and the fp32 error of masked SDPA."""
    from sparse_attn.reference import reference_attention

    ref, _ = reference_attention(q.double(), k.double(), v.double(), mask)
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)
    vv = v.repeat_interleave(group, dim=1)
    base = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
    base_err = float((base.double() - ref).abs().nan_to_num(0.0).max())
    return ref, base_err


def check_static(method: Any, sq: int, skv: int) -> dict[str, Any]:
    """Self-check of a static method at a small shape: ``sparse_attention`` and the planned
    ``block_sparse_attention`` against the float64 reference with ``method.mask()``."""
    import sparse_attn as sa

    q, k, v = _qkv(sq, skv, CHECK_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = method.mask(sq, skv, HQ, HKV)
        ref, base_err = _reference(q, k, v, mask.unsqueeze(0))
        out_api = sa.sparse_attention(q, k, v, method)
        layout = method.plan(sq, skv, HQ, HKV)
        out_run = sa.block_sparse_attention(q, k, v, layout)
    ok1, err1, tol = _compare(out_api, ref, base_err)
    ok2, err2, _ = _compare(out_run, ref, base_err)
    err = float("nan") if math.isnan(err1) or math.isnan(err2) else max(err1, err2)
    return {
        "ok": ok1 and ok2,
        "shape": [sq, skv],
        "params": harness.method_params(method),
        "max_abs_err": err,
        "tol": tol,
    }


def _random_selection(n: int, count: int, seed: int) -> Any:
    import sparse_attn as sa

    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:count].sort().values for _ in range(HKV)])
    return sa.TokenSelection(
        indices=idx.unsqueeze(0).to(torch.int64),
        counts=torch.full((BATCH, HKV), count, dtype=torch.int64),
        log_weights=None,
    )


def check_token(n: int, count: int) -> dict[str, Any]:
    """Self-check of ``token_sparse_attention`` (one query at the end of an ``n`` cache)."""
    import sparse_attn as sa

    q, k, v = _qkv(1, n, CHECK_SEED)
    sel = _random_selection(n, count, CHECK_SEED)
    mask = sel.to_dense_mask(n)  # [B, Hkv, n]
    mask = mask.repeat_interleave(HQ // mask.shape[1], dim=1) if mask.shape[1] != HQ else mask
    ref, base_err = _reference(q, k, v, mask.unsqueeze(2))
    out = sa.token_sparse_attention(q, k, v, sel)
    ok, err, tol = _compare(out, ref, base_err)
    return {"ok": ok, "shape": [1, n], "max_abs_err": err, "tol": tol}


def check_dynamic(method: Any, n: int) -> dict[str, Any]:
    """Self-check of a content-based method's decode step at a small cache of ``n`` keys: the output of
    ``sparse_attention`` against the float64 reference over the keys ``sparse_attn.select`` chose;
    with a budget that covers the row, against dense attention; for a method with side data, the
    store's step-by-step data against data computed from all keys at once."""
    import dataclasses

    import sparse_attn as sa
    from sparse_attn.side_data import ContiguousSideStore, compute_side_data

    q, k, v = _qkv(1, n, CHECK_SEED)
    sel = sa.select(method, q, k)
    mask = sel.to_dense_mask(n)
    mask = mask.repeat_interleave(HQ // mask.shape[1], dim=1) if mask.shape[1] != HQ else mask
    ref, base_err = _reference(q, k, v, mask.unsqueeze(2))
    ok, err, tol = _compare(sa.sparse_attention(q, k, v, method), ref, base_err)
    full = dataclasses.replace(method, density=1.0, tokens=None)
    dense_mask = torch.ones(1, HQ, 1, n, dtype=torch.bool)
    dref, dbase = _reference(q, k, v, dense_mask)
    ok_full, err_full, _ = _compare(sa.sparse_attention(q, k, v, full), dref, dbase)
    checks: dict[str, Any] = {
        "selection": {"ok": ok, "max_abs_err": err, "tol": tol, "density": round(float(sel.density([n])), 5)},
        "full_budget_is_dense": {"ok": ok_full, "max_abs_err": err_full},
    }
    side_ok = True
    if method.side_spec(HEAD_DIM) is not None:
        store = ContiguousSideStore(method)
        start = n - 40
        store.update(k[:, :, :start], torch.tensor([start]), new_tokens=start)
        for length in range(start + 1, n + 1):
            side = store.update(k[:, :, :length], torch.tensor([length]), new_tokens=1)
        want = compute_side_data(method, k, torch.tensor([n]))
        assert side is not None and want is not None
        units = want.shape[2]
        side_ok = bool(torch.equal(side[:, :, :units], want)) and store.rebuilds == 1
        checks["side_store_steps_equal_full_build"] = {"ok": side_ok, "steps": n - start}
    return {
        "ok": ok and ok_full and side_ok,
        "shape": [1, n],
        "params": harness.method_params(method),
        "checks": checks,
    }


def _check_sdpa(sq: int, skv: int) -> dict[str, Any]:
    q, k, v = _qkv(sq, skv, CHECK_SEED)
    i = torch.arange(sq).unsqueeze(1) + (skv - sq)
    mask = (torch.arange(skv).unsqueeze(0) <= i).expand(1, HQ, sq, skv)
    ref, base_err = _reference(q, k, v, mask)
    if sq == skv:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:  # a single query at the end sees every key; SDPA's is_causal is top-left aligned
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    ok, err, tol = _compare(out, ref, base_err)
    return {"ok": ok, "shape": [sq, skv], "max_abs_err": err, "tol": tol}


# ----------------------------------------------------------------------------------------------
# FlexAttention over the same layout


def _row(
    op: str, method: str, params: dict[str, Any], mode: str, sq: int, skv: int, **extra: Any
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "op": op,
        "method": method,
        "params": params,
        "mode": mode,
        "shape": _shape(sq, skv),
        "density": None,
        "time_ms": None,
        "speedup_vs_dense": None,
        "peak_extra_mem_bytes": None,
        "status": "ok",
        "length": skv,
    }
    row.update(extra)
    return row


class _Runner:
    def __init__(self, repeats: int, quick: bool, log: Callable[[str], None]):
        self.repeats = repeats
        self.min_repeats = min(MIN_REPEATS, repeats)
        self.quick = quick
        self.log = log

    def measure(self, row: dict[str, Any], fn: Callable[[], Any], qkv_bytes: int) -> Any:
        """First (untimed) call under the memory probe, then the timed runs. Returns the output."""
        out, extra = memory.peak_extra_rss(fn)
        timing = harness.time_callable(
            fn,
            warmup=0,
            repeats=self.repeats,
            min_repeats=self.min_repeats,
            budget_s=None if self.quick else CASE_BUDGET_S,
        )
        row["time_ms"] = timing.summary()
        row["repeats"] = len(timing.samples_ms)
        row["peak_extra_mem_bytes"] = extra
        row["peak_extra_mem_ratio"] = None if extra is None else round(extra / qkv_bytes, 4)
        return out

    def fail(self, row: dict[str, Any], exc: BaseException, prefix: str = "error") -> None:
        row["status"] = f"{prefix}: {harness.short_error(exc)}"
        row["time_ms"] = None
        row["speedup_vs_dense"] = None

    def done(self, row: dict[str, Any], t0: float) -> None:
        p50 = row["time_ms"]["p50"] if row.get("time_ms") else None
        what = f"{p50:.2f} ms" if p50 is not None else row["status"]
        self.log(
            f"  {row['mode']:<7} {row['length']:>6} {row['op']:<22} {row['method']:<12} "
            f"{row.get('label', ''):<32} {what}  ({time.perf_counter() - t0:.1f}s)"
        )


def _bench_prefill(n: int, runner: _Runner, flex: bool) -> list[dict[str, Any]]:
    import sparse_attn as sa

    rows: list[dict[str, Any]] = []
    q, k, v = _qkv(n, n, DATA_SEED + n)
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    check_len = min(CHECK_PREFILL_LEN, n)

    t0 = time.perf_counter()
    dense = _row(
        "sdpa",
        "dense",
        {"is_causal": True},
        "prefill",
        n,
        n,
        label="causal",
        target_density=1.0,
        qkv_bytes=qkv_bytes,
        density=1.0,
    )
    try:
        dense["check"] = _check_sdpa(check_len, check_len)
        if not dense["check"]["ok"]:
            dense["status"] = "failed-correctness"
        else:
            runner.measure(
                dense,
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                qkv_bytes,
            )
    except Exception as exc:  # one failing case must not end the run
        runner.fail(dense, exc)
    rows.append(dense)
    runner.done(dense, t0)

    for case in _prefill_cases():
        t0 = time.perf_counter()
        row = _row(
            "block_sparse_attention",
            case.method,
            {},
            "prefill",
            n,
            n,
            label=case.label,
            target_density=case.target_density,
            qkv_bytes=qkv_bytes,
        )
        out = None
        layout = None
        try:
            method = case.build(n)
            row["params"] = harness.method_params(method)
            if case.method == "s2":
                row["params"]["covers_full_context"] = bool(method.covers_full_context(HKV))
            # the recipe at the small length (sparse there too) and the benchmarked config itself
            checks = [
                check_static(case.build(check_len), check_len, check_len),
                check_static(method, check_len, check_len),
            ]
            row["check"] = {"ok": all(c["ok"] for c in checks), "checks": checks}
            if not row["check"]["ok"]:
                row["status"] = "failed-correctness"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tp = time.perf_counter()
                    layout = method.plan(n, n, HQ, HKV)
                    row["plan_ms"] = round((time.perf_counter() - tp) * 1e3, 3)
                td = time.perf_counter()
                row["density"] = round(float(layout.density()), 5)
                row["density_ms"] = round((time.perf_counter() - td) * 1e3, 3)
                lay = layout
                out = runner.measure(row, lambda lay=lay: sa.block_sparse_attention(q, k, v, lay), qkv_bytes)
        except Exception as exc:  # one failing case must not end the run
            runner.fail(row, exc)
        rows.append(row)
        runner.done(row, t0)

        if case.flex:
            rows.append(_bench_flex(case, row, layout, out, q, k, v, n, runner, flex, qkv_bytes))
        del out
    return rows


def _bench_flex(
    case: Case,
    sparse_row: dict[str, Any],
    layout: Any,
    ref_out: Any,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    n: int,
    runner: _Runner,
    enabled: bool,
    qkv_bytes: int,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    row = _row(
        "flex_attention",
        case.method,
        sparse_row.get("params", {}),
        "prefill",
        n,
        n,
        label=case.label,
        target_density=case.target_density,
        qkv_bytes=qkv_bytes,
        density=sparse_row.get("density"),
    )
    if not enabled:
        row["status"] = "skipped: FlexAttention disabled (--no-flex or --quick)"
    elif sparse_row["status"] != "ok" or layout is None or ref_out is None:
        row["status"] = "skipped: the sparse kernel row has no verified output to check against"
    else:
        try:
            bm = flex_baseline.layout_to_block_mask(layout, HQ, n, n)
            fa = flex_baseline.compiled_flex()

            def fn() -> torch.Tensor:
                return fa(q, k, v, block_mask=bm, enable_gqa=True)

            tc = time.perf_counter()
            out = fn()  # compiles
            row["compile_ms"] = round((time.perf_counter() - tc) * 1e3, 1)
            ok, err, tol = _compare(out, ref_out, 2e-5)
            row["check"] = {
                "ok": ok,
                "against": "block_sparse_attention output at the benchmark shape",
                "max_abs_err": err,
                "tol": tol,
            }
            del out
            if not ok:
                row["status"] = "failed-correctness"
            else:
                runner.measure(row, fn, qkv_bytes)
        except Exception as exc:  # FlexAttention on CPU is best effort: record why
            runner.fail(row, exc, prefix="unsupported")
    runner.done(row, t0)
    return row


def _bench_decode(n: int, runner: _Runner) -> list[dict[str, Any]]:
    import sparse_attn as sa

    rows: list[dict[str, Any]] = []
    q, k, v = _qkv(1, n, DATA_SEED + n + 1)
    qkv_bytes = sum(t.numel() * t.element_size() for t in (q, k, v))
    check_len = min(CHECK_DECODE_LEN, n)

    t0 = time.perf_counter()
    dense = _row(
        "sdpa",
        "dense",
        {"is_causal": False},
        "decode",
        1,
        n,
        label="all keys",
        target_density=1.0,
        qkv_bytes=qkv_bytes,
        density=1.0,
    )
    try:
        dense["check"] = _check_sdpa(1, check_len)
        if not dense["check"]["ok"]:
            dense["status"] = "failed-correctness"
        else:
            runner.measure(dense, lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), qkv_bytes)
    except Exception as exc:  # one failing case must not end the run
        runner.fail(dense, exc)
    rows.append(dense)
    runner.done(dense, t0)

    for case in _decode_cases():
        t0 = time.perf_counter()
        row = _row(
            "block_sparse_attention",
            case.method,
            {},
            "decode",
            1,
            n,
            label=case.label,
            target_density=case.target_density,
            qkv_bytes=qkv_bytes,
        )
        try:
            method = case.build(n)
            row["params"] = harness.method_params(method)
            checks = [check_static(case.build(check_len), 1, check_len), check_static(method, 1, check_len)]
            row["check"] = {"ok": all(c["ok"] for c in checks), "checks": checks}
            if not row["check"]["ok"]:
                row["status"] = "failed-correctness"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tp = time.perf_counter()
                    layout = method.plan(1, n, HQ, HKV)
                    row["plan_ms"] = round((time.perf_counter() - tp) * 1e3, 3)
                row["density"] = round(float(layout.density()), 5)
                runner.measure(
                    row, lambda layout=layout: sa.block_sparse_attention(q, k, v, layout), qkv_bytes
                )
        except Exception as exc:  # one failing case must not end the run
            runner.fail(row, exc)
        rows.append(row)
        runner.done(row, t0)

    t0 = time.perf_counter()
    count = max(1, round(n * DECODE_FRACTION))
    row = _row(
        "token_sparse_attention",
        "token_random",
        {"selected": count, "seed": DATA_SEED, "log_weights": False},
        "decode",
        1,
        n,
        label="1/16 random keys",
        target_density=DECODE_FRACTION,
        qkv_bytes=qkv_bytes,
    )
    try:
        row["check"] = check_token(check_len, max(1, round(check_len * DECODE_FRACTION)))
        if not row["check"]["ok"]:
            row["status"] = "failed-correctness"
        else:
            tp = time.perf_counter()
            sel = _random_selection(n, count, DATA_SEED)
            row["plan_ms"] = round((time.perf_counter() - tp) * 1e3, 3)
            row["density"] = round(float(sel.density([n])), 5)
            runner.measure(row, lambda: sa.token_sparse_attention(q, k, v, sel), qkv_bytes)
    except Exception as exc:  # one failing case must not end the run
        runner.fail(row, exc)
    rows.append(row)
    runner.done(row, t0)
    rows.extend(_bench_decode_dynamic(n, runner, q, k, v, qkv_bytes, check_len))
    return rows


def _bench_decode_dynamic(
    n: int,
    runner: _Runner,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qkv_bytes: int,
    check_len: int,
) -> list[dict[str, Any]]:
    """TopK and Quest decode steps at ``DYNAMIC_DENSITY``, the selection inside every timed call."""
    import sparse_attn as sa
    from sparse_attn.side_data import ContiguousSideStore

    rows: list[dict[str, Any]] = []
    d = DYNAMIC_DENSITY
    for name, label, method in (
        ("topk", f"{d:.0%} exact scores + top-k", sa.TopK(density=d)),
        ("quest", f"{d:.0%} block bounds, {16}-key blocks", sa.Quest(density=d, block_size=16)),
    ):
        t0 = time.perf_counter()
        row = _row(
            "token_sparse_attention",
            name,
            harness.method_params(method),
            "decode",
            1,
            n,
            label=label,
            target_density=d,
            qkv_bytes=qkv_bytes,
            selection_included=True,
        )
        try:
            row["check"] = check_dynamic(method, check_len)
            if not row["check"]["ok"]:
                row["status"] = "failed-correctness"
            elif name == "topk":
                row["density"] = round(float(sa.select(method, q, k).density([n])), 5)
                runner.measure(row, lambda method=method: sa.sparse_attention(q, k, v, method), qkv_bytes)
                sel = sa.select(method, q, k)
                row["breakdown_ms"] = _breakdown(
                    {
                        "select (exact scores + top-k)": lambda method=method: sa.select(method, q, k),
                        "token_sparse_attention": lambda sel=sel: sa.token_sparse_attention(q, k, v, sel),
                    },
                    runner,
                )
            else:
                # k and v are the cache at its capacity N, right-padded: a step's row holds ``length``
                # keys (kv_lens), as in a static or paged cache; the store only extends
                # the untimed memory-probe call, the timed ones, then the breakdown's steps
                steps = runner.repeats + 1 + BREAKDOWN_STEPS
                start = n - steps
                store = ContiguousSideStore(method)
                tp = time.perf_counter()
                store.update(k, torch.tensor([start]), new_tokens=start)
                row["side_build_ms"] = round((time.perf_counter() - tp) * 1e3, 3)
                state: dict[str, Any] = {"len": start, "side": None}

                def step(method: Any = method, store: Any = store, state: dict = state) -> torch.Tensor:
                    length = state["len"] = min(state["len"] + 1, n)
                    lens = torch.tensor([length])
                    side = state["side"] = store.update(k, lens, new_tokens=1)
                    return sa.sparse_attention(q, k, v, method, side=side, kv_lens=lens)

                runner.measure(row, step, qkv_bytes)
                row["kv_lens_timed"] = [start + 1, state["len"]]
                # where a step's time goes: the same steps, each part timed on its own
                parts: dict[str, list[float]] = {"side-data store update": [], "select (bounds + top blocks)": [],
                                                 "token_sparse_attention": []}  # fmt: skip
                for _ in range(min(BREAKDOWN_STEPS, n - state["len"])):
                    length = state["len"] = state["len"] + 1
                    lens = torch.tensor([length])
                    ta = time.perf_counter()
                    side = store.update(k, lens, new_tokens=1)
                    tb = time.perf_counter()
                    sel = sa.select(method, q, k, side=side, kv_lens=lens)
                    tc = time.perf_counter()
                    sa.token_sparse_attention(q, k, v, sel, kv_lens=lens)
                    td = time.perf_counter()
                    for key, dt in zip(parts, (tb - ta, tc - tb, td - tc)):
                        parts[key].append(dt * 1e3)
                row["breakdown_ms"] = {
                    key: round(harness.percentile(x, 50), 3) for key, x in parts.items() if x
                }
                row["side_rebuilds_while_timed"] = store.rebuilds - 1
                lens = torch.tensor([state["len"]])
                sel = sa.select(method, q, k, side=state["side"], kv_lens=lens)
                row["density"] = round(float(sel.density(lens)), 5)
        except Exception as exc:  # one failing case must not end the run
            runner.fail(row, exc)
        rows.append(row)
        runner.done(row, t0)
    return rows


def _breakdown(parts: dict[str, Callable[[], Any]], runner: _Runner) -> dict[str, float]:
    """Median ms of each part of a step, timed on its own (``BREAKDOWN_STEPS`` runs each)."""
    out = {}
    for key, fn in parts.items():
        timing = harness.time_callable(fn, warmup=1, repeats=BREAKDOWN_STEPS if not runner.quick else 1)
        out[key] = round(timing.p50, 3)
    return out


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    base = {
        (r["mode"], r["length"]): r["time_ms"]["p50"]
        for r in rows
        if r["op"] == "sdpa" and r["status"] == "ok" and r.get("time_ms")
    }
    for r in rows:
        b = base.get((r["mode"], r["length"]))
        if r["status"] == "ok" and r.get("time_ms") and b:
            r["speedup_vs_dense"] = round(b / r["time_ms"]["p50"], 3)
        else:
            r["speedup_vs_dense"] = None


def evaluate_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, each with the rows it was judged on and whether it was met (None when the
    run did not measure it)."""

    def pick(mode: str, length: int, target: float, ops: Sequence[str]) -> list[dict[str, Any]]:
        return [
            r
            for r in rows
            if r["mode"] == mode
            and r["length"] == length
            and r["op"] in ops
            and abs(r.get("target_density", -1) - target) < 1e-9
        ]

    goals: dict[str, Any] = {}

    sel = pick("prefill", GOAL_PREFILL["length"], GOAL_PREFILL["target_density"], ("block_sparse_attention",))
    vals = [r["speedup_vs_dense"] for r in sel]
    goals["prefill_16k_10pct_speedup"] = {
        "description": "sparse prefill (block_sparse_attention) at 16k and ~10% density is >= 5x faster "
        "than dense SDPA, for every static method",
        "threshold": GOAL_PREFILL["min_speedup"],
        "rows": [
            {
                "method": r["method"],
                "density": r["density"],
                "speedup_vs_dense": r["speedup_vs_dense"],
                "status": r["status"],
            }
            for r in sel
        ],
        "value": min((x for x in vals if x is not None), default=None) if vals and None not in vals else None,
        "met": None if not sel else all(x is not None and x >= GOAL_PREFILL["min_speedup"] for x in vals),
    }

    sel = pick(
        "decode",
        GOAL_DECODE["length"],
        GOAL_DECODE["target_density"],
        ("block_sparse_attention", "token_sparse_attention"),
    )
    vals = [r["speedup_vs_dense"] for r in sel]
    goals["decode_64k_1of16_speedup"] = {
        "description": "decode selecting 1/16 of a 64k cache is >= 8x faster than dense SDPA, for every method",
        "threshold": GOAL_DECODE["min_speedup"],
        "rows": [
            {
                "method": r["method"],
                "op": r["op"],
                "density": r["density"],
                "speedup_vs_dense": r["speedup_vs_dense"],
                "status": r["status"],
            }
            for r in sel
        ],
        "value": min(vals) if vals and None not in vals else None,
        "met": None if not sel else all(x is not None and x >= GOAL_DECODE["min_speedup"] for x in vals),
    }

    sel = [r for r in pick("decode", GOAL_QUEST["length"], GOAL_QUEST["target_density"], ("token_sparse_attention",))
           if r["method"] == "quest"]  # fmt: skip
    vals = [r["speedup_vs_dense"] for r in sel]
    goals["quest_decode_64k_5pct_speedup"] = {
        "description": "Quest decode over a 64k cache at 5% density, selection included (side-data update, "
        "bounds, top blocks, token-sparse attention), is >= 4x faster than dense SDPA",
        "threshold": GOAL_QUEST["min_speedup"],
        "rows": [
            {
                "method": r["method"],
                "op": r["op"],
                "label": r.get("label"),
                "density": r["density"],
                "speedup_vs_dense": r["speedup_vs_dense"],
                "status": r["status"],
            }
            for r in sel
        ],
        "value": min(vals) if vals and None not in vals else None,
        "met": None if not sel else all(x is not None and x >= GOAL_QUEST["min_speedup"] for x in vals),
    }

    sel = [
        r
        for r in rows
        if r["mode"] == "prefill"
        and r["length"] == GOAL_MEMORY["length"]
        and r["op"] == "block_sparse_attention"
    ]
    ratios = [r.get("peak_extra_mem_ratio") for r in sel]
    met: bool | None
    if not sel:
        met = None
    elif any(r["status"] != "ok" for r in sel):
        met = False
    elif None in ratios:
        met = None
    else:
        met = max(ratios) < GOAL_MEMORY["max_ratio"]
    dense_mem = [
        r.get("peak_extra_mem_ratio")
        for r in rows
        if r["mode"] == "prefill" and r["length"] == GOAL_MEMORY["length"] and r["op"] == "sdpa"
    ]
    goals["prefill_32k_extra_memory"] = {
        "description": "peak extra memory of sparse prefill at 32k is below 2x the bytes of q, k, v "
        "(every static-method row)",
        "threshold": GOAL_MEMORY["max_ratio"],
        "rows": [
            {
                "method": r["method"],
                "label": r.get("label"),
                "peak_extra_mem_ratio": r.get("peak_extra_mem_ratio"),
                "status": r["status"],
            }
            for r in sel
        ],
        "value": max(ratios) if ratios and None not in ratios else None,
        "dense_sdpa_ratio": dense_mem[0] if dense_mem else None,
        "met": met,
    }
    return goals


# ----------------------------------------------------------------------------------------------
# entry points


def default_json_path(quick: bool = False) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    return Path("bench") / "results" / f"throughput-cpu-{date}{'-quick' if quick else ''}.json"


def run(
    *,
    lengths: Sequence[int] | None = None,
    decode_lengths: Sequence[int] | None = None,
    repeats: int | None = None,
    quick: bool = False,
    threads: int | None = None,
    flex: bool | None = None,
    log: Callable[[str], None] | None = None,
    prefill: bool = True,
) -> dict[str, Any]:
    """Run the benchmark and return the result document (rows, goals, environment); ``prefill=False``
    runs the decode cases only."""
    import sparse_attn  # noqa: F401 - fail early with the import error

    log = log or (lambda _msg: None)
    lengths = tuple(lengths) if lengths else (QUICK_PREFILL_LENGTHS if quick else DEFAULT_PREFILL_LENGTHS)
    if not prefill:
        lengths = ()
    decode_lengths = (
        tuple(decode_lengths)
        if decode_lengths
        else (QUICK_DECODE_LENGTHS if quick else DEFAULT_DECODE_LENGTHS)
    )
    repeats = repeats if repeats is not None else (1 if quick else DEFAULT_REPEATS)
    flex = (not quick) if flex is None else flex
    threads = threads or 2
    torch.set_num_threads(threads)

    env = harness.environment()  # at the start: timestamp and load before the run
    other_load = harness.OtherLoad()
    other_load.start()
    runner = _Runner(repeats, quick, log)
    rows: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    with torch.no_grad():
        for n in lengths:
            log(f"prefill {n} ...")
            rows.extend(_bench_prefill(int(n), runner, flex))
        for n in decode_lengths:
            log(f"decode {n} ...")
            rows.extend(_bench_decode(int(n), runner))
    _add_speedups(rows)
    wall = time.perf_counter() - t_start
    env["machine"]["load_avg_end"] = harness.load_avg()
    env["machine"]["other_processes_cpu_fraction"] = other_load.stop()

    return harness.finite(
        {
            "schema_version": SCHEMA_VERSION,
            "benchmark": "throughput",
            "device": "cpu",
            "env": env,
            "config": {
                "shape": {
                    "B": BATCH,
                    "Hq": HQ,
                    "Hkv": HKV,
                    "D": HEAD_DIM,
                    "dtype": "float32",
                    "block_size": BLOCK,
                },
                "prefill_lengths": list(lengths),
                "decode_lengths": list(decode_lengths),
                "max_repeats": repeats,
                "min_repeats": runner.min_repeats,
                "case_budget_s": None if quick else CASE_BUDGET_S,
                "threads": threads,
                "quick": quick,
                "flex": flex,
            },
            "wall_time_s": round(wall, 1),
            "rows": rows,
            "goals": evaluate_goals(rows),
        }
    )


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    """The printed table: one line per row, then the goals."""
    head = (
        f"{'mode':<7} {'length':>6} {'op':<6} {'method':<12} {'params':<32} {'density':>7} "
        f"{'p50 ms':>10} {'speedup':>8} {'mem/qkv':>7}  status"
    )
    ops = {
        "sdpa": "sdpa",
        "block_sparse_attention": "bsa",
        "token_sparse_attention": "tsa",
        "flex_attention": "flex",
    }
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        p50 = r["time_ms"]["p50"] if r.get("time_ms") else None
        lines.append(
            f"{r['mode']:<7} {r['length']:>6} {ops.get(r['op'], r['op']):<6} {r['method']:<12} "
            f"{str(r.get('label', ''))[:32]:<32} {_fmt(r['density'], '.3f'):>7} {_fmt(p50, '.2f'):>10} "
            f"{_fmt(r['speedup_vs_dense'], '.2f'):>8} {_fmt(r.get('peak_extra_mem_ratio'), '.2f'):>7}  {r['status']}"
        )
    lines.append("")
    lines.append(
        "ops: sdpa = dense scaled_dot_product_attention, bsa = block_sparse_attention, "
        "tsa = token_sparse_attention, flex = torch.compile(flex_attention); "
        "mem/qkv = peak extra RSS / bytes of q, k, v"
    )
    for name, g in result["goals"].items():
        met = {True: "MET", False: "NOT MET", None: "not measured"}[g["met"]]
        key = (
            "peak_extra_mem_ratio"
            if "peak_extra_mem_ratio" in (g["rows"][0] if g["rows"] else {})
            else "speedup_vs_dense"
        )
        per_row = ", ".join(
            f"{r.get('op', 'bsa').replace('token_sparse_attention', 'tsa').replace('block_sparse_attention', 'bsa')}:"
            f"{r['method']}{'' if not r.get('label') else ' ' + r['label'].split()[0]}={_fmt(r.get(key), '.2f')}"
            for r in g["rows"]
        )
        extra = f"; dense SDPA {g['dense_sdpa_ratio']}" if g.get("dense_sdpa_ratio") is not None else ""
        lines.append(f"goal {name}: {met} (threshold {g['threshold']}; {per_row or 'no rows'}{extra})")
    env = result["env"]
    lines.append(
        f"{env['machine']['cpu_model']}, {env['machine']['torch_threads']} threads, torch {env['torch']}, "
        f"commit {env['git_commit'][:12]}, {result['wall_time_s']} s, "
        f"load avg {env['machine'].get('load_avg')} -> {env['machine'].get('load_avg_end')}, "
        f"other processes used {_fmt(env['machine'].get('other_processes_cpu_fraction'), '.0%')} of the CPU"
    )
    return "\n".join(lines)


def has_failures(result: dict[str, Any]) -> bool:
    """True when a row failed its correctness check or errored (FlexAttention 'unsupported' and
    'skipped' rows do not count)."""
    return any(r["status"] == "failed-correctness" or r["status"].startswith("error") for r in result["rows"])

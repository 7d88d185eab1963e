"""GPU kernel benchmark (prefill): the Triton block-sparse kernel against dense and sparse baselines.

Shape: Llama-3-8B-like attention, B=1, Hq=32, Hkv=8 (GQA 4), D=128, bf16, causal prefill with
Sq = Skv = N for N in 8k..128k. Patterns (each planned once outside the timing, layout moved to the
GPU once): S2 (layout heads = Hkv), SinkLocal (token window, partial blocks on the band edge) and
BlockSparse A-shape (sink block + local band), each at target densities 3/10/25/50% of the causal
pairs (the measured ``layout.density()`` is reported). Rows:

- ``sdpa`` dense causal ``scaled_dot_product_attention`` with the flash backend (the speedup baseline;
  ``sdpa_cudnn`` as an extra row when the cuDNN backend runs);
- ``flash_attn`` dense causal ``flash_attn_func`` when flash-attn is importable;
- ``triton_block_sparse``: ``sparse_attn.triton_kernels.block_sparse_fwd`` over the layout;
- ``flex_attention``: ``torch.compile(flex_attention)`` with a BlockMask built from the identical
  layout (same full/partial block lists; the element rule in ``mask_mod``), for the densities in
  ``flex_densities`` (each case recompiles, so not all of them by default).

Times are CUDA-event timings (warmup, then repeated runs until a time budget; p20/p50/p80 in ms).
Effective TFLOP/s counts only attended pairs: ``4 * D * pairs`` (QK^T and PV). Before a method is
timed, its Triton output at a small length must match a float64 dense reference with the layout's
exact mask (tolerance relative to the same masked attention done naively in bf16); a failing method
is reported ``failed-correctness`` without a time. At the benchmark size the Triton output is also
compared with FlexAttention's when both ran.

Nothing runs at import; the module imports without a GPU (``run_kernels`` needs one).
"""

from __future__ import annotations

import datetime as _dt
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import flex as flex_baseline
from . import harness

SCHEMA_VERSION = 1
BATCH, HQ, HKV, HEAD_DIM = 1, 32, 8, 128
DTYPE = torch.bfloat16
BLOCK = 64

DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (2048, 4096)
DENSITIES = (0.03, 0.10, 0.25, 0.50)
QUICK_DENSITIES = (0.10, 0.50)
FLEX_DENSITIES = (0.10,)
CHECK_LEN = 2048
QUICK_CHECK_LEN = 1024
CHECK_SEED = 1234
DATA_SEED = 0
WARMUP = 2
MIN_REPEATS = 5
MAX_REPEATS = 100
BUDGET_MS = 300.0  # timed runs continue until this much GPU time once MIN_REPEATS runs were made

GOAL_MIN_LENGTH = 32768  # the issue's prefill targets apply from 32k tokens
GOAL_FACTOR = 0.8  # speedup over dense flash >= 0.8 / density

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
    "speedup_vs_flex",
    "tflops_effective",
    "status",
)


# ----------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    method: str
    label: str
    target_density: float
    build: Callable[[int, int], Any]  # (length, block) -> method config


def _window_fraction(density: float) -> float:
    """Fraction x of N for a causal band of width xN with the given density (d = 2x - x^2)."""
    d = min(max(density, 0.0), 1.0)
    return 1.0 - math.sqrt(1.0 - d)


def _n_blocks(n: int, block: int) -> int:
    return max(1, -(-n // block))


def _s2_stride(density: float) -> int:
    """The smallest vertical stride whose shards take at most a third of the target density (the
    local band takes the rest): 128 at 3%, 32 at 10%, 16 at 25%, 8 at 50%."""
    for vs in (4, 8, 16, 32, 64, 128, 256):
        if 1.0 / vs <= density / 3:
            return vs
    return 256


def cases(densities: Sequence[float] = DENSITIES) -> list[Case]:
    import sparse_attn as sa

    out: list[Case] = []
    for d in densities:
        vs = _s2_stride(d)
        r = max(0.0, (d - 1.0 / vs) / (1.0 - 1.0 / vs))
        xr = _window_fraction(r)
        out.append(
            Case(
                "s2",
                f"~{d:.0%} vert_stride={vs}",
                d,
                lambda n, blk, vs=vs, xr=xr: sa.S2(
                    block_size=blk, local_blocks=max(1, round(xr * _n_blocks(n, blk))), vert_stride=vs
                ),
            )
        )
    for d in densities:
        x = _window_fraction(d)
        out.append(
            Case(
                "sink_local",
                f"~{d:.0%} sink=64 window={x:.4f}N",
                d,
                lambda n, blk, x=x: sa.SinkLocal(
                    sink_tokens=64, window_tokens=max(1, round(x * n)), block_size=blk
                ),
            )
        )
    for d in densities:
        x = _window_fraction(d)
        out.append(
            Case(
                "block_sparse",
                f"~{d:.0%} A-shape sink_blocks=1",
                d,
                lambda n, blk, x=x: sa.BlockSparse(
                    block_size=blk, sink_blocks=1, local_blocks=max(1, round(x * _n_blocks(n, blk)))
                ),
            )
        )
    return out


# ----------------------------------------------------------------------------------------------
# helpers


def _qkv(n: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(BATCH, HQ, n, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
    k = torch.randn(BATCH, HKV, n, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
    v = torch.randn(BATCH, HKV, n, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
    return q, k, v


def _shape(n: int) -> dict[str, Any]:
    return {"B": BATCH, "Hq": HQ, "Hkv": HKV, "Sq": n, "Skv": n, "D": HEAD_DIM, "dtype": "bfloat16"}


def time_cuda(
    fn: Callable[[], Any],
    *,
    warmup: int = WARMUP,
    min_repeats: int = MIN_REPEATS,
    max_repeats: int = MAX_REPEATS,
    budget_ms: float = BUDGET_MS,
) -> dict[str, Any]:
    """CUDA-event timing: ``warmup`` untimed calls, then timed calls until ``budget_ms`` of GPU time
    (at least ``min_repeats``, at most ``max_repeats``). Returns p20/p50/p80 (ms) and the count."""
    for _ in range(max(0, warmup)):
        fn()
    torch.cuda.synchronize()
    samples: list[float] = []
    spent = 0.0
    while len(samples) < max_repeats:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
        samples.append(ms)
        spent += ms
        if len(samples) >= min_repeats and spent >= budget_ms:
            break
    return {
        "p20": round(harness.percentile(samples, 20), 4),
        "p50": round(harness.percentile(samples, 50), 4),
        "p80": round(harness.percentile(samples, 80), 4),
        "repeats": len(samples),
    }


def _layout_on(layout: Any, device: str) -> dict[str, Any]:
    """The kernel arguments of a BlockLayout, moved to the GPU once."""

    def mv(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    return {
        "kv_indices": mv(layout.kv_indices),
        "kv_counts": mv(layout.kv_counts),
        "full": mv(layout.full),
        "q_lens": mv(layout.q_lens),
        "kv_lens": mv(layout.kv_lens),
        "block_q": int(layout.block_q),
        "block_k": int(layout.block_k),
        "causal": bool(layout.causal),
        "sink_tokens": mv(layout.sink_tokens),
        "window_tokens": mv(layout.window_tokens),
    }


def _triton_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: dict[str, Any]) -> Callable[[], Any]:
    from sparse_attn.triton_kernels.block_sparse_fwd import block_sparse_fwd

    out = torch.empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=q.dtype, device=q.device)
    a = dict(args)
    idx, cnt, full, ql, kl = (
        a.pop("kv_indices"),
        a.pop("kv_counts"),
        a.pop("full"),
        a.pop("q_lens"),
        a.pop("kv_lens"),
    )

    def fn() -> torch.Tensor:
        return block_sparse_fwd(q, k, v, idx, cnt, full, ql, kl, **a, out=out)[0]

    return fn


def _pairs_per_layout_head(layout: Any) -> int:
    return int(layout.attended_pairs())


def attended_pairs(layout: Any, num_heads: int) -> int:
    """(query head, query, key) pairs the layout attends, over all query heads."""
    return _pairs_per_layout_head(layout) * (num_heads // int(layout.num_heads))


def _tflops(pairs: int, p50_ms: float | None) -> float | None:
    if not p50_ms:
        return None
    return round(4.0 * HEAD_DIM * pairs / (p50_ms * 1e-3) / 1e12, 2)


def _dense_pairs(n: int) -> int:
    return BATCH * HQ * n * (n + 1) // 2


# ----------------------------------------------------------------------------------------------
# correctness


def _dense_mask(layout: Any, n: int, device: str) -> torch.Tensor:
    m = layout.to_dense_mask(n, n).to(device)  # [B, H, n, n]
    h = m.shape[1]
    if h == HQ:
        return m
    if h == HKV:
        return m.repeat_interleave(HQ // HKV, dim=1)
    return m.expand(-1, HQ, -1, -1)


def _masked_attention(q, k, v, mask, dtype) -> torch.Tensor:
    """Dense masked attention with scores/PV in ``dtype`` (softmax in fp32 for low precision)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    k = k.repeat_interleave(HQ // HKV, dim=1).to(dtype)
    v = v.repeat_interleave(HQ // HKV, dim=1).to(dtype)
    s = torch.matmul(q.to(dtype) * scale, k.transpose(-1, -2))
    s = s.to(torch.float64 if dtype == torch.float64 else torch.float32).masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return torch.matmul(p.to(dtype), v)


def check_triton(method: Any, n: int, device: str) -> dict[str, Any]:
    """The Triton output at length n against float64 dense attention with the layout's mask."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layout = method.plan(n, n, HQ, HKV)
    q, k, v = _qkv(n, CHECK_SEED, device)
    out = _triton_fn(q, k, v, _layout_on(layout, device))().double()
    mask = _dense_mask(layout, n, device)
    ref = _masked_attention(q, k, v, mask, torch.float64)
    lowp = _masked_attention(q, k, v, mask, DTYPE).double()
    base = float((lowp - ref).abs().max())
    tol = max(4.0 * base, 1e-3)
    diff = (out - ref).abs()
    err = float("nan") if torch.isnan(diff).any() else float(diff.max())
    return {"ok": err <= tol, "length": n, "max_abs_err": err, "tol": tol, "bf16_naive_err": base}


# ----------------------------------------------------------------------------------------------
# FlexAttention with the identical block lists


def _row(op: str, method: str, label: str, n: int, **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "op": op,
        "method": method,
        "label": label,
        "params": {},
        "mode": "prefill",
        "length": n,
        "shape": _shape(n),
        "density": None,
        "target_density": None,
        "time_ms": None,
        "speedup_vs_dense": None,
        "speedup_vs_flex": None,
        "tflops_effective": None,
        "status": "ok",
    }
    row.update(extra)
    return row


def _fail(row: dict[str, Any], exc: BaseException, prefix: str = "error") -> None:
    row["status"] = f"{prefix}: {harness.short_error(exc)}"
    row["time_ms"] = None


def _sdpa_fn(q, k, v, backend_name: str) -> tuple[Callable[[], Any], str]:
    """Dense causal SDPA pinned to one backend; native GQA when the backend takes it, else K/V
    repeated once outside the timing."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def native() -> torch.Tensor:
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    try:
        native()
        torch.cuda.synchronize()
        return native, "enable_gqa"
    except Exception:
        kr = k.repeat_interleave(HQ // HKV, dim=1)
        vr = v.repeat_interleave(HQ // HKV, dim=1)

        def repeated() -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

        repeated()
        torch.cuda.synchronize()
        return repeated, "repeat_kv (outside the timing)"


def _bench_length(
    n: int,
    case_list: Sequence[Case],
    *,
    block: int,
    device: str,
    check_len: int,
    flex_densities: Sequence[float],
    use_flash_attn: bool,
    checks: dict[tuple[str, str], dict[str, Any]],
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    q, k, v = _qkv(n, DATA_SEED + n, device)
    dense_pairs = _dense_pairs(n)

    for op, backend in (("sdpa", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
        t0 = time.perf_counter()
        row = _row(op, "dense", f"causal, {backend.lower()}", n, density=1.0, target_density=1.0)
        try:
            fn, gqa = _sdpa_fn(q, k, v, backend)
            row["params"] = {"is_causal": True, "backend": backend, "gqa": gqa}
            row["time_ms"] = time_cuda(fn)
            row["tflops_effective"] = _tflops(dense_pairs, row["time_ms"]["p50"])
        except Exception as exc:
            _fail(row, exc, "error" if op == "sdpa" else "unsupported")
        rows.append(row)
        _log_row(log, row, t0)

    if use_flash_attn:
        t0 = time.perf_counter()
        row = _row("flash_attn", "dense", "causal flash_attn_func", n, density=1.0, target_density=1.0)
        try:
            import flash_attn  # type: ignore[import-not-found]

            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
            row["params"] = {"version": getattr(flash_attn, "__version__", "unknown"), "causal": True}

            def fa() -> torch.Tensor:
                return flash_attn.flash_attn_func(qt, kt, vt, causal=True)

            row["time_ms"] = time_cuda(fa)
            row["tflops_effective"] = _tflops(dense_pairs, row["time_ms"]["p50"])
            del qt, kt, vt
        except ImportError:
            row["status"] = "skipped: flash-attn is not installed"
        except Exception as exc:
            _fail(row, exc)
        rows.append(row)
        _log_row(log, row, t0)

    for case in case_list:
        t0 = time.perf_counter()
        row = _row("triton_block_sparse", case.method, case.label, n, target_density=case.target_density)
        out_tr = None
        layout = None
        try:
            method = case.build(n, block)
            row["params"] = harness.method_params(method)
            key = (case.method, case.label)
            if key not in checks:  # the recipe at the small check length, once per case
                checks[key] = check_triton(case.build(check_len, block), check_len, device)
            row["check"] = checks[key]
            if not row["check"]["ok"]:
                row["status"] = "failed-correctness"
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tp = time.perf_counter()
                    layout = method.plan(n, n, HQ, HKV)
                    row["plan_ms"] = round((time.perf_counter() - tp) * 1e3, 2)
                pairs = attended_pairs(layout, HQ)
                row["density"] = round(pairs / dense_pairs, 5)
                row["layout_heads"] = int(layout.num_heads)
                fn = _triton_fn(q, k, v, _layout_on(layout, device))
                row["time_ms"] = time_cuda(fn)
                row["tflops_effective"] = _tflops(pairs, row["time_ms"]["p50"])
                out_tr = fn().clone()
        except Exception as exc:
            _fail(row, exc)
        rows.append(row)
        _log_row(log, row, t0)

        if any(abs(case.target_density - d) < 1e-9 for d in flex_densities):
            rows.append(_bench_flex(case, row, layout, out_tr, q, k, v, n, device, log))
        del out_tr
    return rows


def _bench_flex(case, sparse_row, layout, out_tr, q, k, v, n, device, log) -> dict[str, Any]:
    t0 = time.perf_counter()
    row = _row(
        "flex_attention",
        case.method,
        case.label,
        n,
        target_density=case.target_density,
        params=sparse_row.get("params", {}),
        density=sparse_row.get("density"),
    )
    if sparse_row["status"] != "ok" or layout is None:
        row["status"] = "skipped: the Triton row has no verified layout"
        _log_row(log, row, t0)
        return row
    try:
        bm = flex_baseline.layout_to_block_mask(layout, HQ, n, n, device)
        fa = flex_baseline.compiled_flex()
        kernel_options: dict[str, Any] | None = None

        def fn() -> torch.Tensor:
            return fa(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=kernel_options)

        tc = time.perf_counter()
        try:
            out = fn()
        except Exception:  # sparse block smaller than flex's default tile: use tiles of the block size
            kernel_options = {"BLOCK_M": int(layout.block_q), "BLOCK_N": int(layout.block_k)}
            out = fn()
        torch.cuda.synchronize()
        row["compile_ms"] = round((time.perf_counter() - tc) * 1e3, 1)
        row["kernel_options"] = kernel_options
        if out_tr is not None:
            diff = (out.float() - out_tr.float()).abs()
            err = float("nan") if torch.isnan(diff).any() else float(diff.max())
            row["check"] = {
                "against": "triton output at the benchmark size",
                "max_abs_err": err,
                "ok": err <= 5e-2,
            }
            if not row["check"]["ok"]:
                row["status"] = "failed-correctness (flex and triton disagree)"
        del out
        if row["status"] == "ok":
            row["time_ms"] = time_cuda(fn)
            pairs = attended_pairs(layout, HQ)
            row["tflops_effective"] = _tflops(pairs, row["time_ms"]["p50"])
    except Exception as exc:
        _fail(row, exc, "unsupported")
    _log_row(log, row, t0)
    return row


def _log_row(log: Callable[[str], None], row: dict[str, Any], t0: float) -> None:
    p50 = row["time_ms"]["p50"] if row.get("time_ms") else None
    what = f"{p50:.3f} ms" if p50 is not None else row["status"]
    log(
        f"  {row['length']:>6} {row['op']:<20} {row['method']:<12} {row.get('label', ''):<34} {what}"
        f"  ({time.perf_counter() - t0:.1f}s)"
    )


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    dense = {r["length"]: r["time_ms"]["p50"] for r in rows if r["op"] == "sdpa" and r.get("time_ms")}
    flex = {
        (r["length"], r["method"], r["label"]): r["time_ms"]["p50"]
        for r in rows
        if r["op"] == "flex_attention" and r.get("time_ms")
    }
    for r in rows:
        t = r["time_ms"]["p50"] if r.get("time_ms") else None
        base = dense.get(r["length"])
        r["speedup_vs_dense"] = round(base / t, 3) if t and base else None
        fx = flex.get((r["length"], r["method"], r["label"]))
        r["speedup_vs_flex"] = round(fx / t, 3) if (t and fx and r["op"] == "triton_block_sparse") else None
        if r["op"] == "triton_block_sparse" and r.get("density"):
            r["target_speedup"] = round(GOAL_FACTOR / r["density"], 3)


def evaluate_goals(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's prefill targets, judged on the rows at >= 32k tokens (None when not measured)."""
    sel = [r for r in rows if r["op"] == "triton_block_sparse" and r["length"] >= GOAL_MIN_LENGTH]
    vs_dense = [
        {
            "length": r["length"],
            "method": r["method"],
            "label": r["label"],
            "density": r["density"],
            "speedup_vs_dense": r["speedup_vs_dense"],
            "target": r.get("target_speedup"),
            "met": None
            if r["speedup_vs_dense"] is None or r.get("target_speedup") is None
            else r["speedup_vs_dense"] >= r["target_speedup"],
        }
        for r in sel
    ]
    vs_flex = [
        {
            "length": r["length"],
            "method": r["method"],
            "label": r["label"],
            "speedup_vs_flex": r["speedup_vs_flex"],
            "met": r["speedup_vs_flex"] > 1.0,
        }
        for r in sel
        if r.get("speedup_vs_flex") is not None
    ]

    def all_met(items: list[dict[str, Any]]) -> bool | None:
        if not items or any(i["met"] is None for i in items):
            return None if not items else False
        return all(i["met"] for i in items)

    return {
        "prefill_speedup_vs_dense": {
            "description": f"Triton prefill at >= {GOAL_MIN_LENGTH} tokens is >= {GOAL_FACTOR} / density times "
            "faster than dense SDPA (flash backend)",
            "rows": vs_dense,
            "met": all_met(vs_dense),
        },
        "prefill_faster_than_flex": {
            "description": "Triton prefill is faster than FlexAttention with the identical BlockMask",
            "rows": vs_flex,
            "met": all_met(vs_flex),
        },
    }


def gpu_environment(device: str = "cuda") -> dict[str, Any]:
    """harness.environment() plus the GPU, CUDA, Triton and optional baselines' versions."""
    env = harness.environment()
    props = torch.cuda.get_device_properties(device)
    env["gpu"] = {
        "name": props.name,
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
    }
    env["cuda"] = torch.version.cuda
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import flash_attn  # type: ignore[import-not-found]

        env["flash_attn"] = getattr(flash_attn, "__version__", "unknown")
    except ImportError:
        env["flash_attn"] = None
    return env


# ----------------------------------------------------------------------------------------------
# entry points


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def default_json_path(quick: bool = False, gpu_name: str | None = None) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    gpu = _slug(gpu_name or (torch.cuda.get_device_name() if torch.cuda.is_available() else "gpu"))
    return Path("bench") / "results" / f"kernels-{gpu}-{date}{'-quick' if quick else ''}.json"


def run_kernels(
    *,
    lengths: Sequence[int] | None = None,
    densities: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    quick: bool = False,
    flex: bool = True,
    flex_densities: Sequence[float] | None = None,
    flex_lengths: Sequence[int] | None = None,
    flash_attn: bool = True,
    block_size: int = BLOCK,
    device: str = "cuda",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the GPU prefill benchmark and return the result document (rows, goals, environment).

    ``quick=True``: lengths 2k/4k, densities 10/50%, check length 1k. ``methods`` filters the
    patterns ("s2", "sink_local", "block_sparse"); ``flex_densities`` picks the densities whose cases
    also run FlexAttention (each recompiles; default 10% only; ``flex=False`` for none) and
    ``flex_lengths`` the lengths where it runs (default: all).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
    log = log or (lambda _msg: None)
    lengths = tuple(lengths) if lengths else (QUICK_LENGTHS if quick else DEFAULT_LENGTHS)
    densities = tuple(densities) if densities else (QUICK_DENSITIES if quick else DENSITIES)
    flex_d = tuple(flex_densities) if flex_densities is not None else FLEX_DENSITIES
    if not flex:
        flex_d = ()
    case_list = [c for c in cases(densities) if methods is None or c.method in methods]
    check_len = QUICK_CHECK_LEN if quick else CHECK_LEN

    env = gpu_environment(device)
    rows: list[dict[str, Any]] = []
    checks: dict[tuple[str, str], dict[str, Any]] = {}
    t_start = time.perf_counter()
    with torch.no_grad():
        for n in lengths:
            log(f"prefill {n} ...")
            rows.extend(
                _bench_length(
                    int(n),
                    case_list,
                    block=block_size,
                    device=device,
                    check_len=check_len,
                    flex_densities=flex_d if (flex_lengths is None or n in flex_lengths) else (),
                    use_flash_attn=flash_attn,
                    checks=checks,
                    log=log,
                )
            )
            torch.cuda.empty_cache()
    _add_speedups(rows)
    return harness.finite(
        {
            "schema_version": SCHEMA_VERSION,
            "benchmark": "kernels",
            "device": env["gpu"]["name"],
            "env": env,
            "config": {
                "shape": {"B": BATCH, "Hq": HQ, "Hkv": HKV, "D": HEAD_DIM, "dtype": "bfloat16"},
                "block_size": block_size,
                "lengths": list(lengths),
                "densities": list(densities),
                "methods": sorted({c.method for c in case_list}),
                "flex_densities": list(flex_d),
                "flex_lengths": None if flex_lengths is None else list(flex_lengths),
                "timing": {
                    "method": "cuda events",
                    "warmup": WARMUP,
                    "min_repeats": MIN_REPEATS,
                    "max_repeats": MAX_REPEATS,
                    "budget_ms": BUDGET_MS,
                },
                "check_length": check_len,
                "quick": quick,
            },
            "wall_time_s": round(time.perf_counter() - t_start, 1),
            "rows": rows,
            "goals": evaluate_goals(rows),
        }
    )


def _fmt(x: Any, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(result: dict[str, Any]) -> str:
    head = (
        f"{'length':>6} {'op':<20} {'method':<12} {'label':<32} {'density':>7} {'p50 ms':>9} "
        f"{'vs sdpa':>7} {'target':>6} {'vs flex':>7} {'TFLOP/s':>7}  status"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        p50 = r["time_ms"]["p50"] if r.get("time_ms") else None
        lines.append(
            f"{r['length']:>6} {r['op']:<20} {r['method']:<12} {str(r.get('label', ''))[:32]:<32} "
            f"{_fmt(r.get('density'), '.3f'):>7} {_fmt(p50, '.3f'):>9} {_fmt(r.get('speedup_vs_dense'), '.2f'):>7} "
            f"{_fmt(r.get('target_speedup'), '.1f'):>6} {_fmt(r.get('speedup_vs_flex'), '.2f'):>7} "
            f"{_fmt(r.get('tflops_effective'), '.0f'):>7}  {r['status']}"
        )
    lines.append("")
    for name, g in result["goals"].items():
        met = {True: "MET", False: "NOT MET", None: "not measured"}[g["met"]]
        lines.append(f"goal {name}: {met} ({len(g['rows'])} rows)")
    env = result["env"]
    lines.append(
        f"{env['gpu']['name']}, torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda')}, "
        f"commit {env['git_commit'][:12]}, {result['wall_time_s']} s"
    )
    return "\n".join(lines)


def has_failures(result: dict[str, Any]) -> bool:
    """True when a row failed its correctness check or errored ('unsupported'/'skipped' do not count)."""
    return any(r["status"].startswith(("failed", "error")) for r in result["rows"])

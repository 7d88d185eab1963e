"""GPU decode benchmark: the Triton sparse decode kernels against dense SDPA decode.

Shape: Llama-3-8B-like attention (32 query heads, 8 KV heads, D=128, bf16), one query token per
sequence, cache N = 32k..256k tokens, batch 1 and 8. Sparse cases read 1/16 and 1/64 of the cache:

- ``token``: ``token_decode`` over a random TokenSelection of N*f keys per (row, KV head), shared by
  the GQA group (so each selected row is read once per KV head);
- ``block``: ``block_decode`` over random lists of 64-key blocks covering N*f keys per (row, KV head);

each on a contiguous cache ``[B, Hkv, N, D]`` and on a vLLM-style paged cache
``[num_pages, 16, Hkv, D]`` whose pages are randomly permuted (block_table order != memory order).
The dense baseline is ``scaled_dot_product_attention`` with the GQA group folded into the query
length (q viewed as ``[B, Hkv, group, D]``, no mask), which reads K/V once per KV head, the fastest
dense decode SDPA offers. Everything is timed with ``triton.testing.do_bench`` (L2 flushed between
runs; p20/p50/p80 in ms), and as device time from CUDA graph replays (``kernel_ms``).

Bandwidth: ``bytes`` is what a case must read — K and V rows it attends to (for sparse cases the
selected rows only, plus the index lists), and ``achieved_GBps = bytes / kernel_ms``. The device's copy
bandwidth is measured in the same run with a large device-to-device ``copy_`` (bytes read + written
per second, the usual convention), and ``bw_fraction`` = achieved / copy (goal: >= 0.7).

Correctness first: before a sparse case is timed its output (and lse) is compared with the torch
token-sparse path of sparse_attn on the same inputs (the block lists expanded to token selections);
a case that fails is reported ``failed-correctness`` without a time.

Run on a CUDA machine: ``python -m sparse_attn.bench.kernels_decode [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import harness

SCHEMA_VERSION = 1
HQ, HKV, HEAD_DIM = 32, 8, 128
DTYPE = torch.bfloat16
PAGE_SIZE = 16
BLOCK_K = 64
LENGTHS = (32768, 65536, 131072, 262144)
BATCHES = (1, 8)
FRACTIONS = (1 / 16, 1 / 64)
QUICK_LENGTHS = (32768,)
QUICK_BATCHES = (1,)
GOAL_BW_FRACTION = 0.7
REL_TOL = 2e-2  # max |out - ref| / max |ref| against the torch path (bf16 output rounding ~4e-3)
SEED = 0


def _bench(fn: Callable[[], Any], quick: bool) -> dict[str, float]:
    from triton.testing import do_bench

    p20, p50, p80 = do_bench(
        fn, warmup=10 if quick else 25, rep=30 if quick else 100, quantiles=[0.2, 0.5, 0.8]
    )
    return {"p20": round(p20, 5), "p50": round(p50, 5), "p80": round(p80, 5)}


_FLUSH: list[torch.Tensor] = []


def _bench_graph(fn: Callable[[], Any]) -> float:
    """Device time of one ``fn()`` in ms from CUDA graph replays, L2 flushed before each call:
    graph(flush; fn) minus graph(flush), so host launch overhead is excluded (as when a server
    replays decode graphs) and small selections are not served from a warm L2."""
    from triton.testing import do_bench_cudagraph

    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.int8, device="cuda"))
    buf = _FLUSH[0]

    def both() -> None:
        buf.zero_()
        fn()

    t_both = do_bench_cudagraph(both, rep=50, return_mode="median")
    t_flush = do_bench_cudagraph(buf.zero_, rep=50, return_mode="median")
    return round(max(t_both - t_flush, 1e-6), 5)


def copy_bandwidth_GBps(n_bytes: int = 2 << 30, quick: bool = False) -> dict[str, Any]:
    """Device-to-device copy of ``n_bytes``: (read + written bytes) / p50 time, in GB/s."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    t = _bench(lambda: dst.copy_(src), quick)
    gbps = 2 * n_bytes / (t["p50"] * 1e-3) / 1e9
    return {"bytes_copied": n_bytes, "time_ms": t, "copy_GBps": round(gbps, 1)}


def gpu_environment() -> dict[str, Any]:
    import triton

    env = harness.environment()
    props = torch.cuda.get_device_properties(0)
    env["gpu"] = {
        "name": props.name,
        "sm_count": props.multi_processor_count,
        "memory_GiB": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
    }
    env["cuda"] = torch.version.cuda
    env["triton"] = triton.__version__
    return env


def _sorted_random_subsets(rows: int, n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """[rows, count] int32: per row, ``count`` distinct values of [0, n), ascending (on the GPU)."""
    keys = torch.rand(rows, n, generator=gen, device="cuda")
    return keys.topk(count, dim=1).indices.sort(dim=1).values.to(torch.int32)


def _paged(k: torch.Tensor, v: torch.Tensor, gen: torch.Generator):
    """The same cache as vLLM V1 paged tensors [num_pages, PAGE_SIZE, Hkv, D] in permuted pages."""
    B, H, N, D = k.shape
    ppr = N // PAGE_SIZE
    perm = torch.randperm(B * ppr, generator=gen, device="cuda")
    table = perm.view(B, ppr).to(torch.int32)

    def scatter(x: torch.Tensor) -> torch.Tensor:
        cache = torch.empty(B * ppr, PAGE_SIZE, H, D, dtype=x.dtype, device="cuda")
        cache[perm] = x.view(B, H, ppr, PAGE_SIZE, D).permute(0, 2, 3, 1, 4).reshape(B * ppr, PAGE_SIZE, H, D)
        return cache

    return scatter(k), scatter(v), table


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def _row(op: str, method: str, B: int, N: int, fraction: float, cache: str, **extra: Any) -> dict[str, Any]:
    row = {
        "op": op,
        "method": method,
        "mode": "decode",
        "cache": cache,
        "shape": {"B": B, "Hq": HQ, "Hkv": HKV, "Sq": 1, "kv_len": N, "D": HEAD_DIM, "dtype": "bf16"},
        "density": fraction,
        "time_ms": None,
        "kernel_ms": None,
        "speedup_vs_dense": None,
        "kernel_speedup_vs_dense": None,
        "bytes": None,
        "achieved_GBps": None,
        "bw_fraction": None,
        "status": "ok",
    }
    row.update(extra)
    return row


def _bench_length(
    B: int, N: int, quick: bool, copy_gbps: float, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    import sparse_attn as sa
    from sparse_attn.triton_kernels.sparse_decode import block_decode, token_decode

    gen = torch.Generator(device="cuda").manual_seed(SEED + N + B)
    group = HQ // HKV
    q = torch.randn(B, HQ, 1, HEAD_DIM, generator=gen, device="cuda").to(DTYPE)
    k = torch.randn(B, HKV, N, HEAD_DIM, generator=gen, device="cuda").to(DTYPE)
    v = torch.randn(B, HKV, N, HEAD_DIM, generator=gen, device="cuda").to(DTYPE)
    kv_lens = torch.full((B,), N, dtype=torch.int32, device="cuda")
    elt = k.element_size()
    rows: list[dict[str, Any]] = []

    # dense SDPA decode, GQA group folded into the query length: reads K and V once per KV head
    qg = q.view(B, HKV, group, HEAD_DIM)
    dense_row = _row("sdpa", "dense", B, N, 1.0, "contiguous")
    dense_row["time_ms"] = _bench(lambda: F.scaled_dot_product_attention(qg, k, v), quick)
    dense_row["kernel_ms"] = _bench_graph(lambda: F.scaled_dot_product_attention(qg, k, v))
    dense_row["bytes"] = 2 * B * HKV * N * HEAD_DIM * elt
    rows.append(dense_row)
    dense_p50 = dense_row["time_ms"]["p50"]
    dense_kernel = dense_row["kernel_ms"]

    kc, vc, table = _paged(k, v, gen)
    for fraction in FRACTIONS:
        count = int(N * fraction)
        # token selection shared by each GQA group
        idx = _sorted_random_subsets(B * HKV, N, count, gen).view(B, HKV, count)
        cnt = torch.full((B, HKV), count, dtype=torch.int32, device="cuda")
        sel = sa.TokenSelection(indices=idx, counts=cnt)
        # block lists of 64-key blocks covering the same number of keys
        n_blocks = count // BLOCK_K
        blk = _sorted_random_subsets(B * HKV, N // BLOCK_K, n_blocks, gen).view(B, HKV, n_blocks)
        bcnt = torch.full((B, HKV), n_blocks, dtype=torch.int32, device="cuda")
        keys = (blk.long()[..., None] * BLOCK_K + torch.arange(BLOCK_K, device="cuda")).flatten(2)
        bsel = sa.TokenSelection(indices=keys, counts=torch.full_like(bcnt, n_blocks * BLOCK_K))
        sel_bytes = 2 * B * HKV * count * HEAD_DIM * elt
        for method, selection, list_bytes in (
            ("token", sel, idx.numel() * 4),
            ("block", bsel, blk.numel() * 4),
        ):
            ref_out, ref_lse = sa.token_sparse_attention(
                q, k, v, selection, causal=True, kv_lens=kv_lens, backend="torch", return_lse=True
            )
            for cache in ("contiguous", "paged"):
                paged = {"block_table": table, "page_size": PAGE_SIZE} if cache == "paged" else {}
                kk, vv = (kc, vc) if cache == "paged" else (k, v)
                if method == "token":

                    def fn(kk=kk, vv=vv, paged=paged, check=True, idx=idx, cnt=cnt):
                        return token_decode(
                            q,
                            kk,
                            vv,
                            idx,
                            cnt,
                            None,
                            None,
                            kv_lens,
                            causal=True,
                            scale=None,
                            check_inputs=check,
                            **paged,
                        )

                else:

                    def fn(kk=kk, vv=vv, paged=paged, check=True, blk=blk, bcnt=bcnt):
                        return block_decode(
                            q,
                            kk,
                            vv,
                            blk,
                            bcnt,
                            None,
                            kv_lens,
                            block_k=BLOCK_K,
                            causal=True,
                            scale=None,
                            check_inputs=check,
                            **paged,
                        )

                row = _row(f"triton_{method}_decode", method, B, N, fraction, cache, keys_per_head=count)
                rows.append(row)
                try:
                    out, lse = fn()
                    err = _rel_err(out, ref_out)
                    lse_err = float((lse - ref_lse.float()).abs().max())
                    row["max_rel_err"], row["lse_max_abs_err"] = round(err, 6), round(lse_err, 6)
                    if not (err <= REL_TOL and lse_err <= 1e-2):
                        row["status"] = "failed-correctness"
                        log(f"  {method}/{cache} f={fraction:.4f}: FAILED correctness (rel err {err:.3g})")
                        continue
                    # validated once above; timed without the host check (its device sync), as a
                    # server that validated its page table (or replays a CUDA graph) runs it
                    row["time_ms"] = _bench(lambda fn=fn: fn(check=False), quick)
                    row["kernel_ms"] = _bench_graph(lambda fn=fn: fn(check=False))
                except Exception as exc:  # report, keep going
                    row["status"] = f"error: {type(exc).__name__}: {str(exc)[:160]}"
                    log(f"  {method}/{cache}: {row['status']}")
                    continue
                p50 = row["time_ms"]["p50"]
                row["bytes"] = sel_bytes + list_bytes
                row["speedup_vs_dense"] = round(dense_p50 / p50, 3)
                row["kernel_speedup_vs_dense"] = round(dense_kernel / row["kernel_ms"], 3)
                log(
                    f"  B={B} N={N} {method:5s} {cache:10s} f=1/{round(1 / fraction)}: {p50 * 1e3:8.1f} us "
                    f"(kernel {row['kernel_ms'] * 1e3:7.1f} us) speedup {row['speedup_vs_dense']:6.2f}x "
                    f"(kernel {row['kernel_speedup_vs_dense']:6.2f}x)"
                )
    for row in rows:
        if row["time_ms"] is not None and row["bytes"]:
            gbps = row["bytes"] / (row["kernel_ms"] * 1e-3) / 1e9
            row["achieved_GBps"] = round(gbps, 1)
            row["bw_fraction"] = round(gbps / copy_gbps, 3)
            eager = row["bytes"] / (row["time_ms"]["p50"] * 1e-3) / 1e9
            row["achieved_GBps_eager"] = round(eager, 1)
    return rows


def evaluate_goal(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The decode bandwidth goal over the timed sparse rows: min / median bw_fraction vs 0.7."""
    fr = sorted(r["bw_fraction"] for r in rows if r["op"].startswith("triton") and r.get("bw_fraction"))
    if not fr:
        return {"goal_bw_fraction": GOAL_BW_FRACTION, "met": False, "rows": 0}
    return {
        "goal_bw_fraction": GOAL_BW_FRACTION,
        "rows": len(fr),
        "min": fr[0],
        "median": fr[len(fr) // 2],
        "max": fr[-1],
        "rows_meeting_goal": sum(f >= GOAL_BW_FRACTION for f in fr),
        "met": fr[len(fr) // 2] >= GOAL_BW_FRACTION,
    }


def default_json_path(gpu_name: str, quick: bool = False) -> Path:
    date = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name.lower()).strip("-")
    return Path("bench") / "results" / f"kernels-decode-{gpu}-{date}{'-quick' if quick else ''}.json"


def run_decode(
    quick: bool = False,
    *,
    lengths: Sequence[int] | None = None,
    batches: Sequence[int] | None = None,
    json_path: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the decode benchmark on the current CUDA device; returns (and writes) the JSON record.

    ``quick`` runs one length (32k) and batch 1 with fewer timing repeats. ``json_path`` None writes
    ``bench/results/kernels-decode-<gpu>-<date>.json``; pass "" to skip writing.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the decode kernel benchmark needs a CUDA GPU")
    lengths = tuple(lengths or (QUICK_LENGTHS if quick else LENGTHS))
    batches = tuple(batches or (QUICK_BATCHES if quick else BATCHES))
    torch.manual_seed(SEED)
    env = gpu_environment()
    copy = copy_bandwidth_GBps(quick=quick)
    log(f"{env['gpu']['name']}: copy bandwidth {copy['copy_GBps']} GB/s (read + write)")
    rows: list[dict[str, Any]] = []
    for B in batches:
        for N in lengths:
            rows.extend(_bench_length(B, N, quick, copy["copy_GBps"], log))
            torch.cuda.empty_cache()  # the length's tensors are gone with its frame
    result = {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "kernels-decode",
        "quick": quick,
        "environment": env,
        "config": {
            "Hq": HQ,
            "Hkv": HKV,
            "D": HEAD_DIM,
            "dtype": "bf16",
            "page_size": PAGE_SIZE,
            "block_k": BLOCK_K,
            "fractions": list(FRACTIONS),
            "lengths": list(lengths),
            "batches": list(batches),
            "timer": "time_ms: triton.testing.do_bench of the eager call (L2 flushed, host overhead included), "
            "p20/p50/p80 ms; kernel_ms: median of CUDA-graph replays of (L2 flush; call) minus (L2 flush)",
            "bandwidth": "achieved_GBps = bytes / kernel_ms; bw_fraction = achieved / copy_GBps",
            "host_checks": "each sparse case is validated once (check_inputs=True), then timed with check_inputs=False",
            "bytes": "K+V rows the case must read (+ index lists for sparse cases)",
            "dense": "F.scaled_dot_product_attention with q viewed as [B, Hkv, group, D]",
        },
        "copy_bandwidth": copy,
        "rows": rows,
        "goal": evaluate_goal(rows),
    }
    if json_path != "":
        path = harness.write_json(result, json_path or default_json_path(env["gpu"]["name"], quick))
        log(f"wrote {path}")
    return result


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{'op':22s} {'cache':10s} {'B':>2s} {'N':>7s} {'dens':>6s} {'p50 us':>9s} {'speedup':>8s} {'GB/s':>7s} {'of copy':>7s}  status"
    ]
    for r in result["rows"]:
        t = r["time_ms"]["p50"] * 1e3 if r["time_ms"] else math.nan
        lines.append(
            f"{r['op']:22s} {r['cache']:10s} {r['shape']['B']:2d} {r['shape']['kv_len']:7d} {r['density']:6.4f} "
            f"{t:9.1f} {r['speedup_vs_dense'] or math.nan:8.2f} {r['achieved_GBps'] or math.nan:7.0f} "
            f"{r['bw_fraction'] or math.nan:7.2f}  {r['status']}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="output path ('' to skip writing)")
    p.add_argument("--lengths", default=None, help="comma-separated cache lengths, e.g. 32768,65536")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes, e.g. 1,8")
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.lengths.split(",")] if a.lengths else None
    batches = [int(x) for x in a.batches.split(",")] if a.batches else None
    result = run_decode(a.quick, lengths=lengths, batches=batches, json_path=a.json)
    print(format_table(result))
    print(json.dumps(result["goal"]))
    return 0 if all(r["status"] == "ok" for r in result["rows"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())

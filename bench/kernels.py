"""The throughput benchmark on GPU (``sparse-attn bench kernels``): the harness of ``runner.py`` with
the Triton kernels called directly, CUDA-event timing and the kernels' goals. Only what differs
from CPU is here.

Shape: Llama-3-8B-like attention, Hq=32, Hkv=8 (GQA 4), D=128, bf16, block 64. Prefill (B=1, causal,
8k..128k): dense SDPA pinned to the flash backend (the speedup baseline), the cuDNN backend and
``flash_attn_func`` when they run; the Triton block-sparse kernel over each case's layout (moved to
the GPU once, output preallocated); FlexAttention with the identical BlockMask at 10%. Decode (B=1
and 8, 32k..256k cache): dense SDPA with the GQA group folded into the query length (q viewed as
``[B, Hkv, group, D]``: K and V read once per KV head, the fastest dense decode SDPA offers), the
shared method rows, and the Triton ``token_decode`` / ``block_decode`` kernels over 1/16 and 1/64
random keys / 64-key blocks, on the contiguous cache and on a vLLM-style paged copy
``[num_pages, 16, Hkv, D]`` whose pages are randomly permuted (block_table order != memory order).

Timing: CUDA events, 2 warmup calls, then 5..100 timed calls until 300 ms; decode rows zero a 256 MiB
buffer before each call (outside the timing) so their reads do not come from a warm L2. Dense and
selection decode rows also get ``kernel_ms``, the device time from CUDA graph replays (L2 flushed,
host launch overhead excluded, as when a server replays decode graphs), their ``bytes`` (K and V
rows read plus index lists) and ``achieved_GBps = bytes / kernel_ms``; ``bw_fraction`` is that over
the device-to-device copy bandwidth measured in the same run (read + written bytes per second).

Every function here imports without a GPU; the kernels also run on CPU tensors under
``TRITON_INTERPRET=1`` (how the tests run this suite).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import cases, goals, harness, runner

HQ, HKV, HEAD_DIM, BLOCK = 32, 8, 128, 64
DTYPE = torch.bfloat16
PAGE_SIZE = 16
DEFAULT_LENGTHS = (8192, 16384, 32768, 65536, 131072)
QUICK_LENGTHS = (2048, 4096)
QUICK_DENSITIES = (0.10, 0.50)
DECODE_LENGTHS = (32768, 65536, 131072, 262144)
DECODE_BATCHES = (1, 8)
QUICK_DECODE_LENGTHS = (32768,)
QUICK_DECODE_BATCHES = (1,)
DECODE_FRACTIONS = (1 / 16, 1 / 64)
FLEX_DENSITIES = (0.10,)
CHECK_LENGTHS = {"prefill": 2048, "decode": 4096}
QUICK_CHECK_LENGTHS = {"prefill": 1024, "decode": 4096}
FLUSH_BYTES = 256 << 20  # larger than any GPU's L2
COPY_BYTES = 2 << 30
TRITON_OPS = ("triton_token_decode", "triton_block_decode")


# ----------------------------------------------------------------------------------------------
# dense baselines


def _sdpa_backend(backend_name: str) -> Callable[[Any, Any, Any], tuple[runner.Fn, dict[str, Any]]]:
    """Dense causal SDPA pinned to one backend: native GQA when the backend takes it, else K/V
    repeated once outside the timing."""

    def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[runner.Fn, dict[str, Any]]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend_name)
        params = {"backend": backend_name}

        def native() -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

        try:
            native()
            return native, {**params, "gqa": "enable_gqa"}
        except Exception:  # this backend has no GQA path here
            kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            vr = v.repeat_interleave(q.shape[1] // k.shape[1], dim=1)

            def repeated() -> torch.Tensor:
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, kr, vr, is_causal=True)

            repeated()
            return repeated, {**params, "gqa": "repeat_kv (outside the timing)"}

    return prepare


def _flash_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[runner.Fn, dict[str, Any]]:
    try:
        import flash_attn  # type: ignore[import-not-found]
    except ImportError:
        raise ImportError("flash-attn is not installed") from None
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # flash-attn takes [B, S, H, D]

    def fn() -> torch.Tensor:
        return flash_attn.flash_attn_func(qt, kt, vt, causal=True).transpose(1, 2)

    return fn, {"version": getattr(flash_attn, "__version__", "unknown")}


def _sdpa_decode_folded(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[runner.Fn, dict[str, Any]]:
    b, hq, _, d = q.shape
    qg = q.view(b, k.shape[1], hq // k.shape[1], d)  # every query sees every key: no mask needed

    def fn() -> torch.Tensor:
        return F.scaled_dot_product_attention(qg, k, v).view(b, hq, 1, d)

    return fn, {"gqa": "group folded into the query length"}


# ----------------------------------------------------------------------------------------------
# Triton kernels


def _triton_block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Any) -> runner.Fn:
    from sparse_attn.triton_kernels.block_sparse_fwd import block_sparse_fwd

    out = torch.empty(*q.shape[:3], v.shape[3], dtype=q.dtype, device=q.device)

    def fn() -> torch.Tensor:
        return block_sparse_fwd(
            q,
            k,
            v,
            layout.kv_indices,
            layout.kv_counts,
            layout.full,
            layout.q_lens,
            layout.kv_lens,
            block_q=layout.block_q,
            block_k=layout.block_k,
            causal=layout.causal,
            sink_tokens=layout.sink_tokens,
            window_tokens=layout.window_tokens,
            out=out,
        )[0]

    return fn


def paged_cache(inputs: runner.Inputs) -> dict[str, Any]:
    """The inputs' cache as vLLM V1 paged tensors [num_pages, PAGE_SIZE, Hkv, D] in randomly permuted
    pages, with its block table (built once per length)."""
    if "paged" not in inputs.derived:
        k, v = inputs.k, inputs.v
        b, h, n, d = k.shape
        per_row = n // PAGE_SIZE
        perm = torch.randperm(b * per_row, generator=torch.Generator().manual_seed(runner.DATA_SEED)).to(
            k.device
        )

        def scatter(x: torch.Tensor) -> torch.Tensor:
            pages = (
                x.view(b, h, per_row, PAGE_SIZE, d)
                .permute(0, 2, 3, 1, 4)
                .reshape(b * per_row, PAGE_SIZE, h, d)
            )
            cache = torch.empty_like(pages)
            cache[perm] = pages
            return cache

        inputs.derived["paged"] = {
            "k": scatter(k),
            "v": scatter(v),
            "block_table": perm.view(b, per_row).to(torch.int32),
            "page_size": PAGE_SIZE,
        }
    return inputs.derived["paged"]


def _decode_kernel(blocks: bool, paged: bool) -> Callable[[runner.Inputs, runner.Selection, bool], runner.Fn]:
    def prepare(inputs: runner.Inputs, sel: runner.Selection, check_inputs: bool) -> runner.Fn:
        from sparse_attn.triton_kernels.sparse_decode import block_decode, token_decode

        q, k, v = inputs.q, inputs.k, inputs.v
        kv_lens = torch.full((inputs.batch,), inputs.n, dtype=torch.int32, device=q.device)
        cache: dict[str, Any] = {}
        if paged:
            p = paged_cache(inputs)
            k, v, cache = p["k"], p["v"], {"block_table": p["block_table"], "page_size": p["page_size"]}
        common = {"causal": True, "scale": None, "check_inputs": check_inputs, **cache}

        def fn() -> torch.Tensor:
            if blocks:
                return block_decode(
                    q, k, v, sel.blocks, sel.block_counts, None, kv_lens, block_k=runner.BLOCK_K, **common
                )[0]
            return token_decode(q, k, v, sel.indices, sel.counts, None, None, kv_lens, **common)[0]

        return fn

    return prepare


def kernel_ms(fn: runner.Fn) -> float:
    """Device time of one ``fn()`` in ms from CUDA graph replays, L2 flushed before each call:
    graph(flush; fn) minus graph(flush), so host launch overhead is excluded (as when a server replays
    decode graphs) and small selections are not served from a warm L2."""
    from triton.testing import do_bench_cudagraph

    buf = harness.Timer(clock="cuda", flush_bytes=FLUSH_BYTES).flush_buffer()

    def both() -> None:
        buf.zero_()
        fn()

    t_both = do_bench_cudagraph(both, rep=50, return_mode="median")
    t_flush = do_bench_cudagraph(buf.zero_, rep=50, return_mode="median")
    return round(max(t_both - t_flush, 1e-6), 5)


def copy_bandwidth(device: harness.Device, n_bytes: int = COPY_BYTES) -> dict[str, Any]:
    """Device-to-device copy of ``n_bytes``: (read + written bytes) / p50 time, in GB/s."""
    src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device.type).normal_()
    dst = torch.empty_like(src)
    t = device.decode_timer.time(lambda: dst.copy_(src)).summary()
    return {
        "bytes_copied": n_bytes,
        "time_ms": t,
        "copy_GBps": round(2 * n_bytes / (t["p50"] * 1e-3) / 1e9, 1),
    }


def gpu_suite(*, flash_attn: bool = True, graphs: bool = True, copy_bytes: int = COPY_BYTES) -> runner.Suite:
    """The GPU suite; ``graphs=False`` and a small ``copy_bytes`` let it run on CPU tensors (tests)."""
    dense_prefill = [
        runner.DenseKernel("sdpa", "causal, flash_attention", _sdpa_backend("FLASH_ATTENTION")),
        runner.DenseKernel(
            "sdpa_cudnn", "causal, cudnn_attention", _sdpa_backend("CUDNN_ATTENTION"), optional=True
        ),
    ]
    if flash_attn:
        dense_prefill.append(
            runner.DenseKernel("flash_attn", "causal flash_attn_func", _flash_attn, optional=True)
        )
    return runner.Suite(
        recipe=cases.GPU_PREFILL,
        dense_prefill=tuple(dense_prefill),
        dense_decode=(runner.DenseKernel("sdpa", "all keys, GQA group folded", _sdpa_decode_folded),),
        sparse_op="triton_block_sparse",
        sparse_kernel=_triton_block_sparse,
        token_kernels=tuple(
            runner.SelectionKernel("triton_token_decode", cache, _decode_kernel(False, cache == "paged"))
            for cache in ("contiguous", "paged")
        ),
        block_kernels=tuple(
            runner.SelectionKernel("triton_block_decode", cache, _decode_kernel(True, cache == "paged"))
            for cache in ("contiguous", "paged")
        ),
        goals=lambda rows: goals.gpu_goals(rows, "triton_block_sparse", TRITON_OPS),
        kernel_ms=kernel_ms if graphs else None,
        copy_bandwidth=lambda device: copy_bandwidth(device, copy_bytes),
    )


def gpu_device(device: str = "cuda", dtype: Any = DTYPE) -> harness.Device:
    prefill = harness.Timer(clock="cuda", warmup=2, min_repeats=5, max_repeats=100, budget_s=0.3)
    decode = harness.Timer(
        clock="cuda", warmup=2, min_repeats=5, max_repeats=100, budget_s=0.3, flush_bytes=FLUSH_BYTES
    )
    return harness.Device(device, dtype, HQ, HKV, HEAD_DIM, BLOCK, prefill, decode)


def default_json_path(gpu_name: str, quick: bool = False) -> Path:
    return harness.default_json_path(f"kernels-{harness.slug(gpu_name)}", quick)


def run_kernels(
    *,
    lengths: Sequence[int] | None = None,
    decode_lengths: Sequence[int] | None = None,
    batches: Sequence[int] | None = None,
    densities: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    quick: bool = False,
    flex: bool = True,
    flex_densities: Sequence[float] | None = None,
    flex_lengths: Sequence[int] | None = None,
    flash_attn: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the GPU benchmark (prefill and decode) and return the result document.

    ``quick=True``: prefill 2k/4k at 10/50%, check length 1k; decode 32k at B=1. ``methods``
    filters the method cases ("s2", "sink_local", "block_sparse", "moa", "topk", "quest");
    ``flex_densities`` picks the densities whose cases also run FlexAttention (each recompiles;
    default 10% only; ``flex=False`` skips them) and ``flex_lengths`` the lengths where it runs
    (default: all).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the kernel benchmark needs a CUDA GPU (torch.cuda.is_available() is False)")
    options = runner.Options(
        prefill_lengths=tuple(lengths or ()) or (QUICK_LENGTHS if quick else DEFAULT_LENGTHS),
        decode_lengths=tuple(decode_lengths or ()) or (QUICK_DECODE_LENGTHS if quick else DECODE_LENGTHS),
        check_lengths=QUICK_CHECK_LENGTHS if quick else CHECK_LENGTHS,
        decode_batches=tuple(batches or ()) or (QUICK_DECODE_BATCHES if quick else DECODE_BATCHES),
        decode_fractions=DECODE_FRACTIONS,
        densities=tuple(densities) if densities else (QUICK_DENSITIES if quick else None),
        methods=methods,
        flex=flex,
        flex_densities=tuple(flex_densities) if flex_densities is not None else FLEX_DENSITIES,
        flex_lengths=flex_lengths,
        quick=quick,
    )
    return runner.run_suite(gpu_suite(flash_attn=flash_attn), gpu_device(), options, log=log)

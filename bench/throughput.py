"""The throughput benchmark on CPU (``sparse-attn bench throughput``): the harness of
``runner.py`` with the public ``sparse_attn`` kernels, wall-clock timing and the goals of issues 2 and 13.

Shape: fp32, B=1, Hq=8, Hkv=2 (GQA group 4), D=64, block 64, 2 torch threads unless told otherwise —
dense causal SDPA at 32k takes a few seconds per run on a 2-core CPU. Prefill at 4k/16k/32k: dense
``scaled_dot_product_attention`` against SinkLocal, S2, BlockSparse A-shape (each at ~5/10/25%)
and MoA (~10%) through ``block_sparse_attention(q, k, v, layout)``, and FlexAttention on the ~10%
layouts. Decode over an 8k/16k/32k/64k cache: dense SDPA, SinkLocal and S2 planned to 1/16 of the cache
(at 8k: ~512 keys, issue 13's per-step goal),
``token_sparse_attention`` over 1/16 random keys, TopK and Quest at 5% with their selection.

Timing: the first call is untimed (it carries the peak-RSS probe), then up to ``DEFAULT_REPEATS``
timed calls (decode: ``DECODE_REPEATS``), stopping once a case has used ``CASE_BUDGET_S`` (decode:
``DECODE_BUDGET_S``) and made ``MIN_REPEATS`` runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import cases, goals, harness, runner

HQ, HKV, HEAD_DIM, BLOCK = 8, 2, 64, 64
DEFAULT_PREFILL_LENGTHS = (4096, 16384, 32768)
DEFAULT_DECODE_LENGTHS = (8192, 16384, 32768, 65536)
QUICK_PREFILL_LENGTHS = (512,)
QUICK_DECODE_LENGTHS = (1024,)
DEFAULT_REPEATS = 10
MIN_REPEATS = 3
CASE_BUDGET_S = 4.0  # timed runs stop after this much time once MIN_REPEATS runs were made
# A decode call takes 0.05-15 ms: ten samples span a few ms of a machine whose speed moves by tens of
# percent from one second to the next, so decode rows take up to this many samples within this budget
DECODE_REPEATS = 200
DECODE_BUDGET_S = 1.0
CHECK_LENGTHS = {"prefill": 448, "decode": 1024}  # the self-checks' small shapes
DEFAULT_THREADS = 2


def _sdpa_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[runner.Fn, dict[str, Any]]:
    return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), {}


def _sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[runner.Fn, dict[str, Any]]:
    # one query at the end sees every key: no mask (SDPA's is_causal is top-left aligned)
    return lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), {}


def _block_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: Any) -> runner.Fn:
    import sparse_attn as sa

    return lambda: sa.block_sparse_attention(q, k, v, layout)


def _token_sparse(inputs: runner.Inputs, sel: runner.Selection, _check_inputs: bool) -> runner.Fn:
    import sparse_attn as sa

    tokens = sa.TokenSelection(indices=sel.indices, counts=sel.counts, log_weights=None)
    return lambda: sa.token_sparse_attention(inputs.q, inputs.k, inputs.v, tokens)


SUITE = runner.Suite(
    recipe=cases.CPU_PREFILL,
    dense_prefill=(runner.DenseKernel("sdpa", "causal", _sdpa_prefill),),
    dense_decode=(runner.DenseKernel("sdpa", "all keys", _sdpa_decode),),
    sparse_op="block_sparse_attention",
    sparse_kernel=_block_sparse,
    token_kernels=(runner.SelectionKernel("token_sparse_attention", "contiguous", _token_sparse),),
    block_kernels=(),
    goals=goals.cpu_goals,
)


def cpu_device(repeats: int, budget_s: float | None, decode_repeats: int | None = None) -> harness.Device:
    """The CPU device: prefill rows take ``repeats`` samples at most, decode rows ``decode_repeats``
    (default ``repeats``) within ``DECODE_BUDGET_S`` when a budget applies."""
    timer = harness.Timer(clock="wall", min_repeats=MIN_REPEATS, max_repeats=repeats, budget_s=budget_s)
    decode = harness.Timer(
        clock="wall",
        min_repeats=MIN_REPEATS,
        max_repeats=decode_repeats or repeats,
        budget_s=None if budget_s is None else DECODE_BUDGET_S,
    )
    return harness.Device("cpu", torch.float32, HQ, HKV, HEAD_DIM, BLOCK, timer, decode)


def default_json_path(quick: bool = False) -> Path:
    return harness.default_json_path("throughput-cpu", quick)


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
    decode: bool = True,
) -> dict[str, Any]:
    """Run the CPU benchmark and return the result document (rows, goals, environment);
    ``prefill=False`` / ``decode=False`` leave out the prefill / decode cases (both: no kernel rows,
    for a full-model-only run)."""
    torch.set_num_threads(threads or DEFAULT_THREADS)
    options = runner.Options(
        prefill_lengths=(
            tuple(lengths or ()) or (QUICK_PREFILL_LENGTHS if quick else DEFAULT_PREFILL_LENGTHS)
        )
        if prefill
        else (),
        decode_lengths=(
            tuple(decode_lengths or ()) or (QUICK_DECODE_LENGTHS if quick else DEFAULT_DECODE_LENGTHS)
        )
        if decode
        else (),
        check_lengths=CHECK_LENGTHS,
        flex=(not quick) if flex is None else flex,
        quick=quick,
    )
    repeats = repeats if repeats is not None else (1 if quick else DEFAULT_REPEATS)
    device = cpu_device(repeats, None if quick else CASE_BUDGET_S, None if quick else max(repeats, DECODE_REPEATS))
    return runner.run_suite(SUITE, device, options, log=log)

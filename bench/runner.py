"""The throughput harness: one run of a ``Suite`` on a ``Device`` gives the rows of every case,
prefill and decode, in the same JSON schema on CPU and GPU.

A suite names what differs between devices: the dense baselines, the kernel that runs a planned
block layout, the kernels that run a decode selection (contiguous and paged caches), the goals and
the GPU's extra measurements (device time from CUDA graph replays, copy bandwidth). The cases
(``cases.py``), the rows and their order, the correctness gate (``checks.py``), the timing
(``harness.Timer``), the memory probe and the derived fields (``schema.add_derived``) are shared.

Per prefill length (Sq = Skv = N, causal, B=1): the dense baselines; each static case planned once
outside the timing (``plan_ms``), its measured ``layout.density()`` and the kernel over the layout;
FlexAttention with a BlockMask built from the same layout for the cases at ``flex_densities``.

Per decode batch and cache length (Sq = 1): the dense baselines; the static cases planned to select
each decode fraction; random keys per (row, KV head) at each fraction through the token kernels and
random 64-key blocks through the block kernels; TopK and Quest at 5% with their selection inside
every timed step. Quest's timed steps are consecutive decode steps, each one key longer (a
side-data store only extends): the store is built for the first ``N - steps`` keys outside the
timing; after the timed steps, ``BREAKDOWN_STEPS`` more time the store update, the selection and the
attention one by one (``breakdown_ms``), ending at N. TopK's row has the same breakdown.

A row is timed only after its self-check passed (status ``failed-correctness`` and no time
otherwise). Its first call is untimed and carries the memory probe; then the device's timer.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from . import cases as case_lists
from . import checks, harness, schema
from . import flex as flex_baseline

DATA_SEED = 0
DYNAMIC_DENSITY = 0.05
BREAKDOWN_STEPS = 10  # decode steps whose parts are timed one by one (rows' breakdown_ms)
BLOCK_K = 64  # keys per block of the random block lists

Row = dict[str, Any]
Fn = Callable[[], torch.Tensor]


@dataclass
class Inputs:
    """One length's tensors; ``derived`` caches what kernels build from them (a paged copy)."""

    mode: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    derived: dict[str, Any] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return int(self.q.shape[0])

    @property
    def n(self) -> int:
        return int(self.k.shape[2])

    @property
    def qkv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v))


@dataclass(frozen=True)
class Selection:
    """Random keys of each (row, KV head) for the decode kernels: ascending token ``indices``
    [B, Hkv, K] with ``counts`` [B, Hkv]; for key-block lists also the ``blocks`` [B, Hkv, nb] the
    tokens expand from."""

    indices: torch.Tensor
    counts: torch.Tensor
    blocks: torch.Tensor | None = None
    block_counts: torch.Tensor | None = None

    @property
    def index_bytes(self) -> int:
        lists = self.indices if self.blocks is None else self.blocks
        return lists.numel() * lists.element_size()


@dataclass(frozen=True)
class DenseKernel:
    """A dense baseline. ``prepare(q, k, v)`` gives the call to time and the params to record; it
    raises ImportError when the baseline's package is missing (the row is skipped)."""

    op: str
    label: str
    prepare: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[Fn, dict[str, Any]]]
    optional: bool = False  # a backend this machine may lack: a failure reads "unsupported"


@dataclass(frozen=True)
class SelectionKernel:
    """A decode kernel over a ``Selection``: ``prepare(inputs, selection, check_inputs)`` gives the
    call (``check_inputs=False``: timed without the host-side validation, as a server that
    validated its tables once)."""

    op: str
    cache: str  # "contiguous" or "paged"
    prepare: Callable[[Inputs, Selection, bool], Fn]


@dataclass(frozen=True)
class Suite:
    """What a run measures on its device."""

    recipe: case_lists.PrefillRecipe
    dense_prefill: Sequence[DenseKernel]
    dense_decode: Sequence[DenseKernel]
    sparse_op: str  # the op name of the rows that run a planned block layout
    sparse_kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], Fn]  # (q, k, v, layout)
    token_kernels: Sequence[SelectionKernel]
    block_kernels: Sequence[SelectionKernel]
    goals: Callable[[list[Row]], dict[str, Any]]
    kernel_ms: Callable[[Fn], float] | None = None  # device time without host overhead
    copy_bandwidth: Callable[[harness.Device], dict[str, Any]] | None = None


@dataclass(frozen=True)
class Options:
    """A run's choices (the CLI's options and the device's defaults)."""

    prefill_lengths: Sequence[int]
    decode_lengths: Sequence[int]
    check_lengths: dict[str, int]  # per mode: the self-checks' small length
    decode_batches: Sequence[int] = (1,)
    decode_fractions: Sequence[float] = (1.0 / 16,)
    densities: Sequence[float] | None = None  # prefill densities (default: the recipe's)
    methods: Sequence[str] | None = None  # the method cases to run (default: all)
    flex: bool = True
    flex_densities: Sequence[float] = (0.10,)
    flex_lengths: Sequence[int] | None = None  # default: every prefill length
    quick: bool = False


class Run:
    """One run in progress: measuring, failing and logging rows, and the self-checks done so far
    (a check at the same shape and config is not repeated at the next length)."""

    def __init__(self, suite: Suite, device: harness.Device, options: Options, log: Callable[[str], None]):
        self.suite, self.device, self.options, self.log = suite, device, options, log
        self._checks: dict[str, dict[str, Any]] = {}

    def check_length(self, mode: str, n: int) -> int:
        return min(self.options.check_lengths[mode], n)

    def checked(self, key: tuple[Any, ...], check: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        k = json.dumps(harness.finite(key), sort_keys=True, default=str)
        if k not in self._checks:
            self._checks[k] = check()
        return self._checks[k]

    def measure(self, row: Row, fn: Fn, *, kernel_time: bool = False) -> torch.Tensor:
        """First (untimed) call under the memory probe, then the timed runs. Returns the output."""
        out, extra = self.device.peak_extra_memory(fn)
        timing = self.device.timer(row["mode"]).time(fn)
        row["time_ms"] = timing.summary()
        row["repeats"] = len(timing.samples_ms)
        row["peak_extra_mem_bytes"] = extra
        row["peak_extra_mem_ratio"] = None if extra is None else round(extra / row["qkv_bytes"], 4)
        if kernel_time and self.suite.kernel_ms is not None:
            row["kernel_ms"] = self.suite.kernel_ms(fn)
        return out

    @staticmethod
    def passed(row: Row) -> bool:
        """Whether the row's check passed; a failed one marks the row ``failed-correctness``."""
        if not row["check"]["ok"]:
            row["status"] = "failed-correctness"
        return bool(row["check"]["ok"])

    @staticmethod
    def fail(row: Row, exc: BaseException, prefix: str = "error") -> None:
        row["status"] = f"{prefix}: {harness.short_error(exc)}"
        row["time_ms"] = None

    def done(self, row: Row, t0: float) -> Row:
        p50 = schema.p50(row)
        what = f"{p50:.3f} ms" if p50 is not None else row["status"]
        self.log(
            f"  {row['mode']:<7} {row['length']:>6} B={row['shape']['B']:<2} {row['op']:<22} {row['method']:<12} "
            f"{row.get('label', ''):<32} {what}  ({time.perf_counter() - t0:.1f}s)"
        )
        return row

    def row(self, inputs: Inputs, op: str, method: str, label: str, target: float, **extra: Any) -> Row:
        """A new row of this run for ``inputs``, ``target`` its target density."""
        sq = inputs.n if inputs.mode == "prefill" else 1
        shape = self.device.shape(inputs.batch, sq, inputs.n)
        return schema.new_row(
            op, method, label, inputs.mode, shape, target_density=target, qkv_bytes=inputs.qkv_bytes, **extra
        )


# ----------------------------------------------------------------------------------------------
# rows


def dense_row(run: Run, kernel: DenseKernel, inputs: Inputs) -> Row:
    t0 = time.perf_counter()
    prefill = inputs.mode == "prefill"
    row = run.row(inputs, kernel.op, "dense", kernel.label, 1.0, density=1.0, params={"is_causal": prefill})
    if not prefill:  # decode reads all of K and V once
        row["bytes"] = inputs.k.numel() * inputs.k.element_size() * 2
    try:
        cl = run.check_length(inputs.mode, inputs.n)
        sq = cl if prefill else 1

        def check() -> dict[str, Any]:
            return checks.check_dense(lambda q, k, v: kernel.prepare(q, k, v)[0], run.device, sq, cl)

        row["check"] = run.checked(("dense", inputs.mode, kernel.op, sq, cl), check)
        if run.passed(row):
            fn, params = kernel.prepare(inputs.q, inputs.k, inputs.v)
            row["params"].update(params)
            run.measure(row, fn, kernel_time=not prefill)
    except ImportError as exc:  # an optional baseline's package
        row["status"] = f"skipped: {exc}"
    except Exception as exc:  # one failing case must not end the run
        run.fail(row, exc, "unsupported" if kernel.optional else "error")
    return run.done(row, t0)


def static_row(run: Run, case: case_lists.Case, inputs: Inputs) -> tuple[Row, Any, torch.Tensor | None]:
    """A static method's row: (row, the plan, the kernel's output when it was timed)."""
    t0 = time.perf_counter()
    d, n = run.device, inputs.n
    sq = n if inputs.mode == "prefill" else 1
    row = run.row(inputs, run.suite.sparse_op, case.method, case.label, case.target_density)
    plan = out = None
    try:
        method = case.build(n, d.block)
        row["params"] = harness.method_params(method)
        if case.method == "s2":
            row["params"]["covers_full_context"] = bool(method.covers_full_context(d.kv_heads))
        cl = run.check_length(inputs.mode, n)
        csq = cl if inputs.mode == "prefill" else 1
        # the recipe at the small length (sparse there too) and the benchmarked config itself
        found = [
            run.checked(
                ("static", run.suite.sparse_op, harness.method_params(m), csq, cl),
                lambda m=m: checks.check_static(m, run.suite.sparse_kernel, d, csq, cl),
            )
            for m in (case.build(cl, d.block), method)
        ]
        row["check"] = {"ok": all(c["ok"] for c in found), "checks": found}
        if run.passed(row):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tp = time.perf_counter()
                b = inputs.batch  # per-row lengths give a layout of b rows
                lens = (sq, n) if b == 1 else (torch.full((b,), sq), torch.full((b,), n))
                plan = method.plan(*lens, d.q_heads, d.kv_heads)
                row["plan_ms"] = round((time.perf_counter() - tp) * 1e3, 3)
            td = time.perf_counter()
            row["density"] = round(float(plan.density()), 5)
            row["density_ms"] = round((time.perf_counter() - td) * 1e3, 3)
            row["layout_heads"] = int(plan.num_heads)
            fn = run.suite.sparse_kernel(inputs.q, inputs.k, inputs.v, plan.to(d.type))  # moved once
            out = run.measure(row, fn)
    except Exception as exc:  # one failing case must not end the run
        run.fail(row, exc)
    return run.done(row, t0), plan, out


def flex_row(run: Run, case: case_lists.Case, sparse: Row, plan: Any, ref_out: Any, inputs: Inputs) -> Row:
    """``torch.compile(flex_attention)`` over a BlockMask with the sparse row's blocks, checked
    against the sparse kernel's output at the benchmark size."""
    t0 = time.perf_counter()
    d, (q, k, v), n = run.device, (inputs.q, inputs.k, inputs.v), inputs.n
    row = run.row(
        inputs,
        schema.FLEX_OP,
        case.method,
        case.label,
        case.target_density,
        params=sparse.get("params", {}),
        density=sparse.get("density"),
    )
    if not run.options.flex:
        row["status"] = "skipped: FlexAttention disabled (--no-flex or --quick)"
    elif sparse["status"] != "ok" or plan is None or ref_out is None:
        row["status"] = "skipped: the sparse kernel row has no verified output to check against"
    else:
        try:
            bm = flex_baseline.layout_to_block_mask(plan, d.q_heads, n, n, d.type)
            fa = flex_baseline.compiled_flex()
            options: dict[str, int] | None = None

            def fn() -> torch.Tensor:
                return fa(q, k, v, block_mask=bm, enable_gqa=True, kernel_options=options)

            tc = time.perf_counter()
            try:
                out = fn()  # compiles
            except Exception:  # a sparse block smaller than flex's default tile: tiles of the block size
                options = {"BLOCK_M": int(plan.block_q), "BLOCK_N": int(plan.block_k)}
                out = fn()
            d.sync()
            row["compile_ms"] = round((time.perf_counter() - tc) * 1e3, 1)
            row["kernel_options"] = options
            row["check"] = checks.agreement(
                out, ref_out, f"{run.suite.sparse_op} output at the benchmark size"
            )
            del out
            if run.passed(row):
                run.measure(row, fn)
        except Exception as exc:  # FlexAttention is best effort: record why
            run.fail(row, exc, "unsupported")
    return run.done(row, t0)


def random_selection(run: Run, inputs: Inputs, fraction: float, block_k: int | None) -> Selection:
    """``fraction`` of the cache per (row, KV head): random keys, or random ``block_k``-key blocks.
    Indices are int32 on CUDA (what the Triton kernels read), int64 elsewhere (the torch path)."""
    b, h, n = inputs.batch, run.device.kv_heads, inputs.n
    dev = inputs.k.device
    dtype = torch.int32 if dev.type == "cuda" else torch.int64
    g = torch.Generator().manual_seed(DATA_SEED)

    def subsets(size: int, count: int) -> torch.Tensor:  # [B, Hkv, count], ascending
        picks = [torch.randperm(size, generator=g)[:count].sort().values for _ in range(b * h)]
        return torch.stack(picks).view(b, h, count).to(dev, dtype)

    count = max(1, round(n * fraction))
    if block_k is None:
        return Selection(subsets(n, count), torch.full((b, h), count, dtype=dtype, device=dev))
    nb = max(1, count // block_k)
    blocks = subsets(n // block_k, nb)
    keys = (blocks[..., None] * block_k + torch.arange(block_k, device=dev, dtype=dtype)).flatten(2)
    return Selection(
        keys,
        torch.full((b, h), nb * block_k, dtype=dtype, device=dev),
        blocks,
        torch.full((b, h), nb, dtype=dtype, device=dev),
    )


def selection_rows(run: Run, inputs: Inputs, fraction: float, blocks: bool) -> list[Row]:
    """Random keys (or key blocks) through each of the suite's token (block) kernels."""
    kernels = run.suite.block_kernels if blocks else run.suite.token_kernels
    if not kernels:
        return []
    m = round(1 / fraction)
    tp = time.perf_counter()
    sel = random_selection(run, inputs, fraction, BLOCK_K if blocks else None)
    plan_ms = round((time.perf_counter() - tp) * 1e3, 3)
    keys = int(sel.counts.max())
    rows = []
    for kernel in kernels:
        t0 = time.perf_counter()
        label = f"1/{m} random {BLOCK_K}-key blocks" if blocks else f"1/{m} random keys"
        row = run.row(
            inputs,
            kernel.op,
            "block_random" if blocks else "token_random",
            label if kernel.cache == "contiguous" else f"{label}, paged",
            fraction,
            params={
                "selected": keys,
                "seed": DATA_SEED,
                "log_weights": False,
                **({"block_k": BLOCK_K} if blocks else {}),
            },
            cache=kernel.cache,
            plan_ms=plan_ms,
            density=round(keys / inputs.n, 5),
            bytes=2 * sel.indices.numel() * inputs.k.shape[-1] * inputs.k.element_size() + sel.index_bytes,
        )
        try:
            out = kernel.prepare(inputs, sel, True)()
            row["check"] = checks.check_selection(out, inputs.q, inputs.k, inputs.v, sel.indices, sel.counts)
            del out
            if run.passed(row):
                run.measure(row, kernel.prepare(inputs, sel, False), kernel_time=True)
        except Exception as exc:  # one failing case must not end the run
            run.fail(row, exc)
        rows.append(run.done(row, t0))
    return rows


def dynamic_rows(run: Run, inputs: Inputs, method_names: Sequence[str] | None) -> list[Row]:
    """TopK and Quest decode steps at ``DYNAMIC_DENSITY``, the selection inside every timed call."""
    rows: list[Row] = []
    cl = run.check_length("decode", inputs.n)
    for case in case_lists.dynamic_cases(DYNAMIC_DENSITY, run.device.kv_heads, run.device.head_dim):
        if method_names is not None and case.method not in method_names:
            continue
        t0 = time.perf_counter()
        method = case.build(inputs.n, run.device.block)
        row = run.row(
            inputs,
            "token_sparse_attention",
            case.method,
            case.label,
            case.target_density,
            params=harness.method_params(method),
            selection_included=True,
        )
        try:
            row["check"] = run.checked(
                ("dynamic", row["params"], cl),
                lambda method=method: checks.check_dynamic(method, run.device, cl),
            )
            if run.passed(row):
                (time_topk if case.method == "topk" else time_side_data)(run, row, method, inputs)
        except Exception as exc:  # one failing case must not end the run
            run.fail(row, exc)
        rows.append(run.done(row, t0))
    return rows


def time_topk(run: Run, row: Row, method: Any, inputs: Inputs) -> None:
    """One ``sparse_attention(q, k, v, TopK(...))`` call per step: exact scores, top-k, attention."""
    import sparse_attn as sa

    q, k, v = inputs.q, inputs.k, inputs.v
    row["density"] = round(float(sa.select(method, q, k).density(torch.full((inputs.batch,), inputs.n))), 5)
    run.measure(row, lambda: sa.sparse_attention(q, k, v, method))
    sel = sa.select(method, q, k)
    row["breakdown_ms"] = breakdown(
        run,
        {
            "select (exact scores + top-k)": lambda: sa.select(method, q, k),
            "token_sparse_attention": lambda: sa.token_sparse_attention(q, k, v, sel),
        },
    )


def time_side_data(run: Run, row: Row, method: Any, inputs: Inputs) -> None:
    """Consecutive decode steps of a method with side data (Quest, Loki, MagicPIG): the side-data
    store's update for the step's new key, then ``sparse_attention(..., side=...)`` (the selection
    from the side data, token-sparse attention).

    k and v are the cache at its capacity N, right-padded: a step's row holds ``length`` keys
    (kv_lens), as in a static or paged cache. The store is built outside the timing for the keys
    before the first step; it then only extends, over the untimed memory-probe call, the warmup and
    timed calls, and the breakdown's steps, which end at N."""
    import sparse_attn as sa
    from sparse_attn.side_data import ContiguousSideStore

    q, k, v, n = inputs.q, inputs.k, inputs.v, inputs.n
    timer = run.device.timer("decode")
    start = max(1, n - (1 + timer.warmup + timer.max_repeats + BREAKDOWN_STEPS))
    store = ContiguousSideStore(method)
    tp = time.perf_counter()
    store.update(k, torch.full((inputs.batch,), start), new_tokens=start)
    run.device.sync()
    row["side_build_ms"] = round((time.perf_counter() - tp) * 1e3, 3)
    state: dict[str, Any] = {"len": start, "side": None}

    def step() -> torch.Tensor:
        length = state["len"] = min(state["len"] + 1, n)
        lens = torch.full((inputs.batch,), length)
        side = state["side"] = store.update(k, lens, new_tokens=1)
        return sa.sparse_attention(q, k, v, method, side=side, kv_lens=lens)

    run.measure(row, step)
    row["kv_lens_timed"] = [start + 2 + timer.warmup, state["len"]]  # after the probe and the warmup
    row["breakdown_ms"] = side_data_breakdown(run, method, store, state, inputs)
    row["side_rebuilds_while_timed"] = store.rebuilds - 1
    lens = torch.full((inputs.batch,), state["len"])
    row["density"] = round(float(sa.select(method, q, k, side=state["side"], kv_lens=lens).density(lens)), 5)


def breakdown(run: Run, parts: dict[str, Fn]) -> dict[str, float]:
    """Median ms of each part of a step, timed on its own (``BREAKDOWN_STEPS`` runs each)."""
    timer = replace(
        run.device.timer("decode"),
        warmup=1,
        min_repeats=1,
        budget_s=None,
        max_repeats=1 if run.options.quick else BREAKDOWN_STEPS,
    )
    return {key: round(timer.time(fn).p50, 3) for key, fn in parts.items()}


SELECT_PARTS = {
    "quest": "select (bounds + top blocks)",
    "loki": "select (low-rank scores + top-k)",
    "magicpig": "select (query codes, collisions, sample weights)",
}


def side_data_breakdown(
    run: Run, method: Any, store: Any, state: dict[str, Any], inputs: Inputs
) -> dict[str, float]:
    """Where consecutive decode steps spend their time: the next steps, each part timed on its own
    (the store update must run before the selection of the same step)."""
    import sparse_attn as sa

    d, (q, k, v) = run.device, (inputs.q, inputs.k, inputs.v)
    parts: dict[str, list[float]] = {
        "side-data store update": [],
        SELECT_PARTS.get(method.name, "select"): [],
        "token_sparse_attention": [],
    }
    for _ in range(min(BREAKDOWN_STEPS, inputs.n - state["len"])):
        length = state["len"] = state["len"] + 1
        lens = torch.full((inputs.batch,), length)
        ta = time.perf_counter()
        side = store.update(k, lens, new_tokens=1)
        d.sync()
        tb = time.perf_counter()
        sel = sa.select(method, q, k, side=side, kv_lens=lens)
        d.sync()
        tc = time.perf_counter()
        sa.token_sparse_attention(q, k, v, sel, kv_lens=lens)
        d.sync()
        td = time.perf_counter()
        for key, dt in zip(parts, (tb - ta, tc - tb, td - tc)):
            parts[key].append(dt * 1e3)
    return {key: round(harness.percentile(x, 50), 3) for key, x in parts.items() if x}


# ----------------------------------------------------------------------------------------------
# the run


def prefill_rows(run: Run, n: int, case_list: Sequence[case_lists.Case]) -> list[Row]:
    inputs = Inputs("prefill", *run.device.qkv(1, n, n, DATA_SEED + n))
    rows = [dense_row(run, kernel, inputs) for kernel in run.suite.dense_prefill]
    flex_here = run.options.flex_lengths is None or n in run.options.flex_lengths
    for case in case_list:
        row, plan, out = static_row(run, case, inputs)
        rows.append(row)
        if flex_here and any(abs(case.target_density - f) < 1e-9 for f in run.options.flex_densities):
            rows.append(flex_row(run, case, row, plan, out, inputs))
        del out
    return rows


def decode_rows(run: Run, batch: int, n: int) -> list[Row]:
    o = run.options
    inputs = Inputs("decode", *run.device.qkv(batch, 1, n, DATA_SEED + n + batch))
    rows = [dense_row(run, kernel, inputs) for kernel in run.suite.dense_decode]
    for fraction in o.decode_fractions:
        for case in case_lists.decode_cases(fraction):
            if o.methods is None or case.method in o.methods:
                rows.append(static_row(run, case, inputs)[0])
    for fraction in o.decode_fractions:
        rows += selection_rows(run, inputs, fraction, blocks=False)
        rows += selection_rows(run, inputs, fraction, blocks=True)
    return rows + dynamic_rows(run, inputs, o.methods)


def run_suite(
    suite: Suite,
    device: harness.Device,
    options: Options,
    *,
    benchmark_config: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run ``suite`` on ``device`` and return the result document (rows, goals, environment)."""
    import sparse_attn  # noqa: F401 - fail early with the import error

    log = log or (lambda _msg: None)
    o = options
    env = harness.environment(device.type)  # at the start: timestamp and load before the run
    other_load = harness.OtherLoad()
    other_load.start()
    run = Run(suite, device, o, log)
    prefill_cases = [
        c
        for c in case_lists.prefill_cases(suite.recipe, device.q_heads, o.densities)
        if o.methods is None or c.method in o.methods
    ]
    copy = suite.copy_bandwidth(device) if suite.copy_bandwidth and o.decode_lengths else None
    if copy:
        log(f"copy bandwidth {copy['copy_GBps']} GB/s (read + write)")
    rows: list[Row] = []
    t_start = time.perf_counter()
    with torch.no_grad():
        for n in o.prefill_lengths:
            log(f"prefill {n} ...")
            rows += prefill_rows(run, int(n), prefill_cases)
            device.release()
        for batch in o.decode_batches:
            for n in o.decode_lengths:
                log(f"decode {n} (B={batch}) ...")
                rows += decode_rows(run, int(batch), int(n))
                device.release()
    schema.add_derived(rows, suite.sparse_op, copy["copy_GBps"] if copy else None)
    wall = time.perf_counter() - t_start
    env["machine"]["load_avg_end"] = harness.load_avg()
    env["machine"]["other_processes_cpu_fraction"] = other_load.stop()
    config = {
        "shape": {
            "B": 1,
            "Hq": device.q_heads,
            "Hkv": device.kv_heads,
            "D": device.head_dim,
            "dtype": device.dtype_name,
            "block_size": device.block,
        },
        "prefill_lengths": list(o.prefill_lengths),
        "decode_lengths": list(o.decode_lengths),
        "decode_batches": list(o.decode_batches),
        "decode_fractions": list(o.decode_fractions),
        "densities": sorted({c.target_density for c in prefill_cases}),
        "methods": sorted({c.method for c in prefill_cases}),
        "timers": {"prefill": device.prefill_timer.describe(), "decode": device.decode_timer.describe()},
        "threads": torch.get_num_threads(),
        "quick": o.quick,
        "flex": o.flex,
        "flex_densities": list(o.flex_densities),
        "flex_lengths": None if o.flex_lengths is None else list(o.flex_lengths),
        "check_lengths": dict(o.check_lengths),
        **(benchmark_config or {}),
    }
    return harness.finite(
        {
            "schema_version": schema.SCHEMA_VERSION,
            "benchmark": "throughput",
            "device": device.type,
            "env": env,
            "config": config,
            "wall_time_s": round(wall, 1),
            **({"copy_bandwidth": copy} if copy else {}),
            "rows": rows,
            "goals": suite.goals(rows),
        }
    )

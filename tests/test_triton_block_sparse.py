"""The Triton block-sparse prefill kernel against the torch path (its oracle).

Runs on CPU tensors under ``TRITON_INTERPRET=1`` (tiny shapes: block 16, lengths <= 200) and, when a
CUDA GPU is present and the interpreter is off (``TRITON_INTERPRET=0``), on CUDA at larger sizes (block
64, lengths x 16) and in bf16 too. Only one of the two device sets is collected, never skipped.
Outputs are poisoned with NaN before every call, so an unwritten element fails. Tolerances are
relative to the error of the same masked attention done naively in the inputs' precision.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import sparse_attn as sa
from sparse_attn.block_layout import TileGeometry

try:
    from tests.oracle import NEG_INF, dense_attention, lowp_dense_attention, make_qkv, max_err
except ModuleNotFoundError:  # tests/ itself on sys.path
    from oracle import NEG_INF, dense_attention, lowp_dense_attention, make_qkv, max_err  # type: ignore[no-redef]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
ON_CUDA = (not INTERPRET) and torch.cuda.is_available()

if ON_CUDA:
    RUNS = [
        pytest.param(("cuda", torch.float32), id="cuda-fp32"),
        pytest.param(("cuda", torch.float16), id="cuda-fp16"),
        pytest.param(("cuda", torch.bfloat16), id="cuda-bf16"),
    ]
else:  # the interpreter (conftest sets it); bf16 tl.dot is wrong there, so fp32/fp16 only
    RUNS = [
        pytest.param(("cpu", torch.float32), id="cpu-fp32"),
        pytest.param(("cpu", torch.float16), id="cpu-fp16"),
    ]
DEVICES = sorted({p.values[0][0] for p in RUNS})


def _kernel():
    from sparse_attn.triton_kernels.block_sparse_fwd import block_sparse_fwd

    return block_sparse_fwd


@pytest.fixture(params=RUNS)
def run(request) -> tuple[str, torch.dtype]:
    return request.param


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


# ----------------------------------------------------------------------------- helpers
def call_kernel(q, k, v, layout: sa.BlockLayout, *, scale=None, poison=True, lay_device=None):
    """Run the kernel over a layout into NaN-poisoned out / lse buffers."""
    dev = q.device
    lay_device = dev if lay_device is None else lay_device
    b, hq, sq, _ = q.shape
    out = torch.full((b, hq, sq, v.shape[-1]), float("nan"), dtype=q.dtype, device=dev) if poison else None
    lse = torch.full((b, hq, sq), float("nan"), dtype=torch.float32, device=dev) if poison else None

    def mv(t):
        return None if t is None else t.to(lay_device)

    return _kernel()(
        q,
        k,
        v,
        mv(layout.kv_indices),
        mv(layout.kv_counts),
        mv(layout.full),
        mv(layout.q_lens),
        mv(layout.kv_lens),
        block_q=layout.block_q,
        block_k=layout.block_k,
        causal=layout.causal,
        sink_tokens=mv(layout.sink_tokens),
        window_tokens=mv(layout.window_tokens),
        scale=scale,
        return_lse=True,
        out=out,
        lse_out=lse,
    )


def dense_layout_mask(layout: sa.BlockLayout, hq: int, hkv: int, sq: int, skv: int) -> torch.Tensor:
    """The layout's exact element mask expanded to query heads, bool [B, Hq, Sq, Skv]."""
    m = layout.to_dense_mask(sq, skv)
    h = m.shape[1]
    if h == hq:
        return m
    if h == hkv:
        return m.repeat_interleave(hq // hkv, dim=1)
    return m.expand(-1, hq, -1, -1)


def check_against_torch(q, k, v, layout: sa.BlockLayout, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel vs the torch backend: same -inf rows, same exact-zero rows, values within a tolerance
    scaled by the low-precision error of the same computation. Returns the kernel's (out, lse)."""
    out, lse = call_kernel(q, k, v, layout, scale=scale)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    cpu = [t.cpu() for t in (q, k, v)]
    ref, ref_lse = sa.block_sparse_attention(*cpu, layout, scale=scale, backend="torch", return_lse=True)
    out, lse = out.cpu(), lse.cpu()
    assert not torch.isnan(out).any(), "unwritten (NaN-poisoned) or NaN output elements"
    assert not torch.isnan(lse).any(), "unwritten (NaN-poisoned) or NaN lse elements"
    # rows the torch path leaves empty (padding, no visible key) are exactly 0 / -inf
    empty = ref_lse == NEG_INF
    assert torch.equal(lse == NEG_INF, empty), "lse is -inf at different rows than the torch path"
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "empty rows are not exactly 0"
    # tolerance: the distance of the naive low-precision computation from float64
    _, hq, sq, _ = q.shape
    mask = dense_layout_mask(layout, hq, k.shape[1], sq, k.shape[2])
    ref64, _ = dense_attention(*cpu, mask, scale=scale)
    lowp, _ = lowp_dense_attention(
        *[t.float() if t.dtype == torch.float32 else t for t in cpu], mask, scale=scale
    )
    yard = max_err(lowp, ref64, where=~empty[..., None].expand_as(ref64))
    floor = 2e-5 if q.dtype == torch.float32 else 2e-3
    tol = max(4 * yard, floor)
    err = max_err(out, ref.to(out.dtype), where=~empty[..., None].expand_as(out))
    assert err <= tol, (
        f"max |kernel - torch| = {err:.3g} > tol {tol:.3g} (low-precision yardstick {yard:.3g})"
    )
    lse_tol = 1e-5 if q.dtype == torch.float32 else 1e-3
    torch.testing.assert_close(lse[~empty], ref_lse[~empty].float(), atol=lse_tol, rtol=lse_tol)
    return out, lse


# ----------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """Sizes are for the interpreter; on CUDA lengths are multiplied by CUDA_SCALE and block is 64."""

    name: str
    method: Callable[[int, int], sa.StaticMethod]  # (block_size, length scale) -> method
    q_lens: tuple[int, ...]
    kv_lens: tuple[int, ...]
    hq: int
    hkv: int
    d: int
    causal: bool = True
    layout_heads: str = ""  # documentation: which layout head count the method plans

    def sizes(self, device: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        if device == "cpu":
            return self.q_lens, self.kv_lens, 16
        # decode rows (q_len 1) and empty rows stay as they are
        return (
            tuple(x if x <= 1 else x * CUDA_SCALE for x in self.q_lens),
            tuple(x if x <= 1 else x * CUDA_SCALE for x in self.kv_lens),
            64,
        )

    @property
    def id(self) -> str:
        j = lambda xs: "_".join(map(str, xs))  # noqa: E731
        c = "causal" if self.causal else "noncausal"
        return f"{self.name}-B{len(self.q_lens)}-q{j(self.q_lens)}-kv{j(self.kv_lens)}-HQ{self.hq}-KV{self.hkv}-D{self.d}-{c}"


CUDA_SCALE = 16


def _moa(hq: int) -> Callable[[int, int], sa.StaticMethod]:
    def build(block: int, s: int) -> sa.StaticMethod:
        alphas = tuple(float(8 * s * (h + 1)) for h in range(hq))
        betas = tuple(0.05 + 0.1 * h for h in range(hq))
        return sa.MoA(alphas=(alphas,), betas=(betas,), sink_tokens=3 * s, min_span=5 * s, block_size=block)

    return build


def _rowless_layout(block: int, s: int) -> sa.StaticMethod:
    # query blocks 1 and 3 see no key block at all (empty rows); others see their diagonal and block 0
    n = 32
    lay = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        if i % 2 == 0 or i > 4:
            lay[i, i] = True
            lay[i, 0] = True
    return sa.BlockSparse(block_size=block, layout=lay)


def _mask_fn(block: int, s: int) -> sa.StaticMethod:
    # per query head: head h sees key blocks with (q_block + kv_block + h) % 3 != 0 (H = Hq layout)
    return sa.BlockSparse(block_size=block, mask_fn=lambda b, h, qb, kb: (qb + kb + h) % 3 != 0)


CASES = [
    Case("dense", lambda blk, s: sa.Dense(block_size=blk), (63,), (63,), 2, 2, 64),
    Case("dense", lambda blk, s: sa.Dense(block_size=blk), (1,), (1,), 1, 1, 64),
    Case(
        "s2-chunked",
        lambda blk, s: sa.S2(block_size=blk, local_blocks=2, vert_stride=2),
        (63, 17),
        (200, 100),
        4,
        1,
        96,
        layout_heads="Hkv",
    ),
    Case(
        "s2-gqa4",
        lambda blk, s: sa.S2(block_size=blk, local_blocks=1, vert_stride=2),
        (100, 37),
        (100, 61),
        8,
        2,
        64,
        layout_heads="Hkv",
    ),
    Case(
        "sinklocal-decode",
        lambda blk, s: sa.SinkLocal(sink_tokens=5 * s, window_tokens=40 * s, block_size=blk),
        (1, 1),
        (200, 63),
        4,
        1,
        64,
    ),
    Case(
        "sinklocal-pad",
        lambda blk, s: sa.SinkLocal(sink_tokens=4 * s, window_tokens=23 * s, block_size=blk),
        (0, 45, 120),
        (50, 45, 130),
        2,
        2,
        96,
    ),
    Case(
        "sinklocal-noncausal",
        lambda blk, s: sa.SinkLocal(sink_tokens=3 * s, window_tokens=20 * s, block_size=blk),
        (70,),
        (70,),
        2,
        1,
        64,
        causal=False,
    ),
    Case("moa", _moa(4), (90, 33), (90, 130), 4, 1, 64, layout_heads="Hq"),
    Case("moa-noncausal", _moa(2), (50,), (50,), 2, 2, 96, causal=False, layout_heads="Hq"),
    Case("blocksparse-emptyrows", _rowless_layout, (80,), (80,), 2, 1, 64),
    Case("blocksparse-maskfn", _mask_fn, (64, 20), (96, 20), 4, 2, 64, layout_heads="Hq"),
    Case(
        "blocksparse-ashape",
        lambda blk, s: sa.BlockSparse(block_size=blk, sink_blocks=1, local_blocks=2),
        (150,),
        (200,),
        4,
        4,
        64,
    ),
    Case(
        "dense-noncausal-qlong",
        lambda blk, s: sa.Dense(block_size=blk),
        (20, 9),
        (10, 0),
        2,
        1,
        64,
        causal=False,
    ),
]


def _plan(case: Case, device: str) -> tuple[sa.BlockLayout, tuple[int, ...], tuple[int, ...]]:
    q_lens, kv_lens, block = case.sizes(device)
    scale = 1 if device == "cpu" else CUDA_SCALE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.CoverageWarning)
        layout = case.method(block, scale).plan(
            torch.tensor(q_lens), torch.tensor(kv_lens), case.hq, case.hkv, causal=case.causal
        )
    return layout, q_lens, kv_lens


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_torch_path(case: Case, run: tuple[str, torch.dtype]) -> None:
    device, dtype = run
    layout, q_lens, kv_lens = _plan(case, device)
    assert layout.num_heads == {"": 1, "Hkv": case.hkv, "Hq": case.hq}[case.layout_heads]
    q, k, v = make_qkv(
        len(q_lens),
        case.hq,
        case.hkv,
        max(q_lens),
        max(kv_lens),
        case.d,
        dtype=dtype,
        q_lens=q_lens,
        kv_lens=kv_lens,
    )
    check_against_torch(q.to(device), k.to(device), v.to(device), layout)


def _manual_layout(
    q_lens, kv_lens, block_q: int, block_k: int, h: int, causal: bool, all_full: bool = False
) -> sa.BlockLayout:
    """Every key block in every tile, all flagged partial (the element predicate decides everywhere) or
    all flagged full (no element mask at all, even where causal would mask: the format's meaning)."""
    b = len(q_lens)
    geos = [TileGeometry(ql, kl, block_q, block_k) for ql, kl in zip(q_lens, kv_lens)]
    nt = max(g.num_tiles for g in geos)
    mk = max(g.num_kv_blocks for g in geos)
    idx = torch.zeros(b, h, nt, mk, dtype=torch.int32)
    cnt = torch.zeros(b, h, nt, dtype=torch.int32)
    for r, g in enumerate(geos):
        idx[r, :, : g.num_tiles, : g.num_kv_blocks] = torch.arange(g.num_kv_blocks, dtype=torch.int32)
        cnt[r, :, : g.num_tiles] = g.num_kv_blocks
    full = torch.full((b, h, nt, mk), all_full, dtype=torch.bool)
    lay = sa.BlockLayout(
        idx, cnt, full, block_q, block_k, torch.tensor(q_lens), torch.tensor(kv_lens), causal
    )
    return lay.validate()


@pytest.mark.parametrize(
    "bq,bk,all_full",
    [(16, 32, False), (32, 16, False), (16, 16, True)],
    ids=["BQ16-BK32-partial", "BQ32-BK16-partial", "BQ16-BK16-full"],
)
def test_manual_layouts(bq: int, bk: int, all_full: bool, device: str) -> None:
    """block_q != block_k, and full flags taken at their word (no element mask in full blocks)."""
    s = 1 if device == "cpu" else CUDA_SCALE
    q_lens, kv_lens = (47 * s, 1), (75 * s, 40 * s)
    lay = _manual_layout(q_lens, kv_lens, bq, bk, 1, True, all_full)
    q, k, v = make_qkv(2, 2, 1, max(q_lens), max(kv_lens), 64, q_lens=q_lens, kv_lens=kv_lens)
    check_against_torch(q.to(device), k.to(device), v.to(device), lay)


@pytest.mark.parametrize("heads", [1, 2, 4], ids=lambda h: f"heads{h}")
def test_heads_per_program(heads: int, device: str) -> None:
    """A program may serve 1, 2 or 4 query heads of a GQA group sharing a layout row: same result."""
    s = 1 if device == "cpu" else CUDA_SCALE
    q_lens, kv_lens = (50 * s, 1), (90 * s, 77 * s)
    lay = sa.SinkLocal(sink_tokens=4 * s, window_tokens=30 * s, block_size=16).plan(q_lens, kv_lens, 8, 2)
    q, k, v = (
        t.to(device) for t in make_qkv(2, 8, 2, max(q_lens), max(kv_lens), 64, q_lens=q_lens, kv_lens=kv_lens)
    )
    out = torch.full((2, 8, max(q_lens), 64), float("nan"), device=device)
    lse = torch.full((2, 8, max(q_lens)), float("nan"), device=device)
    lt = {f: getattr(lay, f).to(device) for f in ("kv_indices", "kv_counts", "full", "q_lens", "kv_lens")}
    _kernel()(
        q, k, v, lt["kv_indices"], lt["kv_counts"], lt["full"], lt["q_lens"], lt["kv_lens"],
        block_q=16, block_k=16, causal=True, sink_tokens=lay.sink_tokens, window_tokens=lay.window_tokens,
        return_lse=True, out=out, lse_out=lse, heads_per_program=heads,
    )  # fmt: skip
    ref, ref_lse = sa.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), lay, backend="torch", return_lse=True)
    torch.testing.assert_close(out.cpu(), ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), ref_lse, atol=1e-5, rtol=1e-5)


def test_heads_per_program_must_share_a_layout_row(device: str) -> None:
    lay = sa.MoA(alphas=((8.0,) * 4,), betas=((0.1,) * 4,), sink_tokens=2, min_span=4, block_size=16)
    lay = lay.plan([20], [20], 4, 2)  # layout heads = Hq: rows differ per query head
    q, k, v = (t.to(device) for t in make_qkv(1, 4, 2, 20, 20, 64))
    with pytest.raises(ValueError, match="heads_per_program"):
        call_kernel_kw = dict(block_q=16, block_k=16, causal=True, heads_per_program=2)
        _kernel()(
            q, k, v, lay.kv_indices, lay.kv_counts, lay.full, lay.q_lens, lay.kv_lens,
            sink_tokens=lay.sink_tokens, window_tokens=lay.window_tokens, **call_kernel_kw,
        )  # fmt: skip


def test_strided_inputs_and_layout_on_host(device: str) -> None:
    """q/k/v as views of [B, S, H, D] tensors (HF layout); layout tensors left on the host."""
    s = 1 if device == "cpu" else CUDA_SCALE
    b, hq, hkv, sq, skv, d = 2, 4, 2, 40 * s, 70 * s, 64
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, sq, hq, d, generator=g).to(device).transpose(1, 2)
    k = torch.randn(b, skv, hkv, d, generator=g).to(device).transpose(1, 2)
    v = torch.randn(b, skv, hkv, 2 * d, generator=g).to(device)[..., :d].transpose(1, 2)  # padded rows
    assert not q.is_contiguous() and not k.is_contiguous() and v.stride(-1) == 1
    lay = sa.S2(block_size=16 if device == "cpu" else 64, local_blocks=2, vert_stride=2).plan(
        [sq, sq // 2], [skv, skv - 3], hq, hkv
    )
    out, _ = call_kernel(q, k, v, lay, scale=0.3, lay_device="cpu")
    ref, _ = sa.block_sparse_attention(
        q.cpu(), k.cpu(), v.cpu(), lay, scale=0.3, backend="torch", return_lse=True
    )
    torch.testing.assert_close(out.cpu(), ref, atol=2e-5, rtol=1e-5)


def test_value_head_dim_differs(device: str) -> None:
    lay = sa.Dense(block_size=16).plan([33], [50], 2, 1)
    q, k, _ = make_qkv(1, 2, 1, 33, 50, 64)
    v = torch.randn(1, 1, 50, 80)
    check_against_torch(q.to(device), k.to(device), v.to(device), lay)


def test_nan_propagates(device: str) -> None:
    """NaN in an attended key poisons exactly the rows that attend it, as in the torch path."""
    lay = sa.SinkLocal(sink_tokens=2, window_tokens=8, block_size=16).plan([40], [40], 2, 2)
    q, k, v = make_qkv(1, 2, 2, 40, 40, 64)
    k[0, 1, 30, 3] = float("nan")
    out, lse = call_kernel(q.to(device), k.to(device), v.to(device), lay)
    ref, ref_lse = sa.block_sparse_attention(q, k, v, lay, backend="torch", return_lse=True)
    bad = torch.isnan(ref).any(-1)
    assert bad[0, 1].any() and not bad[0, 0].any()
    assert torch.equal(torch.isnan(out.cpu()).any(-1), bad)
    assert torch.equal(torch.isnan(lse.cpu()), torch.isnan(ref_lse))


def test_allocates_outputs_without_lse(device: str) -> None:
    lay = sa.Dense(block_size=16).plan([20], [36], 2, 2)
    q, k, v = (t.to(device) for t in make_qkv(1, 2, 2, 20, 36, 64))
    out, lse = _kernel()(
        q, k, v, lay.kv_indices.to(device), lay.kv_counts.to(device), lay.full.to(device),
        lay.q_lens.to(device), lay.kv_lens.to(device), block_q=16, block_k=16, causal=True,
    )  # fmt: skip
    assert lse is None
    ref = sa.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), lay, backend="torch")
    torch.testing.assert_close(out.cpu(), ref, atol=2e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- errors
def _args(device: str = "cpu", d: int = 64, hq: int = 2):
    lay = sa.Dense(block_size=16).plan([20], [20], hq, 1)
    q, k, v = (t.to(device) for t in make_qkv(1, hq, 1, 20, 20, d))
    return (q, k, v, lay.kv_indices, lay.kv_counts, lay.full, lay.q_lens, lay.kv_lens), dict(
        block_q=16, block_k=16, causal=True
    )


def test_cpu_tensors_without_interpreter_raise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    args, kw = _args("cpu")
    with pytest.raises(ValueError, match="CUDA"):
        _kernel()(*args, **kw)


def test_head_dim_too_large_raises(device: str) -> None:
    args, kw = _args(device, d=320)
    with pytest.raises(ValueError, match="head_dim=320"):
        _kernel()(*args, **kw)


@pytest.mark.parametrize("bad", [8, 24, 48, True], ids=str)
def test_block_size_not_power_of_two_raises(bad, device: str) -> None:
    args, kw = _args(device)
    with pytest.raises(ValueError, match="block_q"):
        _kernel()(*args, **{**kw, "block_q": bad})


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_noncontiguous_last_dim_raises(name: str, device: str) -> None:
    args, kw = _args(device)
    args = list(args)
    i = "qkv".index(name)
    t = args[i]
    args[i] = torch.cat([t, t], dim=-1)[..., ::2]
    assert args[i].stride(-1) == 2
    with pytest.raises(ValueError, match=f"^{name} must be contiguous in its last"):
        _kernel()(*args, **kw)


def test_lengths_beyond_tensors_raise(device: str) -> None:
    args, kw = _args(device)
    args = list(args)
    args[7] = torch.tensor([21])
    with pytest.raises(ValueError, match="exceed"):
        _kernel()(*args, **kw)


def test_layout_head_count_mismatch_raises(device: str) -> None:
    args, kw = _args(device, hq=4)
    lay = sa.Dense(block_size=16).plan([20], [20], 3, 1)
    args = list(args)
    args[3:6] = [
        lay.kv_indices.expand(1, 3, -1, -1),
        lay.kv_counts.expand(1, 3, -1),
        lay.full.expand(1, 3, -1, -1),
    ]
    with pytest.raises(ValueError, match="3 heads"):
        _kernel()(*args, **kw)


if ON_CUDA:

    def test_no_recompile_per_length() -> None:
        """New sequence lengths reuse the compiled kernel (lengths are runtime values)."""
        from sparse_attn.triton_kernels.block_sparse_fwd import block_sparse_fwd_kernel

        def n_compiled() -> int:
            caches = getattr(block_sparse_fwd_kernel, "device_caches", None)
            assert caches is not None, "this Triton has no JITFunction.device_caches"
            return sum(len(c[0]) for c in caches.values())

        method = sa.S2(block_size=64, local_blocks=4, vert_stride=4)
        seen = []
        for n in (1000, 1500, 2047, 3001, 4096 + 17):
            lay = method.plan([n], [n], 8, 2)
            q, k, v = (t.cuda() for t in make_qkv(1, 8, 2, n, n, 128, dtype=torch.bfloat16))
            call_kernel(q, k, v, lay)
            seen.append(n_compiled())
        assert seen[-1] == seen[0], f"compiled variants after each length: {seen}"

    def test_long_context_matches_torch() -> None:
        """32k keys, chunked prefill of the last 2k queries, int64 offsets in play."""
        n, m = 32768, 2048
        lay = sa.S2(block_size=64, local_blocks=8, vert_stride=8).plan([m], [n], 8, 2)
        q, k, v = (t.cuda() for t in make_qkv(1, 8, 2, m, n, 128, dtype=torch.bfloat16))
        out, lse = call_kernel(q, k, v, lay)
        ref, ref_lse = sa.block_sparse_attention(
            q.cpu(), k.cpu(), v.cpu(), lay, backend="torch", return_lse=True
        )
        assert (out.cpu().float() - ref.float()).abs().max().item() < 2e-2
        torch.testing.assert_close(lse.cpu(), ref_lse.float(), atol=1e-3, rtol=1e-3)


def test_module_imports_no_project_code() -> None:
    """triton_kernels/block_sparse_fwd.py imports nothing of the rest of the project."""
    import ast
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "triton_kernels" / "block_sparse_fwd.py"
    tree = ast.parse(src.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("sparse_attn"), node.module
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("sparse_attn") for a in node.names)

"""Static patterns: mask() and plan() against the brute-force builders in bruteforce.py.

Hand-picked parameter tuples with readable ids: odd lengths 1, 63, 1000; Sq < Skv and Sq == Skv;
GQA ratios 1/3/4; causal and non-causal; S2's homo_head / num_dense_heads / head_offset.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import sparse_attn as sa
from sparse_attn import ConfigError, CoverageWarning, LayoutError, PlanFileError

try:
    import bruteforce as bf
except ImportError:  # tests/ imported as a package
    from tests import bruteforce as bf


# --------------------------------------------------------------------------------------------------
# cases


@dataclass(frozen=True)
class Case:
    id: str
    make: Callable[[], object]  # builds the method config
    brute: Callable[[int, int, int], torch.Tensor]  # (batch_idx, q_len, kv_len) -> [H, Sq, Skv]
    q_len: int
    kv_len: int
    num_heads: int
    num_kv_heads: int
    causal: bool = True


def _shape_id(q, kv, h, kvh, causal):
    return f"q{q}-kv{kv}-H{h}-KV{kvh}" + ("" if causal else "-noncausal")


def s2_case(q, kv, h, kvh, bs, local, vs, off=0, homo=False, dense=0, causal=True):
    cid = f"S2-{_shape_id(q, kv, h, kvh, causal)}-bs{bs}-l{local}-vs{vs}"
    cid += (f"-off{off}" if off else "") + ("-homo" if homo else "") + (f"-dense{dense}" if dense else "")
    kw = dict(
        block_size=bs,
        local_blocks=local,
        vert_stride=vs,
        head_offset=off,
        homo_head=homo,
        num_dense_heads=dense,
    )
    return Case(
        cid,
        lambda: sa.S2(**kw),
        lambda b, ql, kl: bf.s2_mask(ql, kl, h, kvh, bs, local, vs, off, homo, dense, causal),
        q,
        kv,
        h,
        kvh,
        causal,
    )


def sink_local_case(q, kv, h, kvh, sink, window, bs, causal=True):
    cid = f"SinkLocal-{_shape_id(q, kv, h, kvh, causal)}-s{sink}-w{window}-bs{bs}"
    return Case(
        cid,
        lambda: sa.SinkLocal(sink_tokens=sink, window_tokens=window, block_size=bs),
        lambda b, ql, kl: bf.sink_local_mask(ql, kl, h, sink, window, causal),
        q,
        kv,
        h,
        kvh,
        causal,
    )


def moa_case(q, kv, kvh, alphas, betas, sink, min_span, bs, causal=True):
    h = len(alphas)
    cid = f"MoA-{_shape_id(q, kv, h, kvh, causal)}-s{sink}-min{min_span}-bs{bs}"
    return Case(
        cid,
        lambda: sa.MoA(alphas=[alphas], betas=[betas], sink_tokens=sink, min_span=min_span, block_size=bs),
        lambda b, ql, kl: bf.moa_mask(ql, kl, alphas, betas, sink, min_span, causal),
        q,
        kv,
        h,
        kvh,
        causal,
    )


def _random_layout(seed, shape, p=0.3):
    gen = torch.Generator().manual_seed(seed)
    layout = torch.rand(shape, generator=gen) < p
    layout[..., 0, 0] = True  # never an empty layout
    return layout


def block_sparse_case(q, kv, h, kvh, bs, tag, layout=None, mask_fn=None, sink=0, local=0, causal=True):
    cid = f"BlockSparse-{tag}-{_shape_id(q, kv, h, kvh, causal)}-bs{bs}"
    cid += (f"-sink{sink}" if sink else "") + (f"-local{local}" if local else "")
    return Case(
        cid,
        lambda: sa.BlockSparse(
            block_size=bs, layout=layout, mask_fn=mask_fn, sink_blocks=sink, local_blocks=local
        ),
        lambda b, ql, kl: bf.block_sparse_mask(
            ql, kl, h, kvh, bs, layout, mask_fn, sink, local, causal, batch_idx=b
        ),
        q,
        kv,
        h,
        kvh,
        causal,
    )


def dense_case(q, kv, h, kvh, bs=64, causal=True):
    return Case(
        f"Dense-{_shape_id(q, kv, h, kvh, causal)}-bs{bs}",
        lambda: sa.Dense(block_size=bs),
        lambda b, ql, kl: bf.dense_mask(ql, kl, h, causal),
        q,
        kv,
        h,
        kvh,
        causal,
    )


# mask_fns: vectorised over broadcastable int64 tensors (b, h, q_block, kv_block)
def stride3_or_head1(b, h, qb, kb):
    return ((qb - kb) % 3 == 0) | (h == 1)


def lower_even_heads(b, h, qb, kb):
    return (kb <= qb) & ((kb + h) % 2 == 0)


def depends_on_row(b, h, qb, kb):
    return (kb % (b + 2)) == 0


S2_CASES = [
    s2_case(1, 1, 1, 1, 16, 4, 8),
    s2_case(63, 63, 8, 2, 4, 2, 4),  # s = 2: residues {0, 2} -> not covered
    s2_case(63, 100, 6, 6, 4, 1, 3),  # s = 1, GQA 1, covered
    s2_case(17, 63, 9, 3, 2, 3, 6, off=1),  # GQA 3, residues {1, 3, 5}
    s2_case(63, 63, 12, 3, 4, 2, 3, causal=False),  # GQA 4, non-causal
    s2_case(40, 63, 4, 4, 4, 2, 4, homo=True),
    s2_case(63, 90, 8, 4, 4, 1, 8, dense=1),
    s2_case(63, 63, 8, 4, 3, 1, 4, homo=True, dense=2),
    s2_case(30, 50, 6, 2, 4, 1, 3, dense=2),  # every head dense
    s2_case(63, 63, 4, 4, 2, 1, 4, off=3),
    s2_case(20, 63, 6, 2, 4, 2, 2, off=1, causal=False),
    s2_case(1, 63, 12, 4, 2, 0, 5, off=2),  # no local blocks at all
    s2_case(1, 1000, 8, 2, 16, 4, 8),
    s2_case(63, 1000, 8, 8, 16, 2, 8),
    s2_case(1000, 1000, 2, 2, 16, 4, 4, off=1),
]

SINK_LOCAL_CASES = [
    sink_local_case(1, 1, 1, 1, 4, 16, 16),
    sink_local_case(63, 63, 2, 2, 4, 16, 16),
    sink_local_case(63, 63, 3, 1, 0, 1, 8),  # only the diagonal
    sink_local_case(40, 63, 4, 1, 4, 1, 8),  # window 1: sinks and the query itself
    sink_local_case(17, 100, 6, 2, 5, 10, 8, causal=False),
    sink_local_case(63, 63, 4, 4, 3, 7, 4, causal=False),
    sink_local_case(20, 50, 2, 1, 3, 64, 16),  # window >= length: dense
    sink_local_case(63, 1000, 2, 2, 4, 100, 64),
    sink_local_case(1, 1000, 4, 4, 4, 1020, 64),  # the defaults
    sink_local_case(1000, 1000, 1, 1, 3, 77, 32),
]

MOA_CASES = [
    moa_case(63, 63, 2, [8.0, 0.5], [0.25, 0.125], 4, 4, 16),
    moa_case(20, 100, 3, [3.5, 10.0, 0.0], [0.0625, 0.0, 0.0], 2, 8, 8, causal=False),
    moa_case(
        40, 63, 2, [0.0, 4.0, 100.0, 1.0, 2.5, 7.0], [0.5, 0.0, 0.0, 0.25, 0.125, 0.0], 3, 2, 8
    ),  # GQA 3
    moa_case(17, 63, 1, [1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], 0, 0, 4),  # GQA 4, no sinks
    moa_case(30, 30, 1, [1.0], [0.0], 2, 64, 16),  # min_span > N: clamps to N (dense)
    moa_case(1, 1000, 4, [100.0, 0.0, 500.0, 2000.0], [0.0, 0.5, 0.25, 0.0], 64, 64, 64),
    moa_case(63, 1000, 1, [10.0, 200.0], [0.125, 0.0625], 16, 32, 32),
]

_L63 = 8  # ceil(63 / 8) blocks
_L100 = 13  # ceil(100 / 8) blocks
BLOCK_SPARSE_CASES = [
    block_sparse_case(63, 63, 2, 2, 8, "layout2d", layout=_random_layout(0, (_L63, _L63))),
    block_sparse_case(40, 63, 4, 4, 8, "layout-per-qhead", layout=_random_layout(1, (4, _L63, _L63))),
    block_sparse_case(63, 63, 6, 2, 8, "layout-per-kvhead", layout=_random_layout(2, (2, _L63, _L63))),
    block_sparse_case(17, 63, 3, 1, 8, "layout-oversized", layout=_random_layout(3, (_L63 + 2, _L63 + 3))),
    block_sparse_case(63, 63, 4, 1, 8, "layout", layout=_random_layout(4, (_L63, _L63)), causal=False),
    block_sparse_case(63, 100, 4, 4, 8, "maskfn", mask_fn=stride3_or_head1),
    block_sparse_case(63, 100, 8, 2, 8, "maskfn", mask_fn=lower_even_heads, sink=1, local=2),
    block_sparse_case(30, 63, 4, 2, 8, "maskfn", mask_fn=lower_even_heads, causal=False),
    block_sparse_case(
        63,
        100,
        4,
        1,
        8,
        "union",
        layout=_random_layout(5, (_L100, _L100), 0.1),
        mask_fn=stride3_or_head1,
        sink=1,
        local=1,
    ),
    block_sparse_case(40, 63, 2, 1, 4, "maskfn-by-row", mask_fn=depends_on_row),
    block_sparse_case(63, 63, 2, 2, 4, "streaming", sink=1, local=3),
    block_sparse_case(63, 63, 3, 1, 4, "streaming", sink=2, local=2, causal=False),
    block_sparse_case(1, 1, 1, 1, 8, "streaming", sink=1, local=1),
    block_sparse_case(1, 1000, 4, 2, 64, "streaming", sink=1, local=3),
    block_sparse_case(63, 1000, 2, 2, 64, "layout", layout=_random_layout(6, (16, 16))),
    block_sparse_case(1000, 1000, 1, 1, 128, "maskfn", mask_fn=stride3_or_head1, local=1),
]

DENSE_CASES = [
    dense_case(1, 1, 1, 1),
    dense_case(63, 63, 3, 1, bs=16, causal=False),
    dense_case(63, 1000, 4, 4),
    dense_case(17, 40, 8, 2, bs=8),
]

ALL_CASES = S2_CASES + SINK_LOCAL_CASES + MOA_CASES + BLOCK_SPARSE_CASES + DENSE_CASES
_PARAMS = [pytest.param(c, id=c.id) for c in ALL_CASES]

_BRUTE_CACHE: dict = {}


def expected(case, b, q_len, kv_len):
    key = (case.id, b, q_len, kv_len)
    if key not in _BRUTE_CACHE:
        _BRUTE_CACHE[key] = case.brute(b, q_len, kv_len)
    return _BRUTE_CACHE[key]


def _quiet(fn, *args, **kw):
    """Call without CoverageWarning noise (the warning itself is tested separately)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        return fn(*args, **kw)


def _first_diff(got, want):
    bad = (got != want).nonzero()
    return bad[:5].tolist()


# --------------------------------------------------------------------------------------------------
# mask() vs brute force


def test_cases_cover_the_brief():
    """The case list itself: odd lengths, Sq < Skv, GQA 1/3/4, both causalities, every method."""
    lengths = {c.q_len for c in ALL_CASES} | {c.kv_len for c in ALL_CASES}
    assert {1, 63, 1000} <= lengths
    assert any(c.q_len < c.kv_len for c in ALL_CASES) and any(c.q_len == c.kv_len for c in ALL_CASES)
    assert {1, 3, 4} <= {c.num_heads // c.num_kv_heads for c in ALL_CASES}
    assert {True, False} == {c.causal for c in ALL_CASES}
    for prefix in (
        "S2-",
        "SinkLocal-",
        "MoA-",
        "BlockSparse-layout",
        "BlockSparse-maskfn",
        "BlockSparse-streaming",
        "Dense-",
    ):
        assert any(c.id.startswith(prefix) for c in ALL_CASES), prefix


@pytest.mark.parametrize("case", _PARAMS)
def test_mask_matches_bruteforce(case):
    method = case.make()
    got = _quiet(method.mask, case.q_len, case.kv_len, case.num_heads, case.num_kv_heads, causal=case.causal)
    want = expected(case, 0, case.q_len, case.kv_len)
    assert got.dtype == torch.bool
    assert tuple(got.shape) == (case.num_heads, case.q_len, case.kv_len)
    assert torch.equal(got, want), f"first differences (head, i, j): {_first_diff(got, want)}"


def test_mask_defaults_num_kv_heads_and_causal():
    """num_kv_heads defaults to num_heads and causal to True."""
    method = sa.S2(block_size=4, local_blocks=1, vert_stride=4)
    got = _quiet(method.mask, 30, 45, 4)
    assert torch.equal(got, bf.s2_mask(30, 45, 4, 4, 4, 1, 4))
    got = sa.SinkLocal(sink_tokens=2, window_tokens=5, block_size=8).mask(9, 20, 2)
    assert torch.equal(got, bf.sink_local_mask(9, 20, 2, 2, 5, True))


# --------------------------------------------------------------------------------------------------
# plan() -> BlockLayout -> to_dense_mask() vs brute force


def _check_plan(case, q_lens, kv_lens, as_ints=False):
    method = case.make()
    if as_ints:
        layout = _quiet(
            method.plan, q_lens[0], kv_lens[0], case.num_heads, case.num_kv_heads, causal=case.causal
        )
    else:
        layout = _quiet(method.plan, q_lens, kv_lens, case.num_heads, case.num_kv_heads, causal=case.causal)
    layout.validate()
    assert layout.batch_size == len(q_lens)
    assert bool(layout.causal) == case.causal
    assert [int(x) for x in layout.q_lens] == list(q_lens)
    assert [int(x) for x in layout.kv_lens] == list(kv_lens)
    dense = layout.to_dense_mask()
    assert dense.dtype == torch.bool and dense.dim() == 4 and dense.shape[0] == len(q_lens)
    assert dense.shape[1] == layout.num_heads
    dense = bf.expand_heads(dense, case.num_heads, case.num_kv_heads)
    rows = []
    for b, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        want = expected(case, b, q_len, kv_len)
        rows.append(want)
        got = dense[b, :, :q_len, :kv_len]
        assert torch.equal(got, want), f"row {b}: first differences (head, i, j): {_first_diff(got, want)}"
        assert not dense[b, :, q_len:, :].any(), f"row {b}: padded query rows attend"
        assert not dense[b, :, :, kv_len:].any(), f"row {b}: padded keys attended"
    bf.check_layout_blocks(layout, rows, case.num_heads, case.num_kv_heads)
    return layout, rows


@pytest.mark.parametrize("case", _PARAMS)
def test_plan_single_row_matches_bruteforce(case):
    _check_plan(case, [case.q_len], [case.kv_len], as_ints=True)


_BATCH_CASES = [c for c in ALL_CASES if c.kv_len < 1000 and c.q_len > 1 and c.kv_len >= 40][::2]
_BATCH_CASES += [
    c
    for c in ALL_CASES
    if c.id.startswith(("BlockSparse-maskfn-q63-kv100-H8", "BlockSparse-maskfn-by-row"))
    and c not in _BATCH_CASES
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in _BATCH_CASES])
def test_plan_batch_with_different_lengths(case):
    """Rows of different q/kv lengths in one plan (right padding); each row is its own mask,
    padded positions attend nothing, and row-dependent mask_fns see their own b."""
    q_lens = [case.q_len, 1, 17]
    kv_lens = [case.kv_len, 40, 33]
    layout, rows = _check_plan(case, q_lens, kv_lens)
    density = sum(int(r.sum()) for r in rows) / (
        case.num_heads * sum(bf.allowed_count(q, k, case.causal) for q, k in zip(q_lens, kv_lens))
    )
    assert layout.density() == pytest.approx(density, rel=1e-6, abs=1e-9)


def test_plan_accepts_tensor_lengths():
    case = S2_CASES[1]
    method = case.make()
    a = _quiet(method.plan, [5, 63], [40, 63], case.num_heads, case.num_kv_heads)
    b = _quiet(method.plan, torch.tensor([5, 63]), torch.tensor([40, 63]), case.num_heads, case.num_kv_heads)
    assert torch.equal(a.to_dense_mask(), b.to_dense_mask())


def test_mask_fn_row_index_is_zero_in_mask():
    method = sa.BlockSparse(block_size=4, mask_fn=depends_on_row)
    got = method.mask(20, 20, 2)
    assert torch.equal(got, bf.block_sparse_mask(20, 20, 2, 2, 4, mask_fn=depends_on_row, batch_idx=0))
    assert not torch.equal(got, bf.block_sparse_mask(20, 20, 2, 2, 4, mask_fn=depends_on_row, batch_idx=1))


# --------------------------------------------------------------------------------------------------
# S2 coverage


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in S2_CASES])
def test_s2_coverage_warning(case):
    method = case.make()
    covers = bf.s2_covers(
        case.num_kv_heads, method.vert_stride, method.head_offset, method.homo_head, method.num_dense_heads
    )
    assert method.covers_full_context(case.num_kv_heads) == covers
    for fn, args in ((method.mask, (case.q_len, case.kv_len)), (method.plan, ([case.q_len], [case.kv_len]))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn(*args, case.num_heads, case.num_kv_heads, causal=case.causal)
        warned = any(issubclass(w.category, CoverageWarning) for w in caught)
        assert warned == (not covers), (
            f"{fn.__name__}: CoverageWarning {warned}, covers_full_context {covers}"
        )


@pytest.mark.parametrize(
    "kv_heads, vs, off, homo, uncovered",
    [
        # uncovered_residues are key-block residues kb % vert_stride; head h's shard holds the key
        # blocks with kb = -(h*s + head_offset) mod vert_stride
        (2, 4, 0, False, (1, 3)),  # s = 2: shards at key residues 0, 2
        (3, 6, 1, False, (0, 2, 4)),  # s = 2: head offsets 1, 3, 5 -> key residues 5, 3, 1
        (8, 8, 0, False, ()),  # s = 1, one head per residue
        (4, 8, 0, False, (1, 3, 5, 7)),  # s = 2
        (3, 8, 0, False, (1, 2, 3, 5, 7)),  # s = 2: head offsets 0, 2, 4 -> key residues 0, 6, 4
        (16, 8, 5, False, ()),  # more heads than residues
        (8, 8, 3, True, (0, 1, 2, 3, 4, 6, 7)),  # homo_head: only h = 0, offset 3 -> key residue 5
        (1, 1, 0, False, ()),  # vert_stride 1: every block is vertical
        (5, 4, 0, False, ()),  # s = max(1, 0) = 1
    ],
    ids=lambda x: str(x),
)
def test_s2_uncovered_residues(kv_heads, vs, off, homo, uncovered):
    method = sa.S2(block_size=8, local_blocks=1, vert_stride=vs, head_offset=off, homo_head=homo)
    assert bf.s2_uncovered(kv_heads, vs, off, homo) == uncovered  # the oracle agrees with the hand values
    assert tuple(sorted(method.uncovered_residues(kv_heads))) == uncovered
    assert method.covers_full_context(kv_heads) == (uncovered == ())
    # a dense head always covers the full context
    dense = sa.S2(
        block_size=8, local_blocks=1, vert_stride=vs, head_offset=off, homo_head=homo, num_dense_heads=1
    )
    assert dense.covers_full_context(kv_heads)


def test_sink_local_window_zero_keeps_only_sinks():
    """The API rejects only *negative* windows: window_tokens=0 keeps the sinks alone."""
    method = sa.SinkLocal(sink_tokens=4, window_tokens=0, block_size=8)
    assert torch.equal(method.mask(40, 63, 4, 1), bf.sink_local_mask(40, 63, 4, 4, 0, True))


def test_s2_uncovered_blocks_are_really_unseen():
    """kv_heads=2, vert_stride=4 (s=2): key blocks with kb % 4 in {1, 3} (residues -kb) are unseen by
    every head once they fall out of the local window."""
    method = sa.S2(block_size=2, local_blocks=1, vert_stride=4)
    mask = _quiet(method.mask, 20, 20, 4, 2)
    union = mask.any(dim=0)
    seen_blocks = {j // 2 for j in range(20) if union[19, j]}
    assert seen_blocks == {0, 2, 4, 6, 8, 9}  # vertical blocks 0, 2, 4, 6, 8 plus the local block 9
    assert tuple(sorted(method.uncovered_residues(2))) == (1, 3)


# --------------------------------------------------------------------------------------------------
# MoA: plan files and layers


def _write(tmp_path, payload, name="plan.json"):
    path = tmp_path / name
    path.write_text(payload if isinstance(payload, str) else json.dumps(payload))
    return path


def test_moa_from_plan_file(tmp_path):
    alphas = [[8.0, 0.5, 100.0], [1.0, 2.0, 3.0]]
    betas = [[0.25, 0.125, 0.0], [0.0, 0.5, 0.0625]]
    path = _write(tmp_path, {"alphas": alphas, "betas": betas})
    moa = sa.MoA.from_plan_file(path, sink_tokens=3, min_span=5, block_size=8)
    assert moa.alphas == tuple(tuple(r) for r in alphas)
    assert moa.betas == tuple(tuple(r) for r in betas)
    assert moa.sink_tokens == 3 and moa.min_span == 5 and moa.block_size == 8
    for layer in range(2):
        got = moa.for_layer(layer).mask(40, 63, 3)
        assert torch.equal(got, bf.moa_mask(40, 63, alphas[layer], betas[layer], 3, 5, True)), layer
    # str paths too, and integers are numbers
    moa2 = sa.MoA.from_plan_file(str(_write(tmp_path, {"alphas": [[1, 2]], "betas": [[0, 1]]}, "ints.json")))
    assert moa2.alphas == ((1.0, 2.0),) and moa2.betas == ((0.0, 1.0),)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param({"alphas": [[1.0, 2.0], [3.0]], "betas": [[0.0, 0.0], [0.0]]}, id="ragged"),
        pytest.param({"alphas": [[1.0, 2.0]], "betas": [[0.0, 0.0, 0.0]]}, id="alphas-betas-differ"),
        pytest.param({"alphas": [[1.0, 2.0], [1.0, 2.0]], "betas": [[0.0, 0.0]]}, id="layers-differ"),
        pytest.param({"alphas": [1.0, 2.0], "betas": [0.0, 0.0]}, id="one-dimensional"),
        pytest.param({"alphas": [[[1.0]]], "betas": [[[0.0]]]}, id="three-dimensional"),
        pytest.param({"alphas": [["a", 2.0]], "betas": [[0.0, 0.0]]}, id="non-numeric-alpha"),
        pytest.param({"alphas": [[1.0, 2.0]], "betas": [[0.0, None]]}, id="non-numeric-beta"),
        pytest.param({"alphas": [], "betas": []}, id="empty"),
        pytest.param({"alphas": [[]], "betas": [[]]}, id="empty-layer"),
        pytest.param({"alphas": [[1.0]]}, id="missing-betas"),
        pytest.param([[1.0]], id="not-an-object"),
        pytest.param("{not json", id="invalid-json"),
        pytest.param("", id="empty-file"),
    ],
)
def test_moa_plan_file_errors(tmp_path, payload):
    path = _write(tmp_path, payload)
    with pytest.raises(PlanFileError):
        sa.MoA.from_plan_file(path)


def test_plan_file_error_is_a_config_error():
    assert issubclass(PlanFileError, ConfigError) and issubclass(ConfigError, ValueError)


def test_moa_layers():
    moa = sa.MoA(
        alphas=[[4.0, 8.0], [16.0, 2.0], [0.0, 0.0]],
        betas=[[0.0, 0.25], [0.0, 0.0], [0.5, 1.0]],
        sink_tokens=1,
        min_span=2,
        block_size=4,
    )
    with pytest.raises(ConfigError):
        moa.mask(10, 30, 2)
    with pytest.raises(ConfigError):
        moa.plan([10], [30], 2)
    for layer in range(3):
        single = moa.for_layer(layer)
        assert len(single.alphas) == 1 and single.alphas[0] == moa.alphas[layer]
        assert single.betas[0] == moa.betas[layer]
        want = bf.moa_mask(10, 30, moa.alphas[layer], moa.betas[layer], 1, 2, True)
        assert torch.equal(single.mask(10, 30, 2), want), layer
    with pytest.raises(ConfigError):
        moa.for_layer(0).mask(10, 30, 4)  # 4 heads, plan has 2


def test_for_layer_identity_for_other_methods():
    for method in (sa.S2(), sa.SinkLocal(), sa.Dense(), sa.BlockSparse(sink_blocks=1, local_blocks=1)):
        assert method.for_layer(3) == method


# --------------------------------------------------------------------------------------------------
# config errors


@pytest.mark.parametrize(
    "make, arg",
    [
        pytest.param(lambda: sa.S2(block_size=0), "block_size", id="S2-block0"),
        pytest.param(lambda: sa.S2(block_size=-16), "block_size", id="S2-block-neg"),
        pytest.param(lambda: sa.S2(block_size=16.5), "block_size", id="S2-block-float"),
        pytest.param(lambda: sa.S2(local_blocks=-1), "local_blocks", id="S2-local-neg"),
        pytest.param(lambda: sa.S2(vert_stride=0), "vert_stride", id="S2-stride0"),
        pytest.param(lambda: sa.S2(num_dense_heads=-1), "num_dense_heads", id="S2-dense-neg"),
        pytest.param(lambda: sa.SinkLocal(block_size=0), "block_size", id="SinkLocal-block0"),
        pytest.param(lambda: sa.SinkLocal(window_tokens=-1), "window_tokens", id="SinkLocal-window-neg"),
        pytest.param(lambda: sa.SinkLocal(sink_tokens=-1), "sink_tokens", id="SinkLocal-sink-neg"),
        pytest.param(
            lambda: sa.MoA(alphas=[[1.0]], betas=[[0.0]], block_size=0), "block_size", id="MoA-block0"
        ),
        pytest.param(
            lambda: sa.MoA(alphas=[[1.0]], betas=[[0.0]], sink_tokens=-2), "sink_tokens", id="MoA-sink-neg"
        ),
        pytest.param(
            lambda: sa.MoA(alphas=[[1.0]], betas=[[0.0]], min_span=-1), "min_span", id="MoA-min-span-neg"
        ),
        pytest.param(
            lambda: sa.BlockSparse(block_size=0, sink_blocks=1), "block_size", id="BlockSparse-block0"
        ),
        pytest.param(
            lambda: sa.BlockSparse(block_size=-8, sink_blocks=1), "block_size", id="BlockSparse-block-neg"
        ),
        pytest.param(
            lambda: sa.BlockSparse(sink_blocks=-1, local_blocks=1), "sink_blocks", id="BlockSparse-sink-neg"
        ),
        pytest.param(
            lambda: sa.BlockSparse(local_blocks=-1, sink_blocks=1), "local_blocks", id="BlockSparse-local-neg"
        ),
        pytest.param(lambda: sa.Dense(block_size=0), "block_size", id="Dense-block0"),
    ],
)
def test_config_errors_name_the_argument(make, arg):
    with pytest.raises(ConfigError, match=arg):
        make().mask(8, 8, 1)  # validation at construction or, at the latest, on use


def test_block_sparse_needs_a_selector():
    with pytest.raises(ConfigError):
        sa.BlockSparse(block_size=8).mask(8, 8, 1)


def test_block_sparse_layout_too_small():
    method = sa.BlockSparse(block_size=8, layout=torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(method.mask(32, 32, 1), bf.dense_mask(32, 32, 1))  # 4 blocks: fits
    with pytest.raises(LayoutError):
        method.mask(33, 33, 1)  # 5 blocks
    with pytest.raises(LayoutError):
        method.plan([10, 20], [20, 40], 1)
    # wrong head count for a 3-D layout
    three_heads = sa.BlockSparse(block_size=8, layout=torch.ones(3, 4, 4, dtype=torch.bool))
    with pytest.raises((LayoutError, ConfigError)):
        three_heads.mask(16, 16, 4, 2)

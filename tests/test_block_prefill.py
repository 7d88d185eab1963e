"""The torch prefill kernel's own paths against float64 dense attention with the explicit mask:
chunking (many chunks of uneven block counts), the per-head union of a GQA group (MoA) and its
per-query-head fallback, the cached per-layout plan (reused with other tensors, other K/V lengths),
the palette of partial-block masks and rows that see no key."""

from __future__ import annotations

import dataclasses
import warnings
import zlib

import pytest
import torch

import sparse_attn as sa
from sparse_attn.block_layout import BlockLayout
from sparse_attn.kernels import band_prefill, block_prefill
from sparse_attn.kernels.block_prefill import block_sparse_attention_torch

try:
    from tests.oracle import assert_padding_rows, batch_mask_from_method, dense_attention, make_qkv
except ModuleNotFoundError:  # tests/ itself on sys.path
    from oracle import (  # type: ignore[no-redef]
        assert_padding_rows,
        batch_mask_from_method,
        dense_attention,
        make_qkv,
    )

TOL = dict(atol=2e-5, rtol=1e-5)

# (q_lens, kv_lens, hq, hkv, d, causal)
SHAPES = [
    ((1000,), (1000,), 8, 2, 64, True),
    ((63, 1, 40), (63, 1, 40), 6, 2, 32, True),
    ((1, 63), (1000, 63), 4, 1, 64, True),
    ((200, 17), (1000, 300), 3, 1, 48, True),
    ((63, 20), (63, 50), 4, 4, 64, False),
    ((100,), (1000,), 6, 3, 32, False),
]


def _sid(s) -> str:
    q, kv, hq, hkv, d, causal = s
    j = lambda xs: "_".join(map(str, xs))  # noqa: E731
    return f"B{len(q)}-q{j(q)}-kv{j(kv)}-HQ{hq}-KV{hkv}-D{d}-{'causal' if causal else 'noncausal'}"


def _moa(hq: int) -> sa.MoA:
    # spans of neighbouring heads differ a little (the union of a GQA group pays) or a lot
    return sa.MoA(
        alphas=[[40.0 + 9.0 * h for h in range(hq)]],
        betas=[[0.02 * (h % 4) for h in range(hq)]],
        sink_tokens=5,
        min_span=9,
        block_size=16,
    )


METHODS = {
    "MoA": lambda hq: _moa(hq),
    "SinkLocal": lambda hq: sa.SinkLocal(sink_tokens=4, window_tokens=37, block_size=16),
    "S2": lambda hq: sa.S2(block_size=16, local_blocks=3, vert_stride=4),
    "BlockSparse-ashape": lambda hq: sa.BlockSparse(block_size=32, sink_blocks=1, local_blocks=2),
}


def _check(method, shape, **kw) -> BlockLayout:
    q_lens, kv_lens, hq, hkv, d, causal = shape
    sq, skv = max(q_lens), max(kv_lens)
    q, k, v = make_qkv(
        len(q_lens),
        hq,
        hkv,
        sq,
        skv,
        d,
        seed=zlib.crc32(_sid(shape).encode()) % 1000,
        q_lens=q_lens,
        kv_lens=kv_lens,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.CoverageWarning)
        mask = batch_mask_from_method(method, q_lens, kv_lens, sq, skv, hq, hkv, causal=causal)
        layout = method.plan(torch.tensor(q_lens), torch.tensor(kv_lens), hq, hkv, causal=causal)
    ref_out, ref_lse = dense_attention(q, k, v, mask)
    scale = d**-0.5
    for need_lse in (True, False):
        out, lse = block_sparse_attention_torch(q, k, v, layout, scale, need_lse=need_lse)
        assert_padding_rows(out, lse, q_lens)
        torch.testing.assert_close(out.double(), ref_out, **TOL)
        if need_lse:
            assert lse is not None
            real = torch.isfinite(ref_lse)
            assert torch.equal(torch.isfinite(lse), real)
            torch.testing.assert_close(lse.double()[real], ref_lse[real], **TOL)
    return layout


@pytest.mark.parametrize("shape", SHAPES, ids=[_sid(s) for s in SHAPES])
@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize(
    "chunk_bytes", [block_prefill.CHUNK_BYTES, 40_000], ids=["chunk-default", "chunk-small"]
)
@pytest.mark.parametrize("band", [True, False], ids=["band-kernel-on", "blocks-only"])
def test_prefill_kernel_matches_oracle(name, shape, chunk_bytes, band, monkeypatch):
    monkeypatch.setattr(block_prefill, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(band_prefill, "CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(block_prefill, "BAND_PREFILL", band)
    _check(METHODS[name](shape[2]), shape)


@pytest.mark.parametrize(
    "shape", [s for s in SHAPES if s[2] > s[3]], ids=[_sid(s) for s in SHAPES if s[2] > s[3]]
)
@pytest.mark.parametrize("waste", [0.0, 100.0], ids=["per-query-head", "group-union"])
def test_moa_group_union_and_per_head_units_agree(shape, waste, monkeypatch):
    monkeypatch.setattr(block_prefill, "BAND_PREFILL", False)  # the block kernel's own paths
    monkeypatch.setattr(block_prefill, "UNION_WASTE", waste)
    monkeypatch.setattr(block_prefill, "CHUNK_BYTES", 40_000)
    _check(_moa(shape[2]), shape)


def _plans(layout: BlockLayout) -> dict:
    return layout.__dict__["_prefill_plans"]


@pytest.mark.parametrize("waste,heads", [(0.0, 1), (100.0, 4)], ids=["per-query-head", "group-union"])
def test_union_choice_sets_the_unit(waste, heads, monkeypatch):
    monkeypatch.setattr(block_prefill, "BAND_PREFILL", False)  # the block kernel's own paths
    monkeypatch.setattr(block_prefill, "UNION_WASTE", waste)
    shape = ((300,), (300,), 8, 2, 32, True)
    layout = _check(_moa(8), shape)
    groups = next(iter(_plans(layout).values()))
    assert {g.heads for g in groups} == {heads}


@pytest.mark.parametrize("band", [True, False], ids=["band-kernel", "block-kernel"])
def test_plan_is_kept_on_the_layout_and_reused(band, monkeypatch):
    monkeypatch.setattr(block_prefill, "BAND_PREFILL", band)
    monkeypatch.setattr(band_prefill, "MIN_SAVING", 0.0)
    shape = ((1000,), (1000,), 8, 2, 64, True)
    method = METHODS["SinkLocal"](8)
    layout = _check(method, shape)
    plans = dict(_plans(layout))
    assert plans
    # other tensors through the same layout: same plan objects, still exact
    q, k, v = make_qkv(1, 8, 2, 1000, 1000, 64, seed=7)
    mask = batch_mask_from_method(method, (1000,), (1000,), 1000, 1000, 8, 2, causal=True)
    ref_out, _ = dense_attention(q, k, v, mask)
    out, _ = block_sparse_attention_torch(q, k, v, layout, 64**-0.5, need_lse=False)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    assert all(_plans(layout)[key] is plan for key, plan in plans.items())
    # longer K/V tensors (padding past kv_len, a whole number of blocks more) get their own plan
    k2 = torch.cat([k, torch.full((1, 2, 40, 64), 1e4)], dim=2)
    v2 = torch.cat([v, torch.full((1, 2, 40, 64), 1e4)], dim=2)
    out2, _ = block_sparse_attention_torch(q, k2, v2, layout, 64**-0.5, need_lse=False)
    torch.testing.assert_close(out2.double(), ref_out, **TOL)
    # (the band kernel's plan depends on the layout alone; the block kernel's on the blocks of K/V)
    assert len(_plans(layout)) == len(plans) + (0 if band else 1)
    assert any(isinstance(p, band_prefill.BandPlan) for p in plans.values()) == band


@pytest.mark.parametrize("chunk_bytes", [block_prefill.CHUNK_BYTES, 1], ids=["one-chunk", "chunk-per-tile"])
def test_rows_without_keys_give_zero_and_neg_inf(chunk_bytes, monkeypatch):
    # tile 1 lists no block: inside a chunk its slots are unused (masked whole), alone it is a chunk
    # without keys
    monkeypatch.setattr(block_prefill, "CHUNK_BYTES", chunk_bytes)
    bq = bk = 16
    q_len = kv_len = 48
    idx = torch.tensor([[[[0, 0], [0, 0], [2, 0]]]])
    counts = torch.tensor([[[1, 0, 1]]])
    full = torch.zeros(1, 1, 3, 2, dtype=torch.bool)
    layout = BlockLayout(
        idx, counts, full, bq, bk, torch.tensor([q_len]), torch.tensor([kv_len]), causal=True
    ).validate()
    q, k, v = make_qkv(1, 4, 2, q_len, kv_len, 32, seed=3)
    mask = layout.to_dense_mask()
    ref_out, ref_lse = dense_attention(q, k, v, mask)
    out, lse = block_sparse_attention_torch(q, k, v, layout, 32**-0.5, need_lse=True)
    assert lse is not None
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert bool(torch.isneginf(lse[0, :, 16:32]).all())
    assert bool((out[0, :, 16:32] == 0).all())


@pytest.mark.parametrize("window", [0, 1, 5, 16, 40], ids=lambda w: f"W{w}")
def test_window_masks_in_the_palette(window):
    # a windowed layout written by hand: every tile lists all blocks up to its own, all partial
    bq = bk = 16
    n = 80
    nt = n // bq
    idx = torch.arange(nt).expand(nt, nt).clone()[None, None]
    counts = (torch.arange(nt) + 1)[None, None]
    full = torch.zeros(1, 1, nt, nt, dtype=torch.bool)
    layout = BlockLayout(
        idx,
        counts,
        full,
        bq,
        bk,
        torch.tensor([n]),
        torch.tensor([n]),
        causal=True,
        sink_tokens=torch.tensor([[3]]),
        window_tokens=torch.tensor([[window]]),
    ).validate()
    q, k, v = make_qkv(1, 2, 1, n, n, 32, seed=window)
    ref_out, ref_lse = dense_attention(q, k, v, layout.to_dense_mask())
    out, lse = block_sparse_attention_torch(q, k, v, layout, 32**-0.5, need_lse=True)
    assert lse is not None
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    real = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), real)
    torch.testing.assert_close(lse.double()[real], ref_lse[real], **TOL)


@pytest.mark.parametrize("name", ["MoA", "SinkLocal", "S2"])
def test_gradients_match_the_oracle(name):
    # the kernel keeps an autograd path (out= and in-place softmax only without grad)
    shape = ((70, 33), (100, 33), 4, 2, 16, True)
    q_lens, kv_lens, hq, hkv, d, causal = shape
    method = METHODS[name](hq)
    q, k, v = (t.double().requires_grad_() for t in make_qkv(2, hq, hkv, 70, 100, d, seed=11))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.CoverageWarning)
        mask = batch_mask_from_method(method, q_lens, kv_lens, 70, 100, hq, hkv, causal=causal)
        layout = method.plan(torch.tensor(q_lens), torch.tensor(kv_lens), hq, hkv, causal=causal)
    weight = torch.randn(2, hq, 70, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for i in range(2):
        weight[i, :, q_lens[i] :] = 0
    out, _ = block_sparse_attention_torch(q, k, v, layout, d**-0.5, need_lse=True)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))
    ref_out, _ = dense_attention(q, k, v, mask)
    ref_grads = torch.autograd.grad((ref_out * weight).sum(), (q, k, v))
    for g, ref in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("band", [True, False], ids=["band-kernel", "block-kernel"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_key_reaches_only_the_rows_that_attend_it(bad, band, monkeypatch):
    monkeypatch.setattr(block_prefill, "BAND_PREFILL", band)
    # key 30 lies in a partial block (window edge) of later tiles: masked there, it must not leak
    # (a NaN poisons exactly the rows that attend it; an inf's effect on them depends on its sign)
    method = sa.SinkLocal(sink_tokens=2, window_tokens=8, block_size=16)
    layout = method.plan([64], [64], 2, 1)
    q, k, v = make_qkv(1, 2, 1, 64, 64, 32, seed=2)
    k[0, 0, 30, 3] = bad
    mask = layout.to_dense_mask()  # [1, 1, 64, 64]
    out, lse = block_sparse_attention_torch(q, k, v, layout, 32**-0.5, need_lse=True)
    assert lse is not None
    attends = mask[0, 0, :, 30]  # [64]
    if bad != bad:
        assert torch.equal(torch.isnan(out[0]).any(-1), attends.expand(2, 64))
    clean = ~attends
    k_ok = k.clone()
    k_ok[0, 0, 30] = 0.0
    ref_out, _ = dense_attention(q, k_ok, v, mask)
    torch.testing.assert_close(out[0][:, clean].double(), ref_out[0][:, clean], **TOL)


# (sink, window, block) x shapes: windows narrower than a tile, sinks past the window, sinks past the
# row, blocks that do not divide the lengths
BAND_CASES = [(4, 37, 16), (0, 5, 16), (20, 3, 8), (3, 1, 16), (64, 200, 32), (2000, 30, 16), (5, 100, 64)]
BAND_SHAPES = [
    ((1000,), (1000,), 8, 2, 64, True),
    ((63, 1, 40), (63, 1, 40), 6, 2, 32, True),
    ((200, 17), (1000, 300), 3, 1, 48, True),
    ((129,), (129,), 4, 4, 96, True),
]


@pytest.mark.parametrize("case", BAND_CASES, ids=lambda c: f"s{c[0]}-w{c[1]}-b{c[2]}")
@pytest.mark.parametrize("shape", BAND_SHAPES, ids=[_sid(s) for s in BAND_SHAPES])
def test_band_kernel_runs_sink_window_layouts_exactly(case, shape, monkeypatch):
    """SinkLocal layouts run on the band kernel (a BandPlan is kept on the layout), in one chunk
    or in chunks of a tile, equal to the oracle."""
    sink, window, block = case
    monkeypatch.setattr(band_prefill, "MIN_SAVING", 0.0)
    for chunk in (band_prefill.CHUNK_BYTES, 1):
        monkeypatch.setattr(band_prefill, "CHUNK_BYTES", chunk)
        layout = _check(sa.SinkLocal(sink_tokens=sink, window_tokens=window, block_size=block), shape)
        assert all(isinstance(p, band_prefill.BandPlan) for p in _plans(layout).values())


def test_band_kernel_units_follow_per_head_spans(monkeypatch):
    """MoA: a KV head's query heads with one span are one unit; spans that differ within a KV head
    stay on the block kernel (its GQA union), exact either way."""
    monkeypatch.setattr(band_prefill, "MIN_SAVING", 0.0)
    same = sa.MoA(
        alphas=[[40.0, 40.0, 40.0, 17.0, 17.0, 17.0]], betas=[[0.0] * 6], sink_tokens=5, min_span=9, block_size=16
    )
    layout = _check(same, ((300,), (300,), 6, 2, 32, True))
    (plan,) = _plans(layout).values()
    assert [(u.kv_head, u.heads, u.window) for u in plan.units] == [(0, slice(0, 3), 40), (1, slice(3, 6), 17)]
    mixed = dataclasses.replace(same, alphas=[[40.0, 40.0, 90.0, 17.0, 17.0, 17.0]])
    layout = _check(mixed, ((300,), (300,), 6, 2, 32, True))
    assert not any(isinstance(p, band_prefill.BandPlan) for p in _plans(layout).values())


@pytest.mark.parametrize(
    "method",
    [
        sa.S2(block_size=16, local_blocks=3, vert_stride=4),
        sa.BlockSparse(block_size=16, sink_blocks=1, local_blocks=2),
    ],
    ids=["S2", "A-shape"],
)
def test_block_patterns_stay_on_the_block_kernel(method):
    layout = _check(method, ((300,), (300,), 4, 2, 32, True))
    assert not any(isinstance(p, band_prefill.BandPlan) for p in _plans(layout).values())


def test_a_window_that_lists_fewer_blocks_stays_on_the_block_kernel():
    """A sink + window layout whose blocks are a subset of the window's (a window intersected with
    another pattern) is not a band: the band kernel would attend keys the layout leaves out."""
    n, bs = 128, 16
    full_layout = sa.SinkLocal(sink_tokens=2, window_tokens=40, block_size=bs).plan([n], [n], 2, 1)
    idx, counts = full_layout.kv_indices.clone(), full_layout.kv_counts.clone()
    counts[0, 0, -1] -= 1  # the last tile drops one of its blocks
    layout = BlockLayout(
        idx, counts, full_layout.full, bs, bs, torch.tensor([n]), torch.tensor([n]), causal=True,
        sink_tokens=torch.tensor([[2]]), window_tokens=torch.tensor([[40]]),
    ).validate()
    q, k, v = make_qkv(1, 2, 1, n, n, 32, seed=4)
    ref_out, _ = dense_attention(q, k, v, layout.to_dense_mask())
    out, _ = block_sparse_attention_torch(q, k, v, layout, 32**-0.5, need_lse=False)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    assert not any(isinstance(p, band_prefill.BandPlan) for p in _plans(layout).values())


def test_band_kernel_with_a_dense_kv_group(monkeypatch):
    """Mixed heads: a KV head of SinkLocal heads and one of dense heads (a window past the row) is a
    band plan of two units, the dense unit's window clamped to the row; exact."""
    monkeypatch.setattr(band_prefill, "MIN_SAVING", 0.0)
    from sparse_attn.planning import plan_heads

    sink_local = sa.SinkLocal(sink_tokens=4, window_tokens=37, block_size=16)
    layout = plan_heads([sink_local, sink_local, None, None], torch.tensor([150]), torch.tensor([150]), 2, True)
    q, k, v = make_qkv(1, 4, 2, 150, 150, 32, seed=8)
    ref_out, ref_lse = dense_attention(q, k, v, layout.to_dense_mask())
    out, lse = block_sparse_attention_torch(q, k, v, layout, 32**-0.5, need_lse=True)
    torch.testing.assert_close(out.double(), ref_out, **TOL)
    torch.testing.assert_close(lse.double(), ref_lse, **TOL)
    (plan,) = _plans(layout).values()
    assert [(u.kv_head, u.window) for u in plan.units] == [(0, 37), (1, 150)]


@pytest.mark.parametrize("window, band", [(37, True), (1000, False)], ids=["narrow-window", "wide-window"])
def test_band_kernel_only_where_it_saves_enough_columns(window, band):
    """A 37-key window with 4 sinks in 16-key tiles: the block kernel computes ~1.5x the band's
    columns (band kernel); a 1000-key window in 64-key tiles: ~1.05x (block kernel)."""
    block = 16 if window < 100 else 64
    layout = _check(
        sa.SinkLocal(sink_tokens=4, window_tokens=window, block_size=block), ((3000,), (3000,), 4, 2, 32, True)
    )
    assert any(isinstance(p, band_prefill.BandPlan) for p in _plans(layout).values()) == band

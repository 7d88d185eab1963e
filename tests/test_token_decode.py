"""token_sparse_attention over a TokenSelection, and merge_attention, against the float64 oracle."""

from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from sparse_attn.kernels.token_decode import SDPA_MAX_KEYS

try:
    from tests.oracle import (
        NEG_INF,
        assert_close_lse,
        batch_mask_from_method,
        dense_attention,
        lowp_dense_attention,
        make_qkv,
        max_err,
        selection_mask_and_bias,
    )
except ModuleNotFoundError:  # tests/ itself on sys.path
    from oracle import (  # type: ignore[no-redef]
        NEG_INF,
        assert_close_lse,
        batch_mask_from_method,
        dense_attention,
        lowp_dense_attention,
        make_qkv,
        max_err,
        selection_mask_and_bias,
    )

FP32_TOL = dict(atol=2e-5, rtol=1e-5)
B, HQ, HKV, D = 2, 6, 2, 64
KV_LENS = (50, 33)
SKV = max(KV_LENS)


def make_selection(
    num_sel_heads: int,
    *,
    seed: int,
    kv_lens=KV_LENS,
    k_max: int = 12,
    with_weights: bool = False,
    index_dtype=torch.int64,
    empty=((1, 0),),
    last_only=None,
):
    """A random TokenSelection: sorted distinct indices < kv_lens[b], some (b, h) empty, and some
    holding only the last key (so causal with Sq > 1 empties the earlier query rows). Entries past
    counts are 0 (padding the kernel must ignore)."""
    if last_only is None:  # with one selection head, row 0 stays random (row 1 is the empty one)
        last_only = () if num_sel_heads == 1 else ((0, 0),)
    g = torch.Generator().manual_seed(seed)
    nb = len(kv_lens)
    indices = torch.zeros(nb, num_sel_heads, k_max, dtype=index_dtype)
    counts = torch.zeros(nb, num_sel_heads, dtype=torch.int32)
    for b in range(nb):
        kl = kv_lens[b]
        for h in range(num_sel_heads):
            if (b, h) in empty:
                continue
            if (b, h) in last_only:
                idx = torch.tensor([kl - 1])
            else:
                n = int(torch.randint(2, min(k_max, kl) + 1, (1,), generator=g))
                idx = torch.randperm(kl, generator=g)[:n].sort().values
                if h % 2 == 1:  # make sure the newest keys show up (causal drops them for early rows)
                    idx = torch.unique(torch.cat([idx[: k_max - 2], torch.tensor([kl - 2, kl - 1])]))
            indices[b, h, : len(idx)] = idx.to(index_dtype)
            counts[b, h] = len(idx)
    log_weights = None
    if with_weights:
        log_weights = torch.rand(nb, num_sel_heads, k_max, generator=g) * 3.0 - 1.0
    return sa.TokenSelection(indices=indices, counts=counts, log_weights=log_weights)


def _oracle(q, k, v, sel, *, causal, kv_lens=KV_LENS, scale=None):
    mask, bias = selection_mask_and_bias(
        sel.indices, sel.counts, sel.log_weights, q.shape[2], k.shape[2], q.shape[1], kv_lens, causal=causal
    )
    return dense_attention(q, k, v, mask, scale=scale, bias=bias), mask


SEL_HEADS = {"Hsel1": 1, "HselKV": HKV, "HselQ": HQ}
DECODE_PARAMS = [
    # (sel heads, Sq, causal, log-weights)
    ("HselKV", 1, True, False),
    ("HselQ", 1, True, False),
    ("Hsel1", 1, True, False),
    ("HselKV", 1, True, True),
    ("HselQ", 1, True, True),
    ("HselKV", 3, True, False),
    ("HselQ", 3, True, True),
    ("Hsel1", 3, True, True),
    ("HselKV", 3, False, False),
    ("HselQ", 3, False, True),
]


def _pid(p):
    h, sq, causal, w = p
    return (
        f"{h}-B{B}-q{sq}-kv{'_'.join(map(str, KV_LENS))}-HQ{HQ}-KV{HKV}-D{D}-{'causal' if causal else 'noncausal'}"
        + ("-logw" if w else "")
    )


@pytest.mark.parametrize("params", DECODE_PARAMS, ids=[_pid(p) for p in DECODE_PARAMS])
def test_token_sparse_matches_oracle(params):
    hname, sq, causal, weights = params
    sel = make_selection(SEL_HEADS[hname], seed=sq * 10 + weights, with_weights=weights)
    q, k, v = make_qkv(B, HQ, HKV, sq, SKV, D, seed=5, kv_lens=KV_LENS)
    (ref_out, ref_lse), mask = _oracle(q, k, v, sel, causal=causal)
    out, lse = sa.token_sparse_attention(q, k, v, sel, causal=causal, kv_lens=list(KV_LENS), return_lse=True)
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == q.shape[:3]
    empty = ~mask.any(dim=-1)
    assert empty.any(), "test setup: expected some rows with no selected key"
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "rows with an empty selection must be 0"
    torch.testing.assert_close(out.to(torch.float64), ref_out, **FP32_TOL)
    assert_close_lse(lse, ref_lse, **FP32_TOL)
    out_only = sa.token_sparse_attention(q, k, v, sel, causal=causal, kv_lens=list(KV_LENS))
    assert torch.equal(out_only, out)


def test_token_sparse_int32_indices_explicit_scale():
    sel = make_selection(HKV, seed=77, index_dtype=torch.int32, with_weights=True)
    q, k, v = make_qkv(B, HQ, HKV, 1, SKV, D, seed=6, kv_lens=KV_LENS)
    (ref_out, ref_lse), _ = _oracle(q, k, v, sel, causal=True, scale=0.21)
    out, lse = sa.token_sparse_attention(
        q, k, v, sel, scale=0.21, kv_lens=torch.tensor(KV_LENS), return_lse=True
    )
    torch.testing.assert_close(out.to(torch.float64), ref_out, **FP32_TOL)
    assert_close_lse(lse, ref_lse, **FP32_TOL)


def test_token_sparse_default_kv_lens_long_selection():
    """No kv_lens (all Skv), a long selection of most keys, GQA 4, D=128."""
    kv = (300, 300)
    g = torch.Generator().manual_seed(3)
    keep = torch.rand(2, 2, 300, generator=g) < 0.6
    k_max = int(keep.sum(-1).max())
    indices = torch.zeros(2, 2, k_max, dtype=torch.int64)
    counts = keep.sum(-1).to(torch.int32)
    for b in range(2):
        for h in range(2):
            idx = keep[b, h].nonzero().flatten()
            indices[b, h, : len(idx)] = idx
    sel = sa.TokenSelection(indices=indices, counts=counts, log_weights=None)
    q, k, v = make_qkv(2, 8, 2, 1, 300, 128, seed=8)
    (ref_out, ref_lse), _ = _oracle(q, k, v, sel, causal=True, kv_lens=kv)
    out, lse = sa.token_sparse_attention(q, k, v, sel, return_lse=True)
    torch.testing.assert_close(out.to(torch.float64), ref_out, **FP32_TOL)
    assert_close_lse(lse, ref_lse, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_token_sparse_low_precision(dtype):
    sel = make_selection(HKV, seed=9, with_weights=True)
    q, k, v = make_qkv(B, HQ, HKV, 3, SKV, D, dtype=dtype, seed=10, kv_lens=KV_LENS)
    (ref_out, ref_lse), mask = _oracle(q, k, v, sel, causal=True)
    _, bias = selection_mask_and_bias(
        sel.indices, sel.counts, sel.log_weights, 3, SKV, HQ, KV_LENS, causal=True
    )
    lp_out, lp_lse = lowp_dense_attention(q, k, v, mask, bias=bias)
    out, lse = sa.token_sparse_attention(q, k, v, sel, kv_lens=list(KV_LENS), return_lse=True)
    assert out.dtype == dtype
    valid = mask.any(dim=-1)
    atol = {torch.float16: 2e-4, torch.bfloat16: 1.5e-3}[dtype]
    assert max_err(out, ref_out, valid) <= 2 * max_err(lp_out, ref_out, valid) + atol
    assert max_err(lse, ref_lse, valid) <= 2 * max_err(lp_lse, ref_lse, valid) + 1e-5
    assert bool((lse[~valid] == NEG_INF).all())


def test_nan_in_selected_value_propagates_only_where_selected():
    sel = make_selection(HKV, seed=12, empty=(), last_only=())
    q, k, v = make_qkv(B, HQ, HKV, 1, SKV, D, seed=13, kv_lens=KV_LENS)
    j = int(sel.indices[0, 1, 0])  # a key selected by KV head 1 of row 0
    v[0, 1, j, 0] = float("nan")
    out = sa.token_sparse_attention(q, k, v, sel, kv_lens=list(KV_LENS))
    assert bool(out[0, 3:6, 0, 0].isnan().all())
    assert not bool(out[0, 0:3].isnan().any()) and not bool(out[1].isnan().any())


# ----------------------------------------------------------------------------- merge_attention
def _split(sel, seed):
    """Split every selected set into two disjoint sorted parts (either part may be empty)."""
    g = torch.Generator().manual_seed(seed)
    nb, nh, k_max = sel.indices.shape
    parts = []
    coin = torch.rand(nb, nh, k_max, generator=g) < 0.5
    for side in (True, False):
        idx = torch.zeros_like(sel.indices)
        cnt = torch.zeros_like(sel.counts)
        lw = None if sel.log_weights is None else torch.zeros_like(sel.log_weights)
        for b in range(nb):
            for h in range(nh):
                n = int(sel.counts[b, h])
                keep = (coin[b, h, :n] == side).nonzero().flatten()
                idx[b, h, : len(keep)] = sel.indices[b, h, keep]
                if lw is not None:
                    lw[b, h, : len(keep)] = sel.log_weights[b, h, keep]
                cnt[b, h] = len(keep)
        parts.append(sa.TokenSelection(indices=idx, counts=cnt, log_weights=lw))
    return parts


@pytest.mark.parametrize("weights", [False, True], ids=["plain", "logw"])
@pytest.mark.parametrize("sq", [1, 3], ids=["q1", "q3"])
def test_merge_of_disjoint_parts_equals_union(sq, weights):
    sel = make_selection(HKV, seed=20 + sq, with_weights=weights)
    part_a, part_b = _split(sel, seed=sq)
    q, k, v = make_qkv(B, HQ, HKV, sq, SKV, D, seed=21, kv_lens=KV_LENS)
    kw = dict(causal=True, kv_lens=list(KV_LENS), return_lse=True)
    oa, la = sa.token_sparse_attention(q, k, v, part_a, **kw)
    ob, lb = sa.token_sparse_attention(q, k, v, part_b, **kw)
    assert (la == NEG_INF).any() or (lb == NEG_INF).any(), "test setup: want an empty part somewhere"
    out, lse = sa.merge_attention(oa, la, ob, lb)
    ou, lu = sa.token_sparse_attention(q, k, v, sel, **kw)
    torch.testing.assert_close(out, ou, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lu, atol=1e-5, rtol=1e-5)
    (ref_out, ref_lse), _ = _oracle(q, k, v, sel, causal=True)
    torch.testing.assert_close(out.to(torch.float64), ref_out, **FP32_TOL)
    assert_close_lse(lse, ref_lse, **FP32_TOL)


def test_merge_dense_sinklocal_part_with_selected_middle():
    """The decode recipe: dense sinks + local window (sparse_attention) merged with selected middle keys."""
    kv_lens = (200, 130)
    q, k, v = make_qkv(2, 4, 2, 1, 200, 64, seed=30, kv_lens=kv_lens)
    sl = sa.SinkLocal(sink_tokens=4, window_tokens=16, block_size=16)
    o1, l1 = sa.sparse_attention(q, k, v, sl, q_lens=[1, 1], kv_lens=list(kv_lens), return_lse=True)
    middle = [torch.arange(10, 100, 7), torch.arange(5, 110, 11)]
    k_max = max(len(m) for m in middle)
    indices = torch.zeros(2, 1, k_max, dtype=torch.int64)
    counts = torch.zeros(2, 1, dtype=torch.int32)
    for b, m in enumerate(middle):
        indices[b, 0, : len(m)] = m
        counts[b, 0] = len(m)
    sel = sa.TokenSelection(indices=indices, counts=counts, log_weights=None)
    o2, l2 = sa.token_sparse_attention(q, k, v, sel, kv_lens=list(kv_lens), return_lse=True)
    out, lse = sa.merge_attention(o1, l1, o2, l2)
    m_sl = batch_mask_from_method(sl, (1, 1), kv_lens, 1, 200, 4, 2, causal=True)
    m_sel, _ = selection_mask_and_bias(indices, counts, None, 1, 200, 4, kv_lens, causal=True)
    assert not (m_sl & m_sel).any(), "test setup: parts must be disjoint"
    ref_out, ref_lse = dense_attention(q, k, v, m_sl | m_sel)
    torch.testing.assert_close(out.to(torch.float64), ref_out, **FP32_TOL)
    assert_close_lse(lse, ref_lse, **FP32_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_with_empty_part_returns_other_exactly(dtype):
    g = torch.Generator().manual_seed(40)
    oa = torch.randn(2, 3, 5, 16, generator=g).to(dtype)
    la = torch.randn(2, 3, 5, generator=g) * 4
    la[0, 1, 2] = NEG_INF  # an empty row in the real part too
    oa[0, 1, 2] = 0
    ob = torch.randn(2, 3, 5, 16, generator=g).to(dtype)  # garbage, must not leak
    lb = torch.full((2, 3, 5), NEG_INF)
    for out, lse in (sa.merge_attention(oa, la, ob, lb), sa.merge_attention(ob, lb, oa, la)):
        assert out.dtype == dtype
        assert torch.equal(out, oa)
        assert torch.equal(lse, la)
    out, lse = sa.merge_attention(ob, lb, ob, lb)
    assert torch.equal(out, torch.zeros_like(ob)) and bool((lse == NEG_INF).all())


def test_merge_formula():
    """Two parts with known lse: out = (e^la oa + e^lb ob) / (e^la + e^lb), lse = logaddexp."""
    g = torch.Generator().manual_seed(41)
    oa, ob = torch.randn(1, 2, 4, 8, generator=g), torch.randn(1, 2, 4, 8, generator=g)
    la, lb = torch.randn(1, 2, 4, generator=g) * 30, torch.randn(1, 2, 4, generator=g) * 30
    out, lse = sa.merge_attention(oa, la, ob, lb)
    la64, lb64 = la.double(), lb.double()
    ref_lse = torch.logaddexp(la64, lb64)
    wa, wb = torch.exp(la64 - ref_lse)[..., None], torch.exp(lb64 - ref_lse)[..., None]
    torch.testing.assert_close(out.double(), wa * oa.double() + wb * ob.double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("k_max", [17, SDPA_MAX_KEYS + 3], ids=["sdpa", "matmul"])
@pytest.mark.parametrize("hq, hkv, d", [(6, 2, 64), (9, 3, 96), (4, 4, 128)])
@pytest.mark.parametrize("sel_heads", ["kv", "one"])
def test_full_selection_without_lse_matches_oracle_and_reuses_its_rows(hq, hkv, d, sel_heads, k_max):
    """Every slot used, one query, no weights, no lse: the fused path (a static layout's decode; SDPA
    up to SDPA_MAX_KEYS selected keys, matmuls above). The same selection over a second layer's cache,
    then over a longer cache, must not reuse stale rows."""
    kv_lens = (k_max + 46, k_max + 23)
    g = torch.Generator().manual_seed(hq * d)
    heads = hkv if sel_heads == "kv" else 1
    idx = torch.stack([torch.randperm(kv_lens[b], generator=g)[:k_max].sort().values for b in range(2) for _ in range(heads)])
    sel = sa.TokenSelection(indices=idx.view(2, heads, k_max), counts=torch.full((2, heads), k_max))
    for layer, skv in enumerate((kv_lens[0], kv_lens[0], kv_lens[0] + 7)):
        q, k, v = make_qkv(2, hq, hkv, 1, skv, d, seed=layer, kv_lens=kv_lens)
        (ref, _), _ = _oracle(q, k, v, sel, causal=True, kv_lens=kv_lens)
        out = sa.token_sparse_attention(q, k, v, sel, kv_lens=list(kv_lens))
        torch.testing.assert_close(out.to(torch.float64), ref, **FP32_TOL)


@pytest.mark.parametrize("layout", ["preallocated_slice", "heads_last", "v_differs"])
@pytest.mark.parametrize("hname", ["HselKV", "Hsel1"])
def test_strided_caches_match_oracle(layout, hname):
    """K/V that are views, not contiguous tensors: a slice of a longer preallocated cache (a
    StaticCache's; gathered in place) and [B, S, H, D] storage seen as [B, H, S, D] (gathered from a
    copy). The fused path and the general one, with the same selection (its cached rows must follow
    the layout)."""
    sel = make_selection(SEL_HEADS[hname], seed=7, empty=(), last_only=())
    m = int(sel.counts.min())
    assert m < sel.k_max, "test setup: the selection must have unused slots"
    full = sa.TokenSelection(sel.indices[..., :m].contiguous(), torch.full_like(sel.counts, m))
    q, k, v = make_qkv(B, HQ, HKV, 1, SKV, D, seed=11, kv_lens=KV_LENS)
    if layout == "preallocated_slice":
        kbuf, vbuf = torch.randn(B, HKV, SKV + 29, D), torch.randn(B, HKV, SKV + 29, D)
        kbuf[:, :, :SKV], vbuf[:, :, :SKV] = k, v
        ks, vs = kbuf[:, :, :SKV], vbuf[:, :, :SKV]
    elif layout == "heads_last":
        ks = k.transpose(1, 2).contiguous().transpose(1, 2)
        vs = v.transpose(1, 2).contiguous().transpose(1, 2)
    else:
        ks, vs = k, v.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (ks.is_contiguous() and vs.is_contiguous())
    for s in (full, sel, full):
        (ref, _), _ = _oracle(q, k, v, s, causal=True)
        out = sa.token_sparse_attention(q, ks, vs, s, kv_lens=list(KV_LENS))
        torch.testing.assert_close(out.to(torch.float64), ref, **FP32_TOL)
        assert torch.equal(out, sa.token_sparse_attention(q, k, v, s, kv_lens=list(KV_LENS)))

"""Hypothesis properties of the static patterns (small ranges so the brute force stays fast).

- causality: no True above the bottom-right diagonal when causal;
- mask() equals the brute-force builder for random configs;
- S2: the union over heads is the full causal mask exactly when the residue condition holds
  (in the regime n_blocks >= local_blocks + vert_stride), and covers_full_context agrees;
- density grows with budget (the larger budget's mask is a superset);
- budget >= length gives exactly dense;
- plan() round-trips: to_dense_mask() == mask() per row, validate() passes, density() is
  attended / allowed computed here.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_attn as sa
from sparse_attn import CoverageWarning

try:
    import bruteforce as bf
except ImportError:  # tests/ imported as a package
    from tests import bruteforce as bf

# the example count comes from the profile in conftest; brute force on CPU needs no deadline
prop = settings(deadline=None)


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        return fn(*args, **kw)


# --------------------------------------------------------------------------------------------------
# strategies: each draws (method, brute(b, q_len, kv_len) -> [H, Sq, Skv], num_heads, num_kv_heads)


@st.composite
def heads(draw, max_kv=4, max_group=3):
    kv = draw(st.integers(1, max_kv))
    return kv * draw(st.integers(1, max_group)), kv


@st.composite
def lengths(draw, max_kv=40):
    kv_len = draw(st.integers(1, max_kv))
    return draw(st.integers(1, kv_len)), kv_len


@st.composite
def s2_params(draw):
    h, kvh = draw(heads(max_kv=5))
    return (
        dict(
            block_size=draw(st.integers(1, 4)),
            local_blocks=draw(st.integers(0, 3)),
            vert_stride=draw(st.integers(1, 6)),
            head_offset=draw(st.integers(0, 7)),
            homo_head=draw(st.booleans()),
            num_dense_heads=draw(st.integers(0, kvh)),
        ),
        h,
        kvh,
    )


def s2_brute(p, h, kvh, causal):
    return lambda b, q, kv: bf.s2_mask(
        q,
        kv,
        h,
        kvh,
        p["block_size"],
        p["local_blocks"],
        p["vert_stride"],
        p["head_offset"],
        p["homo_head"],
        p["num_dense_heads"],
        causal,
    )


@st.composite
def moa_params(draw, num_heads):
    # alphas integral and betas multiples of 1/16 keep alpha + beta * N exact in any float width
    return dict(
        alphas=[draw(st.integers(0, 50)) * 1.0 for _ in range(num_heads)],
        betas=[draw(st.integers(0, 16)) / 16 for _ in range(num_heads)],
        sink_tokens=draw(st.integers(0, 6)),
        min_span=draw(st.integers(0, 20)),
        block_size=draw(st.integers(1, 8)),
    )


@st.composite
def static_method(draw, causal):
    """Any static method with its brute-force builder."""
    kind = draw(st.sampled_from(["S2", "SinkLocal", "MoA", "BlockSparse", "Dense"]))
    h, kvh = draw(heads())
    if kind == "S2":
        p, h, kvh = draw(s2_params())
        return sa.S2(**p), s2_brute(p, h, kvh, causal), h, kvh
    if kind == "SinkLocal":
        sink, window, bs = draw(st.integers(0, 6)), draw(st.integers(1, 20)), draw(st.integers(1, 8))
        return (
            sa.SinkLocal(sink_tokens=sink, window_tokens=window, block_size=bs),
            lambda b, q, kv: bf.sink_local_mask(q, kv, h, sink, window, causal),
            h,
            kvh,
        )
    if kind == "MoA":
        p = draw(moa_params(h))
        method = sa.MoA(
            alphas=[p["alphas"]],
            betas=[p["betas"]],
            sink_tokens=p["sink_tokens"],
            min_span=p["min_span"],
            block_size=p["block_size"],
        )
        return (
            method,
            lambda b, q, kv: bf.moa_mask(
                q, kv, p["alphas"], p["betas"], p["sink_tokens"], p["min_span"], causal
            ),
            h,
            kvh,
        )
    if kind == "BlockSparse":
        bs = draw(st.integers(1, 8))
        n_blocks = (40 + bs - 1) // bs  # enough for any drawn length
        layout = None
        if draw(st.booleans()):
            layout_heads = draw(st.sampled_from([None, h, kvh]))
            shape = (n_blocks, n_blocks) if layout_heads is None else (layout_heads, n_blocks, n_blocks)
            gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
            layout = torch.rand(shape, generator=gen) < 0.3
            layout[..., 0, 0] = True
        sink, local = draw(st.integers(0, 2)), draw(st.integers(0, 3))
        if layout is None and sink == 0 and local == 0:
            local = 1
        return (
            sa.BlockSparse(block_size=bs, layout=layout, sink_blocks=sink, local_blocks=local),
            lambda b, q, kv: bf.block_sparse_mask(q, kv, h, kvh, bs, layout, None, sink, local, causal),
            h,
            kvh,
        )
    bs = draw(st.integers(1, 8))
    return sa.Dense(block_size=bs), lambda b, q, kv: bf.dense_mask(q, kv, h, causal), h, kvh


# --------------------------------------------------------------------------------------------------
# causality and agreement with brute force


@prop
@given(data=st.data(), causal=st.booleans())
def test_mask_equals_bruteforce(data, causal):
    method, brute, h, kvh = data.draw(static_method(causal))
    q_len, kv_len = data.draw(lengths())
    got = quiet(method.mask, q_len, kv_len, h, kvh, causal=causal)
    assert torch.equal(got, brute(0, q_len, kv_len))


@prop
@given(data=st.data())
def test_causal_masks_never_look_ahead(data):
    method, _, h, kvh = data.draw(static_method(True))
    q_len, kv_len = data.draw(lengths())
    mask = quiet(method.mask, q_len, kv_len, h, kvh, causal=True)
    for i in range(q_len):
        p = kv_len - q_len + i
        assert not mask[:, i, p + 1 :].any(), f"query {i} (position {p}) sees a later key"
    layout = quiet(method.plan, [q_len], [kv_len], h, kvh, causal=True)
    dense = layout.to_dense_mask()[0, :, :q_len, :kv_len]
    future = torch.ones(q_len, kv_len, dtype=torch.bool).triu(kv_len - q_len + 1)
    assert not dense[:, future].any()


# --------------------------------------------------------------------------------------------------
# S2 union coverage


@prop
@given(params=s2_params(), extra=st.integers(0, 8), q_frac=st.floats(0.0, 1.0))
def test_s2_union_is_full_exactly_when_residues_cover(params, extra, q_frac):
    p, h, kvh = params
    # lengths long enough that n_blocks >= local_blocks + vert_stride
    kv_len = p["block_size"] * (p["local_blocks"] + p["vert_stride"]) + extra
    q_len = max(1, int(q_frac * kv_len))
    method = sa.S2(**p)
    covers = bf.s2_covers(kvh, p["vert_stride"], p["head_offset"], p["homo_head"], p["num_dense_heads"])
    assert method.covers_full_context(kvh) == covers
    if p["num_dense_heads"] == 0:
        uncovered = bf.s2_uncovered(kvh, p["vert_stride"], p["head_offset"], p["homo_head"])
        assert tuple(sorted(method.uncovered_residues(kvh))) == uncovered
    union = quiet(method.mask, q_len, kv_len, h, kvh).any(dim=0)
    full = bf.dense_mask(q_len, kv_len, 1, True)[0]
    assert torch.equal(union, full) == covers
    # the last query (block n_blocks - 1) sees key blocks 0 .. n_blocks - 1 - local_blocks only
    # through the shards: the residues of those it misses are the uncovered ones
    bs, n_blocks = p["block_size"], (kv_len + p["block_size"] - 1) // p["block_size"]
    missed = {kb % p["vert_stride"] for kb in range(n_blocks - p["local_blocks"]) if not union[-1, kb * bs]}
    assert tuple(sorted(missed)) == tuple(sorted(method.uncovered_residues(kvh)))


# --------------------------------------------------------------------------------------------------
# density grows with budget


def assert_superset(small, large):
    assert not (small & ~large).any(), "a larger budget dropped keys the smaller one kept"


def plan_density(method, q_len, kv_len, h, kvh, causal):
    return quiet(method.plan, [q_len], [kv_len], h, kvh, causal=causal).density()


@prop
@given(
    ls=lengths(),
    hh=heads(),
    causal=st.booleans(),
    sink=st.integers(0, 6),
    window=st.integers(1, 20),
    more_sink=st.integers(0, 6),
    more_window=st.integers(0, 20),
    bs=st.integers(1, 8),
)
def test_sink_local_budget_monotone(ls, hh, causal, sink, window, more_sink, more_window, bs):
    (q_len, kv_len), (h, kvh) = ls, hh
    small = sa.SinkLocal(sink_tokens=sink, window_tokens=window, block_size=bs)
    large = sa.SinkLocal(sink_tokens=sink + more_sink, window_tokens=window + more_window, block_size=bs)
    assert_superset(
        small.mask(q_len, kv_len, h, kvh, causal=causal), large.mask(q_len, kv_len, h, kvh, causal=causal)
    )
    assert (
        plan_density(small, q_len, kv_len, h, kvh, causal)
        <= plan_density(large, q_len, kv_len, h, kvh, causal) + 1e-9
    )


@prop
@given(params=s2_params(), ls=lengths(), more=st.integers(1, 4), causal=st.booleans())
def test_s2_local_blocks_monotone(params, ls, more, causal):
    p, h, kvh = params
    q_len, kv_len = ls
    small = sa.S2(**p)
    large = sa.S2(**{**p, "local_blocks": p["local_blocks"] + more})
    assert_superset(
        quiet(small.mask, q_len, kv_len, h, kvh, causal=causal),
        quiet(large.mask, q_len, kv_len, h, kvh, causal=causal),
    )
    assert (
        plan_density(small, q_len, kv_len, h, kvh, causal)
        <= plan_density(large, q_len, kv_len, h, kvh, causal) + 1e-9
    )


@prop
@given(data=st.data(), ls=lengths(), causal=st.booleans())
def test_moa_alpha_beta_monotone(data, ls, causal):
    q_len, kv_len = ls
    h = data.draw(st.integers(1, 4))
    p = data.draw(moa_params(h))
    more_alpha = [data.draw(st.integers(0, 30)) * 1.0 for _ in range(h)]
    more_beta = [data.draw(st.integers(0, 8)) / 16 for _ in range(h)]
    rest = dict(sink_tokens=p["sink_tokens"], min_span=p["min_span"], block_size=p["block_size"])
    small = sa.MoA(alphas=[p["alphas"]], betas=[p["betas"]], **rest)
    large = sa.MoA(
        alphas=[[a + d for a, d in zip(p["alphas"], more_alpha)]],
        betas=[[b + d for b, d in zip(p["betas"], more_beta)]],
        **rest,
    )
    assert_superset(small.mask(q_len, kv_len, h, causal=causal), large.mask(q_len, kv_len, h, causal=causal))
    assert (
        plan_density(small, q_len, kv_len, h, h, causal)
        <= plan_density(large, q_len, kv_len, h, h, causal) + 1e-9
    )


@prop
@given(
    ls=lengths(),
    hh=heads(),
    causal=st.booleans(),
    bs=st.integers(1, 8),
    sink=st.integers(0, 3),
    local=st.integers(0, 3),
    more_sink=st.integers(0, 3),
    more_local=st.integers(1, 3),
)
def test_block_sparse_sink_local_monotone(ls, hh, causal, bs, sink, local, more_sink, more_local):
    (q_len, kv_len), (h, kvh) = ls, hh
    local = max(local, 1 if sink == 0 else 0)
    small = sa.BlockSparse(block_size=bs, sink_blocks=sink, local_blocks=local)
    large = sa.BlockSparse(block_size=bs, sink_blocks=sink + more_sink, local_blocks=local + more_local)
    assert_superset(
        small.mask(q_len, kv_len, h, kvh, causal=causal), large.mask(q_len, kv_len, h, kvh, causal=causal)
    )


# --------------------------------------------------------------------------------------------------
# budget >= length is exactly dense


@prop
@given(
    ls=lengths(),
    hh=heads(),
    causal=st.booleans(),
    sink=st.integers(0, 6),
    over=st.integers(0, 10),
    bs=st.integers(1, 8),
)
def test_sink_local_full_window_is_dense(ls, hh, causal, sink, over, bs):
    (q_len, kv_len), (h, kvh) = ls, hh
    method = sa.SinkLocal(sink_tokens=sink, window_tokens=kv_len + over, block_size=bs)
    assert torch.equal(
        method.mask(q_len, kv_len, h, kvh, causal=causal), bf.dense_mask(q_len, kv_len, h, causal)
    )


@prop
@given(params=s2_params(), ls=lengths(), over=st.integers(0, 3), causal=st.booleans())
def test_s2_full_local_is_dense(params, ls, over, causal):
    p, h, kvh = params
    q_len, kv_len = ls
    n_blocks = (kv_len + p["block_size"] - 1) // p["block_size"]
    method = sa.S2(**{**p, "local_blocks": n_blocks + over})
    assert torch.equal(
        quiet(method.mask, q_len, kv_len, h, kvh, causal=causal), bf.dense_mask(q_len, kv_len, h, causal)
    )


@prop
@given(data=st.data(), ls=lengths(), causal=st.booleans())
def test_moa_alpha_at_least_length_is_dense(data, ls, causal):
    q_len, kv_len = ls
    h = data.draw(st.integers(1, 4))
    p = data.draw(moa_params(h))
    alphas = [kv_len + data.draw(st.integers(0, 10)) * 1.0 for _ in range(h)]
    method = sa.MoA(
        alphas=[alphas],
        betas=[p["betas"]],
        sink_tokens=p["sink_tokens"],
        min_span=p["min_span"],
        block_size=p["block_size"],
    )
    assert torch.equal(method.mask(q_len, kv_len, h, causal=causal), bf.dense_mask(q_len, kv_len, h, causal))


@prop
@given(ls=lengths(), hh=heads(), causal=st.booleans(), bs=st.integers(1, 8), per_head=st.booleans())
def test_block_sparse_all_ones_is_dense(ls, hh, causal, bs, per_head):
    (q_len, kv_len), (h, kvh) = ls, hh
    n_blocks = (kv_len + bs - 1) // bs
    layout = torch.ones((h, n_blocks, n_blocks) if per_head else (n_blocks, n_blocks), dtype=torch.bool)
    method = sa.BlockSparse(block_size=bs, layout=layout)
    want = bf.dense_mask(q_len, kv_len, h, causal)
    assert torch.equal(method.mask(q_len, kv_len, h, kvh, causal=causal), want)
    dense = sa.Dense(block_size=bs)
    assert torch.equal(dense.mask(q_len, kv_len, h, kvh, causal=causal), want)
    layout = method.plan([q_len], [kv_len], h, kvh, causal=causal)
    assert layout.density() == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------------
# BlockLayout round trip


@prop
@given(data=st.data(), causal=st.booleans(), batch=st.integers(1, 3))
def test_plan_round_trips_to_mask(data, causal, batch):
    method, brute, h, kvh = data.draw(static_method(causal))
    rows = [data.draw(lengths()) for _ in range(batch)]
    q_lens, kv_lens = [r[0] for r in rows], [r[1] for r in rows]
    layout = quiet(method.plan, q_lens, kv_lens, h, kvh, causal=causal)
    layout.validate()
    dense = bf.expand_heads(layout.to_dense_mask(), h, kvh)
    attended = allowed = 0
    expected_rows = []
    for b in range(batch):
        q_len, kv_len = q_lens[b], kv_lens[b]
        mask = quiet(method.mask, q_len, kv_len, h, kvh, causal=causal)
        assert torch.equal(dense[b, :, :q_len, :kv_len], mask), f"row {b}"
        assert not dense[b, :, q_len:].any() and not dense[b, :, :, kv_len:].any(), (
            f"row {b}: padding attends"
        )
        expected_rows.append(brute(b, q_len, kv_len))
        attended += int(expected_rows[-1].sum())
        allowed += h * bf.allowed_count(q_len, kv_len, causal)
    bf.check_layout_blocks(layout, expected_rows, h, kvh)
    assert layout.density() == pytest.approx(attended / allowed, rel=1e-6, abs=1e-9)

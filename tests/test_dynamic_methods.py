"""TopK and Quest through the functional API: dense limit, selections against brute force, the
block oracle, Quest's bound, the always-kept keys, configs and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparse_attn as sa
from sparse_attn.errors import ConfigError, ShapeError
from sparse_attn.methods.quest import block_bounds, block_min_max
from sparse_attn.planning import plan_heads
from tests import bruteforce_dynamic as bfd
from tests.oracle import causal_batch_mask, dense_attention, make_qkv, max_err, selection_mask_and_bias

FP32 = dict(atol=3e-5, rtol=1e-5)

# (B, Hq, Hkv, Sq, Skv, D, kv_lens or None, causal)
DENSE_CASES = [
    pytest.param(1, 4, 4, 1, 1, 64, None, True, id="B1-T1-HQ4-H4-D64"),
    pytest.param(2, 6, 2, 63, 63, 96, (63, 40), True, id="B2-T63-HQ6-H2-D96-pad"),
    pytest.param(1, 3, 1, 200, 200, 128, None, True, id="B1-T200-HQ3-H1-D128"),
    pytest.param(2, 4, 2, 70, 70, 64, None, False, id="B2-T70-HQ4-H2-D64-noncausal"),
    pytest.param(2, 4, 2, 1, 1000, 64, (1000, 517), True, id="B2-decode1000-HQ4-H2-D64-pad"),
    pytest.param(1, 6, 3, 1, 300, 96, None, False, id="B1-decode300-HQ6-H3-D96-noncausal"),
    pytest.param(2, 4, 2, 37, 180, 64, (180, 99), True, id="B2-chunk37of180-HQ4-H2-D64-pad"),
]


def _lens(B, Sq, Skv, kv_lens):
    kvl = list(kv_lens) if kv_lens is not None else [Skv] * B
    return [min(Sq, x) for x in kvl], kvl


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,D,kv_lens,causal", DENSE_CASES)
@pytest.mark.parametrize(
    "method",
    [
        sa.TopK(density=1.0, block_size=32),
        sa.Quest(density=1.0),
        sa.Quest(tokens=5000, prefill=sa.SinkLocal(sink_tokens=0, window_tokens=10_000, block_size=32)),
    ],
    ids=["topk", "quest", "quest-static-prefill"],
)
def test_budget_covering_the_row_is_dense(B, Hq, Hkv, Sq, Skv, D, kv_lens, causal, method) -> None:
    assert_equals_dense(method, B, Hq, Hkv, Sq, Skv, D, kv_lens, causal)


def assert_equals_dense(method, B, Hq, Hkv, Sq, Skv, D, kv_lens, causal) -> None:
    """The method's output and LSE equal float64 dense attention with the explicit mask."""
    q_lens, kvl = _lens(B, Sq, Skv, kv_lens)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Skv, D, kv_lens=kv_lens, q_lens=q_lens)
    out, lse = sa.sparse_attention(
        q, k, v, method, causal=causal, return_lse=True, q_lens=q_lens, kv_lens=kvl
    )
    mask = causal_batch_mask(q_lens, kvl, Sq, Skv, Hq, causal=causal)
    ref, ref_lse = dense_attention(q, k, v, mask)
    valid = mask.any(-1)
    assert max_err(out, ref, valid[..., None].expand_as(ref)) < FP32["atol"]
    assert max_err(lse, ref_lse, valid) < 1e-4


DECODE_CASES = [
    pytest.param(1, 4, 2, 257, 64, (257,), id="B1-T257-HQ4-H2-D64"),
    pytest.param(2, 6, 2, 300, 96, (300, 171), id="B2-T300-HQ6-H2-D96-pad"),
    pytest.param(2, 3, 3, 129, 128, (129, 64), id="B2-T129-MHA-D128-pad"),
    pytest.param(1, 8, 1, 63, 64, (63,), id="B1-T63-HQ8-H1-D64"),
    pytest.param(2, 6, 3, 200, 64, (200, 200), id="B2-T200-HQ6-H3-D64-full"),
]
BUDGETS = [dict(density=0.1), dict(tokens=40), dict(density=0.02)]


@pytest.mark.parametrize("B,Hq,Hkv,Skv,D,kv_lens", DECODE_CASES)
@pytest.mark.parametrize("budget", BUDGETS, ids=["d0.1", "t40", "d0.02"])
def test_topk_decode_selection_is_brute_force_topk(B, Hq, Hkv, Skv, D, kv_lens, budget) -> None:
    method = sa.TopK(sink_tokens=3, local_tokens=5, **budget)
    q, k, v = make_qkv(B, Hq, Hkv, 1, Skv, D, kv_lens=kv_lens, seed=3)
    sel = sa.select(method, q, k, kv_lens=list(kv_lens))
    expected = bfd.topk_decode(q, k, [1] * B, kv_lens, D**-0.5, True, method.density, method.tokens, 3, 5)
    _assert_selection(sel, expected)
    _assert_output_is_reference_over_selection(q, k, v, method, sel, kv_lens)


@pytest.mark.parametrize("distinct", [3, 40])
def test_topk_decode_ties_at_the_cut_go_to_the_earlier_key(distinct) -> None:
    """Keys repeated from a few distinct ones tie exactly: the full-row fast path must defer to the
    tie rule, and the selection stays the brute-force one."""
    g = torch.Generator().manual_seed(distinct)
    pool = torch.randn(2, 2, distinct, 64, generator=g)
    k = pool[:, :, torch.randint(0, distinct, (301,), generator=g)]
    q = torch.randn(2, 4, 1, 64, generator=g)
    v = torch.randn_like(k)
    method = sa.TopK(sink_tokens=3, local_tokens=5, density=0.1)
    sel = sa.select(method, q, k, kv_lens=[301, 301])
    expected = bfd.topk_decode(q, k, [1, 1], (301, 301), 64**-0.5, True, 0.1, None, 3, 5)
    _assert_selection(sel, expected)
    _assert_output_is_reference_over_selection(q, k, v, method, sel, (301, 301))


@pytest.mark.parametrize("B,Hq,Hkv,Skv,D,kv_lens", DECODE_CASES)
@pytest.mark.parametrize("budget", BUDGETS, ids=["d0.1", "t40", "d0.02"])
@pytest.mark.parametrize("block", [16, 8])
def test_quest_decode_selection_is_brute_force(B, Hq, Hkv, Skv, D, kv_lens, budget, block) -> None:
    method = sa.Quest(sink_tokens=2, local_tokens=6, block_size=block, **budget)
    q, k, v = make_qkv(B, Hq, Hkv, 1, Skv, D, kv_lens=kv_lens, seed=4)
    sel = sa.select(method, q, k, kv_lens=list(kv_lens))
    expected = bfd.quest_decode(q, k, [1] * B, kv_lens, D**-0.5, method.density, method.tokens, 2, 6, block)
    _assert_selection(sel, expected)
    _assert_output_is_reference_over_selection(q, k, v, method, sel, kv_lens)


@pytest.mark.parametrize("kv_lens", [(400,), (400, 263)], ids=["B1", "B2-pad"])
def test_quest_ranks_blocks_whose_mass_underflows_in_the_log_domain(kv_lens) -> None:
    """Peaked queries: most blocks' float32 attention mass underflows to 0, fewer blocks keep some
    mass than the budget takes; the selection is still the float64 log-domain one."""
    from sparse_attn.methods.quest import _group_mass

    block, B = 8, len(kv_lens)
    q, k, _ = make_qkv(B, 4, 2, 1, 400, 64, kv_lens=kv_lens, seed=6)
    q = q * 400.0
    method = sa.Quest(tokens=120, sink_tokens=3, local_tokens=5, block_size=block)
    side = block_min_max(k, block, torch.tensor(kv_lens)[:, None])
    mass = _group_mass(block_bounds(q, side, 64**-0.5), masked=False, log_domain=False)
    assert int((mass[0] > 0).sum(-1).min()) < 120 // block  # the linear masses cannot rank the cut
    sel = sa.select(method, q, k, kv_lens=list(kv_lens))
    expected = bfd.quest_decode(q, k, [1] * B, kv_lens, 64**-0.5, None, 120, 3, 5, block)
    _assert_selection(sel, expected)


@pytest.mark.parametrize("kv_lens", [(200,), (200, 131)], ids=["B1", "B2-pad"])
def test_quest_ties_go_to_the_lower_block(kv_lens) -> None:
    # every block holds the same keys: all bounds tie, and the lowest candidate blocks win
    block, B = 8, len(kv_lens)
    q, k, _ = make_qkv(B, 4, 2, 1, 200, 64, kv_lens=kv_lens, seed=5)
    k = k[:, :, :block].repeat(1, 1, 200 // block, 1).contiguous()
    method = sa.Quest(tokens=60, sink_tokens=3, local_tokens=5, block_size=block)
    sel = sa.select(method, q, k, kv_lens=list(kv_lens))
    expected = bfd.quest_decode(q, k, [1] * B, kv_lens, 64**-0.5, None, 60, 3, 5, block)
    _assert_selection(sel, expected)
    assert set(range(3 + 5 * block)) <= expected[0][0]  # the tie rule picked blocks 0..4


@given(
    n=st.integers(1, 70),
    d=st.sampled_from([2, 8]),
    block=st.sampled_from([1, 4, 16]),
    seed=st.integers(0, 2**16),
)
def test_block_min_max_of_a_partial_last_block_is_the_masked_one(n, d, block, seed) -> None:
    # the decode step's current block, unpadded, equals the padded and masked computation
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(2, 3, n, d, generator=g)
    padded = torch.cat((keys, torch.randn(2, 3, -(-n // block) * block - n, d, generator=g) * 100), dim=2)
    assert torch.equal(block_min_max(keys, block), block_min_max(padded, block, torch.tensor([[n]])))


def _assert_selection(sel: sa.TokenSelection, expected: list[list[set[int]]]) -> None:
    for b, heads in enumerate(expected):
        for h, keys in enumerate(heads):
            n = int(sel.counts[b, h])
            got = sel.indices[b, h, :n].tolist()
            assert got == sorted(keys), (b, h, sorted(set(got) ^ keys))


def _assert_output_is_reference_over_selection(q, k, v, method, sel, kv_lens) -> None:
    out = sa.sparse_attention(q, k, v, method, kv_lens=list(kv_lens))
    mask, _ = selection_mask_and_bias(
        sel.indices, sel.counts, None, 1, k.shape[2], q.shape[1], kv_lens, causal=True
    )
    ref, _ = dense_attention(q, k, v, mask)
    assert max_err(out, ref) < FP32["atol"]


@pytest.mark.parametrize(
    "B,Hq,Hkv,Sq,Skv,D,kv_lens,causal",
    [
        pytest.param(1, 4, 2, 100, 100, 64, None, True, id="B1-T100-HQ4-H2"),
        pytest.param(2, 3, 1, 45, 130, 64, (130, 77), True, id="B2-chunk45-HQ3-H1-pad"),
        pytest.param(1, 2, 2, 50, 50, 96, None, False, id="B1-T50-noncausal-D96"),
    ],
)
def test_topk_prefill_block_oracle(B, Hq, Hkv, Sq, Skv, D, kv_lens, causal) -> None:
    block = 16
    method = sa.TopK(density=0.2, sink_tokens=4, local_tokens=8, block_size=block)
    q_lens, kvl = _lens(B, Sq, Skv, kv_lens)
    q, k, v = make_qkv(B, Hq, Hkv, Sq, Skv, D, kv_lens=kv_lens, q_lens=q_lens, seed=5)
    layout = sa.select(method, q, k, causal=causal, q_lens=q_lens, kv_lens=kvl)
    assert isinstance(layout, sa.BlockLayout) and layout.num_heads == Hkv
    layout.validate()
    mask = torch.zeros(B, Hq, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        expected = bfd.topk_prefill_blocks(
            q, k, q_lens[b], kvl[b], b, D**-0.5, causal, 0.2, None, 4, 8, block
        )
        q_start = kvl[b] - q_lens[b]
        first_tile = q_start // block
        for (h, t), blocks in expected.items():
            listed = layout.kv_indices[b, h, t, : int(layout.kv_counts[b, h, t])].tolist()
            assert listed == sorted(blocks), (b, h, t)
            for i in range(q_lens[b]):
                p = q_start + i
                if p // block - first_tile != t:
                    continue
                for kb in blocks:
                    for j in range(kb * block, min((kb + 1) * block, kvl[b])):
                        if not causal or j <= p:
                            mask[b, h * (Hq // Hkv) : (h + 1) * (Hq // Hkv), i, j] = True
    assert torch.equal(layout.to_dense_mask(Sq, Skv).repeat_interleave(Hq // Hkv, dim=1), mask)
    out = sa.sparse_attention(q, k, v, method, causal=causal, q_lens=q_lens, kv_lens=kvl)
    ref, _ = dense_attention(q, k, v, mask)
    assert max_err(out, ref, mask.any(-1)[..., None].expand_as(ref)) < FP32["atol"]


def test_prefill_oracle_tiles_long_rows_without_an_n_by_n_matrix(monkeypatch) -> None:
    from sparse_attn.methods import topk

    monkeypatch.setattr(topk, "ORACLE_CHUNK_ELEMENTS", 4096)
    q, k, _ = make_qkv(1, 2, 1, 300, 300, 64, seed=6)
    small = sa.select(sa.TopK(density=0.1, block_size=16), q, k)
    monkeypatch.undo()
    big = sa.select(sa.TopK(density=0.1, block_size=16), q, k)
    assert torch.equal(small.kv_indices, big.kv_indices) and torch.equal(small.kv_counts, big.kv_counts)


# ------------------------------------------------------------------------------------ invariants
@given(
    n=st.integers(1, 70),
    d=st.sampled_from([2, 8, 64]),
    block=st.sampled_from([1, 2, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_quest_bound_is_at_least_the_true_block_max(n, d, block, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 1, n, d, generator=g) * torch.rand(d, generator=g) * 3
    q = torch.randn(1, 2, 1, d, generator=g)
    padded = -(-n // block) * block
    keys_p = torch.cat((keys, torch.randn(1, 1, padded - n, d, generator=g) * 100), dim=2)
    side = block_min_max(keys_p.double(), block, torch.tensor([[n]]))
    bounds = block_bounds(q.double(), side, 1.0)[0, 0]  # [2, nb]
    true = q[0, :, 0].double() @ keys[0, 0].double().T  # [2, n]
    for blk in range(padded // block):
        j0, j1 = blk * block, min((blk + 1) * block, n)
        assert bool((bounds[:, blk] >= true[:, j0:j1].amax(-1) - 1e-12).all())


@given(
    kv_len=st.integers(1, 200),
    tokens=st.integers(1, 220),
    sink=st.integers(0, 10),
    local=st.integers(0, 40),
    block=st.sampled_from([4, 16]),
    which=st.sampled_from(["topk", "quest"]),
)
def test_always_kept_keys_are_selected_and_budget_holds(kv_len, tokens, sink, local, block, which) -> None:
    if which == "topk":
        method = sa.TopK(tokens=tokens, sink_tokens=sink, local_tokens=local)
    else:
        method = sa.Quest(tokens=tokens, sink_tokens=sink, local_tokens=local, block_size=block)
    q, k, _ = make_qkv(1, 4, 2, 1, kv_len, 16, seed=kv_len)
    sel = sa.select(method, q, k)
    chosen = sel.to_dense_mask(kv_len)[0]  # [Hkv, kv_len]
    j = torch.arange(kv_len)
    forced = (j < sink) | (j >= kv_len - local)
    if which == "quest":
        forced |= j // block == (kv_len - 1) // block
    assert bool(chosen[:, forced].all())
    n_forced, budget = int(forced.sum()), min(tokens, kv_len)
    counts = sel.counts[0]
    if budget >= kv_len:
        assert bool((counts == kv_len).all())
    elif which == "topk":
        assert bool((counts == max(budget, n_forced)).all())
    else:
        # whole blocks beyond the always-kept keys: as many as fit in what is left of the budget
        nb = -(-kv_len // block)
        candidates = sum(1 for blk in range(nb) if not bool(forced[blk * block : (blk + 1) * block].all()))
        want = min(max(budget - n_forced, 0) // block, candidates)
        for h in range(chosen.shape[0]):
            extra = (chosen[h] & ~forced).nonzero().flatten() // block
            blocks = set(extra.tolist())
            assert len(blocks) == want
            for blk in blocks:
                assert bool(chosen[h, blk * block : (blk + 1) * block].all())


# ------------------------------------------------------------------------------------ configs, errors
def test_json_round_trip_and_mixing_across_layers() -> None:
    cfg = sa.SparseAttentionConfig(
        default=sa.Quest(tokens=64, prefill=sa.SinkLocal(window_tokens=32)),
        layers={1: sa.TopK(density=0.1), 2: sa.S2(vert_stride=2)},
        dense_layers=(3,),
    )
    again = sa.SparseAttentionConfig.from_json(cfg.to_json())
    assert again == cfg
    assert isinstance(again.method_for(0, 0).prefill, sa.SinkLocal)
    assert sa.Quest().tokens == 1024 and sa.TopK().density == 0.05
    q, k, v = make_qkv(1, 4, 2, 1, 90, 32)
    for layer in range(4):
        out = sa.sparse_attention(q, k, v, cfg, layer_idx=layer)
        assert out.shape == q.shape and bool(torch.isfinite(out).all())


def test_a_layer_cannot_mix_a_dynamic_method_with_other_heads() -> None:
    for heads in ({0: {1: sa.S2()}}, {0: {2: None}}, {0: {0: sa.TopK(density=0.5)}}):
        cfg = sa.SparseAttentionConfig(default=sa.Quest(), heads=heads)
        with pytest.raises(ConfigError, match="mixes a dynamic method"):
            cfg.methods_for_layer(0, 4)
    cfg = sa.SparseAttentionConfig(default=sa.S2(), heads={0: {1: sa.TopK()}})
    with pytest.raises(ConfigError, match="mixes a dynamic method"):
        sa.sparse_attention(*make_qkv(1, 4, 2, 1, 20, 16), cfg)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: sa.TopK(density=0.0), "density"),
        (lambda: sa.TopK(density=1.5), "density"),
        (lambda: sa.Quest(density=-0.1), "density"),
        (lambda: sa.TopK(density=True), "density"),
        (lambda: sa.TopK(tokens=0), "tokens"),
        (lambda: sa.Quest(tokens=-3), "tokens"),
        (lambda: sa.Quest(tokens=2.5), "tokens"),
        (lambda: sa.TopK(density=0.1, tokens=10), "not both"),
        (lambda: sa.Quest(block_size=12), "block_size"),
        (lambda: sa.Quest(block_size=0), "block_size"),
        (lambda: sa.Quest(block_size=16.0), "block_size"),
        (lambda: sa.Quest(prefill=sa.TopK()), "prefill"),
        (lambda: sa.TopK(sink_tokens=-1), "sink_tokens"),
        (lambda: sa.TopK(block_size=0), "block_size"),
    ],
)
def test_bad_configs_raise_config_error(make, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_dynamic_methods_refused_where_they_cannot_run() -> None:
    q, k, v = make_qkv(1, 4, 2, 8, 40, 16)
    lens = torch.tensor([8]), torch.tensor([40])
    with pytest.raises(ConfigError, match="dynamic method"):
        plan_heads([sa.TopK()] * 4, *lens, 2, True)
    with pytest.raises(ConfigError, match="select needs a dynamic method"):
        sa.select(sa.S2(), q, k)
    with pytest.raises(sa.LayoutError, match="layout"):
        sa.block_sparse_attention(q, k, v, sa.Quest())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="side"):
        sa.sparse_attention(q, k, v, sa.S2(), side=torch.zeros(1))


def test_side_data_that_does_not_fit_the_cache_is_a_shape_error() -> None:
    from sparse_attn.side_data import compute_side_data

    q, k, v = make_qkv(1, 4, 2, 1, 40, 16)
    good = compute_side_data(sa.Quest(block_size=8), k, torch.tensor([40]))
    assert good is not None and good.shape == (1, 2, 5, 2, 16)
    out = sa.sparse_attention(q, k, v, sa.Quest(tokens=16, block_size=8), side=good)
    ref = sa.sparse_attention(q, k, v, sa.Quest(tokens=16, block_size=8))
    assert torch.equal(out, ref)
    for bad in (good[:, :, :4], good[:, :1], good[..., :8], good.transpose(0, 1).contiguous()[:1, :1]):
        with pytest.raises(ShapeError, match="side"):
            sa.sparse_attention(q, k, v, sa.Quest(tokens=16, block_size=8), side=bad)
    with pytest.raises(ShapeError, match="side"):
        sa.sparse_attention(q, k, v, sa.TopK(), side=good)


def test_measured_density_follows_the_budget() -> None:
    q, k, _ = make_qkv(2, 4, 2, 1, 2000, 64, kv_lens=(2000, 1500))
    for method in (sa.TopK(density=0.05), sa.Quest(density=0.05)):
        sel = sa.select(method, q, k, kv_lens=[2000, 1500])
        assert 0.03 <= sel.density(torch.tensor([2000, 1500])) <= 0.06, method
    budget = math.ceil(0.05 * 2000)
    assert int(sa.select(sa.TopK(density=0.05), q, k, kv_lens=[2000, 1500]).counts[0, 0]) == budget


def test_selections_are_trusted_only_for_the_lengths_they_were_built_for() -> None:
    """A selector's output skips the host checks for its own lengths, and only for those."""
    q, k, _ = make_qkv(2, 4, 2, 1, 90, 16, kv_lens=(90, 60))
    for method in (sa.TopK(tokens=20), sa.Quest(tokens=40, block_size=8)):
        sel = sa.select(method, q, k, kv_lens=[90, 60])
        assert sel.__dict__.get("_valid_for") == (90, 60)
        sel._check(torch.tensor([90, 60]))  # and it really is well formed
        with pytest.raises(sa.LayoutError, match="kv_len"):
            sel.validate(torch.tensor([90, 30]))  # other lengths: checked again

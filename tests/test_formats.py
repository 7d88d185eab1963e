"""The two sparse formats (BlockLayout, TokenSelection) and SparseAttentionConfig.

Hand-built layouts/selections whose masks are worked out in the comments, random selections checked
against a loop, malformed ones that validate() must reject, and the config's JSON round trip and
per-layer/per-head resolution.
"""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import sparse_attn as sa
from sparse_attn import ConfigError, LayoutError
from sparse_attn.methods import method_from_dict

try:
    import bruteforce as bf
except ImportError:  # tests/ imported as a package
    from tests import bruteforce as bf

BlockLayout = sa.BlockLayout
TokenSelection = sa.TokenSelection


# --------------------------------------------------------------------------------------------------
# BlockLayout: hand-built


def make_layout(
    rows, block, q_lens, kv_lens, causal=True, max_k=None, pad=0, sink_tokens=None, window_tokens=None
):
    """rows[b][h][t] = list of (kv_block, full) for query tile t (absolute block q_start // block + t).
    Entries past kv_counts are filled with `pad` (a valid index, so misuse shows in the mask)."""
    batch, heads, tiles = len(rows), len(rows[0]), max(len(t) for r in rows for t in r)
    if max_k is None:
        max_k = max(1, max(len(x) for r in rows for h in r for x in h))
    idx = torch.full((batch, heads, tiles, max_k), pad, dtype=torch.int32)
    counts = torch.zeros((batch, heads, tiles), dtype=torch.int32)
    full = torch.zeros((batch, heads, tiles, max_k), dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for t, entries in enumerate(rows[b][h]):
                counts[b, h, t] = len(entries)
                for k, (kb, is_full) in enumerate(entries):
                    idx[b, h, t, k] = kb
                    full[b, h, t, k] = is_full
    return BlockLayout(
        kv_indices=idx,
        kv_counts=counts,
        full=full,
        block_q=block,
        block_k=block,
        q_lens=torch.tensor(q_lens, dtype=torch.int32),
        kv_lens=torch.tensor(kv_lens, dtype=torch.int32),
        causal=causal,
        sink_tokens=sink_tokens,
        window_tokens=window_tokens,
    )


def element_mask(q_len, kv_len, rule):
    """[q_len, kv_len] bool from rule(p, j), p the absolute query position."""
    return torch.tensor(
        [[bool(rule(kv_len - q_len + i, j)) for j in range(kv_len)] for i in range(q_len)], dtype=torch.bool
    ).reshape(q_len, kv_len)


# Each: (id, layout factory, expected [B, H, Sq, Skv] built from a rule, expected density)
def _hand_layouts():
    cases = []
    # q = kv = 8, block 4, causal: tile 0 -> [0 partial]; tile 1 -> [0 full, 1 partial] == dense causal
    cases.append(
        (
            "dense-causal",
            make_layout([[[[(0, False)], [(0, True), (1, False)]]]], 4, [8], [8]),
            [[element_mask(8, 8, lambda p, j: j <= p)]],
            1.0,
        )
    )
    # tile 1 -> [1] only: the block-diagonal local pattern; 10 + 10 of 36 causal pairs
    cases.append(
        (
            "block-diagonal",
            make_layout([[[[(0, False)], [(1, False)]]]], 4, [8], [8], pad=0),
            [[element_mask(8, 8, lambda p, j: j <= p and j // 4 == p // 4)]],
            20 / 36,
        )
    )
    # Sq < Skv: q 3, kv 8, q_start 5 -> tile 0 is absolute block 1; keys 4..p; 2+3+4 of 6+7+8 pairs
    cases.append(
        (
            "bottom-right",
            make_layout([[[[(1, False)]]]], 4, [3], [8]),
            [[element_mask(3, 8, lambda p, j: 4 <= j <= p)]],
            9 / 21,
        )
    )
    # non-causal, blocks swapped: rows 0-3 see keys 4-7 and rows 4-7 keys 0-3
    cases.append(
        (
            "non-causal-swap",
            make_layout([[[[(1, True)], [(0, True)]]]], 4, [8], [8], causal=False),
            [[element_mask(8, 8, lambda p, j: (p < 4) != (j < 4))]],
            32 / 64,
        )
    )
    # two heads, batch of two rows with different lengths (row 1: q 3 of kv 6 at positions 3, 4, 5:
    # tile 0 is absolute block 0 (position 3), tile 1 absolute block 1 (positions 4, 5))
    rows = [
        [[[(0, False)], [(0, True), (1, False)]], [[(0, False)], [(1, False)]]],
        [[[(0, False)], [(0, True), (1, False)]], [[], [(1, False)]]],
    ]
    cases.append(
        (
            "batch-two-heads",
            make_layout(rows, 4, [8, 3], [8, 6]),
            [
                [
                    element_mask(8, 8, lambda p, j: j <= p),
                    element_mask(8, 8, lambda p, j: j <= p and j // 4 == p // 4),
                ],
                [element_mask(3, 6, lambda p, j: j <= p), element_mask(3, 6, lambda p, j: 4 <= j <= p)],
            ],
            # attended: 36 + 20 + (4+5+6) + (1+2) ; allowed: 2 * (36 + 15)
            (36 + 20 + 15 + 3) / (2 * (36 + 15)),
        )
    )
    # element constraints in partial blocks: sink 1, window 2 (causal: j < 1 or j > p - 2)
    cases.append(
        (
            "sink-window",
            make_layout(
                [[[[(0, False)], [(0, False), (1, False)]]]],
                4,
                [8],
                [8],
                sink_tokens=torch.tensor([[1]], dtype=torch.int32),
                window_tokens=torch.tensor([[2]], dtype=torch.int32),
            ),
            [[element_mask(8, 8, lambda p, j: j <= p and (j < 1 or j > p - 2))]],
            (1 + 2 + 3 + 3 + 3 + 3 + 3 + 3) / 36,
        )
    )
    return cases


HAND = _hand_layouts()


@pytest.mark.parametrize("layout, want, density", [pytest.param(*c[1:], id=c[0]) for c in HAND])
def test_block_layout_hand_built(layout, want, density):
    layout.validate()
    assert layout.batch_size == len(want) and layout.num_heads == len(want[0])
    got = layout.to_dense_mask()
    assert got.dtype == torch.bool
    assert tuple(got.shape[:2]) == (len(want), len(want[0]))
    for b, row in enumerate(want):
        for h, mask in enumerate(row):
            q_len, kv_len = mask.shape
            assert torch.equal(got[b, h, :q_len, :kv_len], mask), (b, h)
            assert not got[b, h, q_len:].any() and not got[b, h, :, kv_len:].any(), (b, h)
    assert layout.density() == pytest.approx(density, rel=1e-6)


def test_block_layout_to_dense_mask_explicit_size():
    layout = HAND[2][1]  # q 3, kv 8
    got = layout.to_dense_mask(q_len=3, kv_len=8)
    assert tuple(got.shape) == (1, 1, 3, 8)
    assert torch.equal(got[0, 0], element_mask(3, 8, lambda p, j: 4 <= j <= p))


def _base():
    """A valid 1 x 1 layout, q = kv = 12, block 4: tiles [0], [0, 1], [0, 1, 2]; max_k 3."""
    return make_layout(
        [[[[(0, False)], [(0, True), (1, False)], [(0, True), (1, True), (2, False)]]]], 4, [12], [12]
    )


def _with(layout, **changes):
    return dataclasses.replace(layout, **changes)


def _set(tensor, index, value):
    tensor = tensor.clone()
    tensor[index] = value
    return tensor


def _bad_layouts():
    base = _base()
    idx, counts, full = base.kv_indices, base.kv_counts, base.full
    return [
        ("index-too-large", lambda: _with(base, kv_indices=_set(idx, (0, 0, 2, 2), 3)), "kv_indices"),
        ("index-far-out", lambda: _with(base, kv_indices=_set(idx, (0, 0, 1, 1), 1000)), "kv_indices"),
        ("index-negative", lambda: _with(base, kv_indices=_set(idx, (0, 0, 1, 0), -1)), "kv_indices"),
        (
            "unsorted",
            lambda: _with(base, kv_indices=_set(_set(idx, (0, 0, 2, 0), 1), (0, 0, 2, 1), 0)),
            "kv_indices",
        ),
        ("duplicate", lambda: _with(base, kv_indices=_set(idx, (0, 0, 2, 1), 0)), "kv_indices"),
        ("count-above-max-k", lambda: _with(base, kv_counts=_set(counts, (0, 0, 1), 4)), "kv_counts"),
        ("count-negative", lambda: _with(base, kv_counts=_set(counts, (0, 0, 0), -1)), "kv_counts"),
        ("counts-shape", lambda: _with(base, kv_counts=counts[:, :, :2]), "kv_counts"),
        ("counts-heads", lambda: _with(base, kv_counts=counts.expand(1, 2, 3)), "kv_counts"),
        ("full-shape", lambda: _with(base, full=full[..., :2]), "full"),
        ("indices-rank", lambda: _with(base, kv_indices=idx[0]), "kv_indices"),
        ("q-lens-batch", lambda: _with(base, q_lens=torch.tensor([12, 12], dtype=torch.int32)), "q_lens"),
        ("kv-lens-batch", lambda: _with(base, kv_lens=torch.tensor([12, 12], dtype=torch.int32)), "kv_lens"),
        (
            "too-few-tiles",
            lambda: _with(base, kv_indices=idx[:, :, :2], kv_counts=counts[:, :, :2], full=full[:, :, :2]),
            None,
        ),
    ]


@pytest.mark.parametrize("make, arg", [pytest.param(m, a, id=i) for i, m, a in _bad_layouts()])
def test_block_layout_validate_rejects(make, arg):
    with pytest.raises(LayoutError, match=arg):
        make().validate()  # raised at construction or by validate()


def test_block_layout_validate_accepts_the_base_and_ignores_padding():
    base = _base()
    base.validate()
    # entries past kv_counts are padding: whatever they hold, they are neither checked nor attended
    padded = _with(base, kv_indices=_set(base.kv_indices, (0, 0, 0, 2), 2))
    padded.validate()
    assert torch.equal(padded.to_dense_mask(), base.to_dense_mask())
    assert torch.equal(base.to_dense_mask()[0, 0], element_mask(12, 12, lambda p, j: j <= p))


def test_layout_error_is_a_value_error():
    assert issubclass(LayoutError, ValueError)


# --------------------------------------------------------------------------------------------------
# TokenSelection


def make_selection(rows, k_max=None, pad=0, log_weights=False):
    """rows[b][h] = sorted list of selected key indices."""
    batch, heads = len(rows), len(rows[0])
    if k_max is None:
        k_max = max(1, max(len(x) for r in rows for x in r))
    idx = torch.full((batch, heads, k_max), pad, dtype=torch.int64)
    counts = torch.zeros((batch, heads), dtype=torch.int64)
    for b in range(batch):
        for h in range(heads):
            counts[b, h] = len(rows[b][h])
            for k, j in enumerate(rows[b][h]):
                idx[b, h, k] = j
    weights = -torch.rand(batch, heads, k_max).add(0.1).log() if log_weights else None
    return TokenSelection(indices=idx, counts=counts, log_weights=weights)


def test_token_selection_hand_built():
    sel = make_selection([[[0, 2, 5], [1, 3]]], pad=4)  # padding 4 must not be selected for head 1
    sel.validate(6)
    sel.validate([6])
    got = sel.to_dense_mask(6)
    want = torch.tensor([[[1, 0, 1, 0, 0, 1], [0, 1, 0, 1, 0, 0]]], dtype=torch.bool)
    assert torch.equal(got, want)
    assert sel.density(6) == pytest.approx(5 / 12)
    assert sel.density([6]) == pytest.approx(5 / 12)


def test_token_selection_batch_lengths():
    sel = make_selection([[[0, 2, 5]], [[1]]], log_weights=True)
    sel.validate([6, 3])
    assert torch.equal(sel.to_dense_mask(6)[1, 0], torch.tensor([0, 1, 0, 0, 0, 0], dtype=torch.bool))
    # selected (row, head, key) pairs over all pairs, as BlockLayout.density: (3 + 1) / (6 + 3)
    assert sel.density([6, 3]) == pytest.approx((3 + 1) / (6 + 3))
    with pytest.raises(LayoutError):
        make_selection([[[0, 2, 5]], [[1, 3]]]).validate([6, 3])  # key 3 is past row 1's kv_len


@pytest.mark.parametrize(
    "rows, kv_len, k_max",
    [
        pytest.param([[[0, 2, 6]]], 6, None, id="index-equals-kv-len"),
        pytest.param([[[0, 2, 100]]], 6, None, id="index-far-out"),
        pytest.param([[[-1, 2]]], 6, None, id="index-negative"),
        pytest.param([[[2, 0, 5]]], 6, None, id="unsorted"),
        pytest.param([[[2, 2, 5]]], 6, None, id="duplicate"),
        pytest.param([[[0, 1], [3, 1]]], 6, None, id="unsorted-second-head"),
    ],
)
def test_token_selection_validate_rejects(rows, kv_len, k_max):
    with pytest.raises(LayoutError, match="indices"):
        make_selection(rows, k_max=k_max).validate(kv_len)


def test_token_selection_validate_rejects_bad_counts_and_shapes():
    good = make_selection([[[0, 2, 5], [1, 3]]])
    good.validate(6)
    for bad in (
        dataclasses.replace(good, counts=torch.tensor([[4, 2]])),  # > k_max
        dataclasses.replace(good, counts=torch.tensor([[-1, 2]])),
        dataclasses.replace(good, counts=torch.tensor([[3, 2, 1]])),  # wrong shape
        dataclasses.replace(good, log_weights=torch.zeros(1, 2, 4)),  # wrong shape
    ):
        with pytest.raises(LayoutError):
            bad.validate(6)


@settings(deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_token_selection_random(seed):
    rng = random.Random(seed)
    batch, heads, kv_len = rng.randint(1, 3), rng.randint(1, 4), rng.randint(1, 50)
    k_max = rng.randint(1, kv_len)
    rows = [
        [sorted(rng.sample(range(kv_len), rng.randint(0, k_max))) for _ in range(heads)] for _ in range(batch)
    ]
    sel = make_selection(rows, k_max=k_max, pad=rng.randrange(kv_len), log_weights=rng.random() < 0.5)
    sel.validate(kv_len)
    got = sel.to_dense_mask(kv_len)
    assert tuple(got.shape) == (batch, heads, kv_len)
    for b in range(batch):
        for h in range(heads):
            for j in range(kv_len):
                assert bool(got[b, h, j]) == (j in rows[b][h]), (b, h, j)
    total = sum(len(x) for r in rows for x in r)
    assert sel.density(kv_len) == pytest.approx(total / (batch * heads * kv_len))


# --------------------------------------------------------------------------------------------------
# SparseAttentionConfig


def _methods():
    return {
        "s2": sa.S2(
            block_size=16, local_blocks=4, vert_stride=4, head_offset=1, homo_head=False, num_dense_heads=1
        ),
        "sink_local": sa.SinkLocal(sink_tokens=8, window_tokens=100, block_size=32),
        "moa": sa.MoA(  # 8 layers (the configs below have num_layers=8) x 2 heads
            alphas=[[4.0 + layer, 8.5] for layer in range(8)],
            betas=[[0.0, 0.25], [0.125, 0.0]] * 4,
            sink_tokens=2,
            min_span=8,
            block_size=16,
        ),
        "block_sparse": sa.BlockSparse(block_size=16, sink_blocks=1, local_blocks=3),
        "dense": sa.Dense(block_size=32),
    }


@pytest.mark.parametrize("name", list(_methods()))
def test_method_dict_round_trip(name):
    method = _methods()[name]
    d = method.to_dict()
    assert isinstance(d["method"], str)
    assert json.loads(json.dumps(d)) == d  # plain JSON types
    for back in (method_from_dict(d), method_from_dict(json.loads(json.dumps(d)))):
        assert type(back) is type(method)
        assert back.to_dict() == d
        assert torch.equal(back.for_layer(1).mask(50, 70, 2), method.for_layer(1).mask(50, 70, 2))


@pytest.mark.parametrize("name", list(_methods()))
def test_method_value_equality(name):
    """Method configs are values: equal parameters compare equal (so configs compare after a round trip)."""
    method = _methods()[name]
    assert method_from_dict(method.to_dict()) == method


def test_method_dict_round_trip_block_sparse_layout():
    layout = torch.rand(3, 5, 5, generator=torch.Generator().manual_seed(0)) < 0.4
    layout[:, 0, 0] = True
    method = sa.BlockSparse(block_size=8, layout=layout, local_blocks=1)
    back = method_from_dict(json.loads(json.dumps(method.to_dict())))
    assert torch.equal(back.mask(40, 40, 3), method.mask(40, 40, 3))
    assert torch.equal(back.mask(40, 40, 3), bf.block_sparse_mask(40, 40, 3, 3, 8, layout, None, 0, 1))


def test_unknown_method_name():
    with pytest.raises(ConfigError, match="nope"):
        method_from_dict({"method": "nope"})


def _full_config(default):
    m = _methods()
    return sa.SparseAttentionConfig(
        default=default,
        layers={0: None, 2: m["sink_local"], 5: m["moa"], 7: m["block_sparse"]},
        heads={1: {0: None, 3: m["block_sparse"]}, 2: {1: m["dense"], 2: m["s2"]}},
        dense_layers=(3, 4),
        min_seq_len=128,
        strict=True,
        num_layers=8,
    )


@pytest.mark.parametrize("default", [None] + list(_methods()))
def test_config_json_round_trip(default, tmp_path):
    cfg = _full_config(None if default is None else _methods()[default])
    text = cfg.to_json()
    assert json.loads(text)["schema_version"] == 1
    back = sa.SparseAttentionConfig.from_json(text)
    same = cfg.to_dict()
    assert back.to_dict() == same
    assert all(isinstance(k, int) for k in back.layers) and all(isinstance(k, int) for k in back.heads)
    assert all(isinstance(k, int) for per_layer in back.heads.values() for k in per_layer)
    assert (back.dense_layers, back.min_seq_len, back.strict, back.num_layers) == ((3, 4), 128, True, 8)
    for layer in range(8):
        got = [None if m is None else m.to_dict() for m in back.methods_for_layer(layer, 4)]
        want = [None if m is None else m.to_dict() for m in cfg.methods_for_layer(layer, 4)]
        assert got == want, layer
    path = tmp_path / "sparse.json"
    cfg.save(path)
    assert json.loads(path.read_text())["schema_version"] == 1
    assert sa.SparseAttentionConfig.load(path).to_dict() == same
    assert sa.SparseAttentionConfig.load(str(path)).to_dict() == same
    assert sa.SparseAttentionConfig.from_dict(same).to_dict() == same


def test_config_defaults_round_trip():
    cfg = sa.SparseAttentionConfig()
    assert sa.SparseAttentionConfig.from_json(cfg.to_json()) == cfg
    assert cfg.methods_for_layer(0, 3) == [None, None, None]


def test_methods_for_layer_resolution():
    """head override > layer override > dense_layers > default."""
    m = _methods()
    s2, sl, bs, dense = m["s2"], m["sink_local"], m["block_sparse"], m["dense"]
    cfg = sa.SparseAttentionConfig(
        default=s2,
        layers={1: sl, 2: None, 4: sl},
        heads={1: {0: dense, 2: None}, 3: {1: bs}, 5: {3: sl}},
        dense_layers=(3, 4),
        num_layers=6,
    )
    assert cfg.methods_for_layer(0, 4) == [s2, s2, s2, s2]  # default
    assert cfg.methods_for_layer(1, 4) == [dense, sl, None, sl]  # heads over the layer override
    assert cfg.methods_for_layer(2, 4) == [None, None, None, None]  # layer override to dense
    assert cfg.methods_for_layer(3, 4) == [None, bs, None, None]  # dense layer, one head overridden
    assert cfg.methods_for_layer(4, 4) == [sl, sl, sl, sl]  # layer override over dense_layers
    assert cfg.methods_for_layer(5, 4) == [s2, s2, s2, sl]  # default, one head overridden
    assert cfg.methods_for_layer(0, 2) == [s2, s2]


@pytest.mark.parametrize(
    "kwargs, arg",
    [
        pytest.param(dict(layers={-1: sa.Dense()}), "layer", id="negative-layer"),
        pytest.param(dict(heads={-2: {0: sa.Dense()}}), "layer|heads", id="negative-head-layer"),
        pytest.param(dict(dense_layers=(-1,)), "dense_layers", id="negative-dense-layer"),
        pytest.param(dict(dense_layers=(8,), num_layers=8), "dense_layers", id="dense-layer-past-num-layers"),
        pytest.param(dict(min_seq_len=-1), "min_seq_len", id="negative-min-seq-len"),
    ],
)
def test_config_errors(kwargs, arg):
    with pytest.raises(ConfigError, match=arg):
        sa.SparseAttentionConfig(**kwargs).methods_for_layer(0, 2)


def test_config_dict_errors():
    good = _full_config(_methods()["s2"]).to_dict()
    assert good["schema_version"] == 1
    with pytest.raises(ConfigError, match="schema_version"):
        sa.SparseAttentionConfig.from_dict({**good, "schema_version": 2})
    with pytest.raises(ConfigError, match="schema_version"):
        sa.SparseAttentionConfig.from_json(json.dumps({**good, "schema_version": 99}))
    with pytest.raises(ConfigError, match="nope"):
        sa.SparseAttentionConfig.from_dict({**good, "default": {"method": "nope"}})
    with pytest.raises(ConfigError, match="min_seq_len"):
        sa.SparseAttentionConfig.from_dict({**good, "min_seq_len": -5})
    bad_layer = json.loads(json.dumps(good))
    bad_layer["layers"] = {"-1": None}
    with pytest.raises(ConfigError):
        sa.SparseAttentionConfig.from_dict(bad_layer)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(indices=[[[0, 1]]], counts=torch.tensor([[2]])), "indices"),
        (dict(indices=torch.tensor([[[0, 1]]]), counts=[[2]]), "counts"),
        (dict(indices=torch.tensor([0, 1]), counts=torch.tensor([[2]])), "indices"),
        (
            dict(indices=torch.tensor([[[0, 1]]]), counts=torch.tensor([[2]]), log_weights=[[[0.0, 0.0]]]),
            "log_weights",
        ),
    ],
    ids=["indices-list", "counts-list", "indices-1d", "log_weights-list"],
)
def test_token_selection_rejects_malformed_fields_at_construction(kwargs, name):
    with pytest.raises(LayoutError, match=name):
        TokenSelection(**kwargs)


def test_validation_is_remembered_only_when_it_passes(monkeypatch):
    good = sa.SinkLocal(sink_tokens=2, window_tokens=9, block_size=4).plan(13, 13, 2)
    assert good.validate() is good
    monkeypatch.setattr(
        BlockLayout, "_check", lambda self: (_ for _ in ()).throw(AssertionError("re-checked"))
    )
    assert good.validate() is good  # the run step does not re-check a planned layout
    monkeypatch.undo()
    bad = BlockLayout(
        good.kv_indices.flip(-1).contiguous(),
        good.kv_counts,
        good.full,
        4,
        4,
        good.q_lens,
        good.kv_lens,
        True,
        good.sink_tokens,
        good.window_tokens,
    )
    for _ in range(2):  # a failure is not remembered
        with pytest.raises(LayoutError, match="increasing"):
            bad.validate()

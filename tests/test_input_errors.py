"""Bad input raises a typed error (sparse_attn.errors) whose message names the offending argument."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
import torch

import sparse_attn as sa

B, HQ, HKV, SQ, SKV, D = 2, 4, 2, 8, 16, 16


def qkv(b=B, hq=HQ, hkv=HKV, sq=SQ, skv=SKV, d=D, *, dtype=torch.float32, bv=None, hv=None, sv=None, dk=None):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, skv, dk or d, generator=g).to(dtype)
    v = torch.randn(bv or b, hv or hkv, sv or skv, d, generator=g).to(dtype)
    return q, k, v


def expect(exc, names, fn, *args, **kwargs):
    """fn(...) raises ``exc`` and its message mentions one of ``names`` as a whole word."""
    with pytest.raises(exc) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    pattern = r"(?<![A-Za-z0-9_])(" + "|".join(map(re.escape, names)) + r")(?![A-Za-z0-9_])"
    assert re.search(pattern, msg), f"{type(info.value).__name__} message {msg!r} names none of {names}"
    return info.value


def test_error_hierarchy():
    assert issubclass(sa.ShapeError, sa.SparseAttnError) and issubclass(sa.ShapeError, ValueError)
    assert issubclass(sa.DTypeError, sa.SparseAttnError) and issubclass(sa.DTypeError, TypeError)
    assert issubclass(sa.DeviceError, ValueError) and issubclass(sa.LayoutError, ValueError)
    assert issubclass(sa.ConfigError, ValueError) and issubclass(sa.PlanFileError, sa.ConfigError)
    assert issubclass(sa.DenseFallbackError, RuntimeError) and issubclass(sa.CoverageWarning, UserWarning)


# ----------------------------------------------------------------------------- q / k / v, all entry points
def _selection(b, h=1, kv_len=SKV):
    indices = torch.arange(3).expand(b, h, 3).contiguous()
    return sa.TokenSelection(
        indices=indices, counts=torch.full((b, h), 3, dtype=torch.int32), log_weights=None
    )


def _call_sparse(q, k, v):
    return sa.sparse_attention(q, k, v, sa.Dense(block_size=4))


def _call_token(q, k, v):
    return sa.token_sparse_attention(q, k, v, _selection(B))


def _call_block(q, k, v):
    layout = sa.Dense(block_size=4).plan([SQ] * B, [SKV] * B, HQ, HKV)
    return sa.block_sparse_attention(q, k, v, layout)


ENTRIES = {
    "sparse_attention": _call_sparse,
    "token_sparse_attention": _call_token,
    "block_sparse_attention": _call_block,
}


QKV_ERRORS = {
    # id: (builder -> (q, k, v), exception, names any of which the message must contain)
    "batch-q2-k3": (lambda: (qkv()[0],) + qkv(b=3)[1:], sa.ShapeError, ["q", "k"]),
    "batch-v3": (lambda: qkv(bv=3), sa.ShapeError, ["v", "k"]),
    "heads-k2-v1": (lambda: qkv(hv=1), sa.ShapeError, ["v", "k"]),
    "seq-k16-v15": (lambda: qkv(sv=15), sa.ShapeError, ["v", "k"]),
    "hq6-not-multiple-of-hkv4": (lambda: qkv(hq=6, hkv=4), sa.ShapeError, ["q", "k"]),
    "rank-q3": (lambda: (qkv()[0][0],) + qkv()[1:], sa.ShapeError, ["q"]),
    "rank-k5": (lambda: (qkv()[0], qkv()[1][None], qkv()[2]), sa.ShapeError, ["k"]),
    "rank-v3": (lambda: qkv()[:2] + (qkv()[2][0],), sa.ShapeError, ["v"]),
    "headdim-q16-k8": (lambda: qkv(dk=8), sa.ShapeError, ["q", "k"]),
    "dtype-k-fp16": (lambda: (qkv()[0], qkv()[1].half(), qkv()[2]), sa.DTypeError, ["k"]),
    "dtype-v-bf16": (lambda: qkv()[:2] + (qkv()[2].bfloat16(),), sa.DTypeError, ["v"]),
    "dtype-all-int64": (lambda: tuple(t.long() for t in qkv()), sa.DTypeError, ["q", "k", "v"]),
    "dtype-q-int32": (lambda: (qkv()[0].int(),) + qkv()[1:], sa.DTypeError, ["q"]),
    "dtype-v-bool": (lambda: qkv()[:2] + (qkv()[2] > 0,), sa.DTypeError, ["v"]),
    "nontensor-q-numpy": (lambda: (qkv()[0].numpy(),) + qkv()[1:], sa.DTypeError, ["q"]),
    "nontensor-k-list": (lambda: (qkv()[0], qkv()[1].tolist(), qkv()[2]), sa.DTypeError, ["k"]),
    "nontensor-v-none": (lambda: qkv()[:2] + (None,), sa.DTypeError, ["v"]),
    "device-q-meta": (lambda: (qkv()[0].to("meta"),) + qkv()[1:], sa.DeviceError, ["q", "k", "v"]),
    "device-v-meta": (lambda: qkv()[:2] + (qkv()[2].to("meta"),), sa.DeviceError, ["q", "k", "v"]),
}


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize("case", list(QKV_ERRORS))
def test_bad_qkv(case, entry):
    build, exc, names = QKV_ERRORS[case]
    q, k, v = build()
    expect(exc, names, ENTRIES[entry], q, k, v)


def test_numpy_inputs_are_a_typeerror():
    q, k, v = qkv()
    with pytest.raises(TypeError):
        sa.sparse_attention(np.asarray(q), np.asarray(k), np.asarray(v), sa.Dense())


# ----------------------------------------------------------------------------- lengths
def _sp(**kw):
    q, k, v = qkv()
    return sa.sparse_attention(q, k, v, sa.SinkLocal(sink_tokens=2, window_tokens=4, block_size=4), **kw)


LEN_ERRORS = {
    "kv_lens-too-long": (dict(kv_lens=[SKV, SKV + 1]), ["kv_lens"]),
    "kv_lens-negative": (dict(kv_lens=[SKV, -1]), ["kv_lens"]),
    "kv_lens-shape-B3": (dict(kv_lens=[SKV, SKV, SKV]), ["kv_lens"]),
    "kv_lens-shape-2d": (dict(kv_lens=torch.full((B, 1), SKV)), ["kv_lens"]),
    "kv_lens-float": (dict(kv_lens=torch.tensor([16.0, 12.5])), ["kv_lens"]),
    "q_lens-longer-than-Sq": (dict(q_lens=[SQ + 1, SQ], kv_lens=[SKV, SKV]), ["q_lens"]),
    "q_lens-negative": (dict(q_lens=[-1, SQ]), ["q_lens"]),
    "q_lens-shape-B1": (dict(q_lens=[SQ]), ["q_lens"]),
    "q_lens-gt-kv_lens-causal": (
        dict(q_lens=[SQ, SQ], kv_lens=[SKV, SQ - 3], causal=True),
        ["q_lens", "kv_lens"],
    ),
}


@pytest.mark.parametrize("case", list(LEN_ERRORS))
def test_bad_lengths(case):
    kw, names = LEN_ERRORS[case]
    err = expect((sa.SparseAttnError), names, _sp, **kw)
    assert isinstance(err, (ValueError, TypeError))


@pytest.mark.parametrize(
    "kv_lens", [[SKV, SKV + 1], [SKV, -2], [SKV, SKV, SKV]], ids=["too-long", "negative", "shape-B3"]
)
def test_bad_kv_lens_token_decode(kv_lens):
    q, k, v = qkv(sq=1)
    err = expect(
        sa.SparseAttnError, ["kv_lens"], sa.token_sparse_attention, q, k, v, _selection(B), kv_lens=kv_lens
    )
    assert isinstance(err, ValueError)


def test_not_a_method():
    q, k, v = qkv()
    err = expect(sa.SparseAttnError, ["method"], sa.sparse_attention, q, k, v, "s2")
    assert isinstance(err, (ValueError, TypeError))


# ----------------------------------------------------------------------------- method configs
def _moa(**kw):
    return sa.MoA(alphas=[[8.0, 8.0]], betas=[[0.0, 0.1]], **kw)


CONFIG_ERRORS = {
    "S2-block_size-0": (lambda: sa.S2(block_size=0), ["block_size"]),
    "S2-block_size-neg": (lambda: sa.S2(block_size=-64), ["block_size"]),
    "S2-block_size-float": (lambda: sa.S2(block_size=16.5), ["block_size"]),
    "S2-vert_stride-0": (lambda: sa.S2(vert_stride=0), ["vert_stride"]),
    "S2-local_blocks-neg": (lambda: sa.S2(local_blocks=-1), ["local_blocks"]),
    "S2-num_dense_heads-neg": (lambda: sa.S2(num_dense_heads=-1), ["num_dense_heads"]),
    "SinkLocal-block_size-0": (lambda: sa.SinkLocal(block_size=0), ["block_size"]),
    "SinkLocal-block_size-neg": (lambda: sa.SinkLocal(block_size=-16), ["block_size"]),
    "SinkLocal-window-neg": (lambda: sa.SinkLocal(window_tokens=-1), ["window_tokens"]),
    "SinkLocal-sink-neg": (lambda: sa.SinkLocal(sink_tokens=-4), ["sink_tokens"]),
    "MoA-block_size-0": (lambda: _moa(block_size=0), ["block_size"]),
    "MoA-block_size-neg": (lambda: _moa(block_size=-1), ["block_size"]),
    "MoA-min_span-neg": (lambda: _moa(min_span=-5), ["min_span"]),
    "MoA-sink-neg": (lambda: _moa(sink_tokens=-1), ["sink_tokens"]),
    "BlockSparse-block_size-0": (lambda: sa.BlockSparse(block_size=0, local_blocks=1), ["block_size"]),
    "BlockSparse-block_size-neg": (lambda: sa.BlockSparse(block_size=-8, local_blocks=1), ["block_size"]),
    "BlockSparse-sink_blocks-neg": (lambda: sa.BlockSparse(sink_blocks=-1, local_blocks=1), ["sink_blocks"]),
    "Dense-block_size-0": (lambda: sa.Dense(block_size=0), ["block_size"]),
    "Dense-block_size-neg": (lambda: sa.Dense(block_size=-64), ["block_size"]),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_method_config(case):
    build, names = CONFIG_ERRORS[case]

    def construct_and_use():
        method = build()
        method.mask(16, 16, 2, 2)  # validation may be lazy; using it must raise at the latest

    expect(sa.ConfigError, names, construct_and_use)


def test_block_sparse_selecting_nothing_is_config_error():
    def build():
        sa.BlockSparse(block_size=16).mask(32, 32, 2)

    with pytest.raises(sa.ConfigError):
        build()


def test_multi_layer_moa_mask_is_config_error():
    moa = sa.MoA(alphas=[[8.0, 8.0], [9.0, 9.0]], betas=[[0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(sa.ConfigError):
        moa.mask(16, 16, 2)
    moa.for_layer(1).mask(16, 16, 2)  # a single layer is fine


def test_moa_wrong_num_heads_is_config_error():
    with pytest.raises(sa.ConfigError):
        _moa().mask(16, 16, 3)


def test_block_sparse_layout_too_small():
    method = sa.BlockSparse(block_size=4, layout=torch.ones(2, 2, dtype=torch.bool))  # covers 8 tokens
    q, k, v = qkv()
    expect(sa.LayoutError, ["layout"], sa.sparse_attention, q, k, v, method)


# ----------------------------------------------------------------------------- malformed BlockLayouts
def _valid_layout(b=B, sq=SKV, skv=SKV, hq=HQ, hkv=HKV):
    # S2 with 4-token blocks over 16 tokens: per-KV-head rows with up to 4 visited blocks
    return sa.S2(block_size=4, local_blocks=2, vert_stride=2).plan([sq] * b, [skv] * b, hq, hkv)


def _row_with(layout, min_count):
    rows = (layout.kv_counts >= min_count).nonzero()
    assert len(rows) > 0, "test setup: no layout row with enough blocks"
    return tuple(rows[-1].tolist())


def _mutate_indices(how):
    layout = _valid_layout()
    idx = layout.kv_indices.clone()
    cnt = layout.kv_counts.clone()
    if how == "out-of-range":
        idx[_row_with(layout, 1) + (0,)] = 99
    elif how == "negative":
        idx[_row_with(layout, 1) + (0,)] = -1
    elif how == "unsorted":
        r = _row_with(layout, 2)
        idx[r + (0,)], idx[r + (1,)] = layout.kv_indices[r + (1,)], layout.kv_indices[r + (0,)]
    elif how == "duplicate":
        r = _row_with(layout, 2)
        idx[r + (1,)] = layout.kv_indices[r + (0,)]
    elif how == "count-over-max_k":
        cnt[_row_with(layout, 1)] = idx.shape[-1] + 1
    elif how == "count-negative":
        cnt[_row_with(layout, 1)] = -1
    return layout, dict(kv_indices=idx, kv_counts=cnt)


@pytest.mark.parametrize(
    "how", ["out-of-range", "negative", "unsorted", "duplicate", "count-over-max_k", "count-negative"]
)
def test_malformed_layout(how):
    layout, changes = _mutate_indices(how)
    q, k, v = qkv(sq=SKV)
    assert sa.block_sparse_attention(q, k, v, layout).shape == q.shape  # the unmutated layout runs

    def run():
        bad = dataclasses.replace(layout, **changes)  # may already raise if construction validates
        sa.block_sparse_attention(q, k, v, bad)

    expect(sa.LayoutError, ["layout", "kv_indices", "kv_counts"], run)

    def validate():
        dataclasses.replace(layout, **changes).validate()

    with pytest.raises(sa.LayoutError):
        validate()


LAYOUT_MISMATCH = {
    # (tensors longer than the layout's lengths are right padding, not an error; shorter ones are)
    "kv-shorter-than-planned": (lambda: qkv(sq=SKV, skv=SKV), lambda: _valid_layout(sq=SKV, skv=2 * SKV)),
    "q-shorter-than-planned": (lambda: qkv(sq=SKV // 2, skv=SKV), _valid_layout),
    "batch-3-vs-2": (lambda: qkv(b=3, sq=SKV), _valid_layout),
    "heads-6-3-vs-planned-4-2": (lambda: qkv(hq=6, hkv=3, sq=SKV), _valid_layout),
}


@pytest.mark.parametrize("case", list(LAYOUT_MISMATCH))
def test_layout_for_other_shapes(case):
    make, plan = LAYOUT_MISMATCH[case]
    q, k, v = make()
    layout = plan()
    if case.startswith("heads"):
        assert layout.num_heads not in (1, 3, 6), "test setup: layout heads must not fit 6/3"
    expect(
        (sa.ShapeError, sa.LayoutError),
        ["layout", "q", "k", "v", "kv_lens", "q_lens"],
        sa.block_sparse_attention,
        q,
        k,
        v,
        layout,
    )


# ----------------------------------------------------------------------------- malformed TokenSelections
def _sel(indices, counts):
    return sa.TokenSelection(
        indices=torch.tensor(indices, dtype=torch.int64),
        counts=torch.tensor(counts, dtype=torch.int32),
        log_weights=None,
    )


SEL_ERRORS = {
    "index-out-of-range": lambda: _sel([[[0, 3, SKV]], [[1, 2, 5]]], [[3], [3]]),
    "index-beyond-row-kv_len": lambda: _sel([[[0, 3, 5]], [[1, 2, 12]]], [[3], [3]]),  # row 1 has 10 keys
    "index-negative": lambda: _sel([[[-1, 3, 5]], [[1, 2, 5]]], [[3], [3]]),
    "unsorted": lambda: _sel([[[0, 5, 3]], [[1, 2, 5]]], [[3], [3]]),
    "duplicate": lambda: _sel([[[0, 3, 3]], [[1, 2, 5]]], [[3], [3]]),
    "count-over-k_max": lambda: _sel([[[0, 3, 5]], [[1, 2, 5]]], [[4], [3]]),
}


@pytest.mark.parametrize("case", list(SEL_ERRORS))
def test_malformed_token_selection(case):
    q, k, v = qkv(sq=1)

    def run():
        sa.token_sparse_attention(q, k, v, SEL_ERRORS[case](), kv_lens=[SKV, 10])

    expect(sa.LayoutError, ["selection", "indices", "counts", "kv_lens"], run)


@pytest.mark.parametrize("case", ["batch-3-vs-2", "heads-4-vs-hkv2-hq6"])
def test_token_selection_shape_mismatch(case):
    if case.startswith("batch"):
        q, k, v = qkv(sq=1)
        sel = _selection(3)
    else:
        q, k, v = qkv(hq=6, hkv=2, sq=1)  # selection heads must be 1, 2 or 6
        sel = _selection(B, h=4)
    expect(
        (sa.ShapeError, sa.LayoutError),
        ["selection", "indices", "counts", "q", "k"],
        sa.token_sparse_attention,
        q,
        k,
        v,
        sel,
    )

"""Config resolution inside sparse_attention: dense layers, min_seq_len fallbacks (counted, strict),
mixed methods per head in one layout, and backend selection."""

from __future__ import annotations

import logging

import pytest
import torch
from oracle import dense_attention as oracle_attention

import sparse_attn as sa
from sparse_attn import api

# S2 configs here are deliberately small; their coverage warning is tested elsewhere.
pytestmark = pytest.mark.filterwarnings("ignore::sparse_attn.CoverageWarning")


def _qkv(b=1, hq=4, hkv=2, sq=70, skv=70, d=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, hq, sq, d, generator=g, dtype=dtype)
    k = torch.randn(b, hkv, skv, d, generator=g, dtype=dtype)
    v = torch.randn(b, hkv, skv, d, generator=g, dtype=dtype)
    return q, k, v


def _dense_causal_mask(hq, sq, skv):
    i = torch.arange(sq)[:, None] + (skv - sq)
    return (torch.arange(skv)[None, :] <= i).expand(hq, sq, skv)


@pytest.fixture(autouse=True)
def _fresh_counts():
    sa.reset_fallback_counts()
    yield
    sa.reset_fallback_counts()


def test_min_seq_len_runs_dense_and_is_counted():
    q, k, v = _qkv()
    cfg = sa.SparseAttentionConfig(
        default=sa.SinkLocal(sink_tokens=2, window_tokens=8, block_size=16), min_seq_len=100
    )
    out = sa.sparse_attention(q, k, v, cfg)
    ref, _ = oracle_attention(q, k, v, _dense_causal_mask(4, 70, 70)[None])
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    assert sa.fallback_counts() == {"min_seq_len": 1}
    sa.sparse_attention(q, k, v, cfg)
    assert sa.fallback_counts() == {"min_seq_len": 2}


def test_long_enough_sequences_stay_sparse_and_uncounted():
    q, k, v = _qkv()
    method = sa.SinkLocal(sink_tokens=2, window_tokens=8, block_size=16)
    cfg = sa.SparseAttentionConfig(default=method, min_seq_len=70)
    out = sa.sparse_attention(q, k, v, cfg)
    ref, _ = oracle_attention(q, k, v, method.mask(70, 70, 4, 2)[None])
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    assert sa.fallback_counts() == {}


def test_strict_mode_turns_the_fallback_into_an_error():
    q, k, v = _qkv()
    cfg = sa.SparseAttentionConfig(default=sa.S2(block_size=16, vert_stride=2), min_seq_len=1000, strict=True)
    with pytest.raises(sa.DenseFallbackError, match="min_seq_len"):
        sa.sparse_attention(q, k, v, cfg)
    assert sa.fallback_counts() == {}


def test_dense_layers_are_configured_not_fallbacks():
    q, k, v = _qkv()
    cfg = sa.SparseAttentionConfig(
        default=sa.SinkLocal(sink_tokens=1, window_tokens=4, block_size=16), dense_layers=(1,)
    )
    dense = sa.sparse_attention(q, k, v, cfg, layer_idx=1)
    sparse = sa.sparse_attention(q, k, v, cfg, layer_idx=0)
    ref, _ = oracle_attention(q, k, v, _dense_causal_mask(4, 70, 70)[None])
    torch.testing.assert_close(dense.double(), ref, atol=2e-6, rtol=0)
    assert (sparse - dense).abs().max() > 1e-2  # the sparse layer really is sparse
    assert sa.fallback_counts() == {}


@pytest.mark.parametrize("hkv", [1, 2, 4])
def test_mixed_methods_per_head_in_one_layer(hkv):
    q, k, v = _qkv(b=2, hq=4, hkv=hkv, sq=40, skv=90)
    s2 = sa.S2(block_size=16, local_blocks=1, vert_stride=2)
    sl = sa.SinkLocal(sink_tokens=3, window_tokens=10, block_size=16)
    cfg = sa.SparseAttentionConfig(default=s2, heads={0: {1: sl, 2: None}})
    out, lse = sa.sparse_attention(q, k, v, cfg, return_lse=True, kv_lens=[90, 61])
    for b, kv_len in enumerate((90, 61)):
        q_len = min(40, kv_len)
        mask = torch.stack(
            [
                s2.mask(q_len, kv_len, 4, hkv)[0],
                sl.mask(q_len, kv_len, 4, hkv)[1],
                _dense_causal_mask(1, q_len, kv_len)[0],
                s2.mask(q_len, kv_len, 4, hkv)[3],
            ]
        )
        ref, ref_lse = oracle_attention(
            q[b : b + 1, :, :q_len], k[b : b + 1, :, :kv_len], v[b : b + 1, :, :kv_len], mask[None]
        )
        torch.testing.assert_close(out[b : b + 1, :, :q_len].double(), ref, atol=2e-6, rtol=0)
        torch.testing.assert_close(lse[b : b + 1, :, :q_len].double(), ref_lse, atol=2e-5, rtol=0)


def test_mixed_block_sizes_in_one_layer_are_rejected():
    q, k, v = _qkv()
    cfg = sa.SparseAttentionConfig(
        default=sa.S2(block_size=16, vert_stride=2),
        heads={0: {0: sa.SinkLocal(window_tokens=8, block_size=32)}},
    )
    with pytest.raises(sa.ConfigError, match="block_size"):
        sa.sparse_attention(q, k, v, cfg)


def test_backend_env_override_and_validation(monkeypatch):
    q, k, v = _qkv()
    method = sa.SinkLocal(sink_tokens=2, window_tokens=8, block_size=16)
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "torch")
    out = sa.sparse_attention(q, k, v, method)
    ref, _ = oracle_attention(q, k, v, method.mask(70, 70, 4, 2)[None])
    torch.testing.assert_close(out.double(), ref, atol=2e-6, rtol=0)
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "cuda-magic")
    with pytest.raises(sa.BackendError, match="SPARSE_ATTN_BACKEND"):
        sa.sparse_attention(q, k, v, method)
    monkeypatch.delenv("SPARSE_ATTN_BACKEND")
    with pytest.raises(sa.BackendError, match="backend"):
        sa.sparse_attention(q, k, v, method, backend="flash")


def test_backend_choice_is_logged_once(monkeypatch, caplog):
    monkeypatch.setattr(api, "_logged_choices", set())
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="sparse_attn"):
        sa.sparse_attention(q, k, v, sa.SinkLocal(window_tokens=8, block_size=16))
        sa.sparse_attention(q, k, v, sa.SinkLocal(window_tokens=8, block_size=16))
    choices = [r for r in caplog.records if "backend" in r.getMessage()]
    assert len(choices) == 1 and "torch" in choices[0].getMessage()


def test_unknown_method_type_is_a_config_error():
    q, k, v = _qkv()
    with pytest.raises(sa.ConfigError, match="method"):
        sa.sparse_attention(q, k, v, "s2")


# ----------------------------------------------------------------------------- triton dispatch
# Under TRITON_INTERPRET=1 (set by conftest) the Triton backend runs on CPU tensors: the dispatch
# must route every entry point to the kernels and give what the torch path gives.
TRITON_METHODS = {
    "S2": sa.S2(block_size=16, local_blocks=2, vert_stride=2),
    "SinkLocal": sa.SinkLocal(sink_tokens=3, window_tokens=20, block_size=16),
    "MoA": sa.MoA(
        alphas=[[8.0, 30.0, 12.0, 50.0]],
        betas=[[0.1, 0.0, 0.2, 0.05]],
        sink_tokens=2,
        min_span=4,
        block_size=16,
    ),
}


@pytest.mark.parametrize("name", list(TRITON_METHODS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_triton_backend_matches_torch(name, causal):
    q, k, v = _qkv(b=2, hq=4, hkv=2, sq=37, skv=75)
    kv_lens = [75, 50]
    kwargs = dict(causal=causal, kv_lens=kv_lens, return_lse=True, q_lens=[37, 29] if causal else None)
    ref, ref_lse = sa.sparse_attention(q, k, v, TRITON_METHODS[name], backend="torch", **kwargs)
    out, lse = sa.sparse_attention(q, k, v, TRITON_METHODS[name], backend="triton", **kwargs)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse))
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=2e-5, rtol=0)


def test_triton_backend_from_the_environment_and_plan_once(monkeypatch):
    q, k, v = _qkv(hq=4, hkv=1, sq=1, skv=90)
    layout = TRITON_METHODS["S2"].plan(1, 90, 4, 1)
    ref = sa.block_sparse_attention(q, k, v, layout, backend="torch")
    monkeypatch.setenv("SPARSE_ATTN_BACKEND", "triton")
    torch.testing.assert_close(sa.block_sparse_attention(q, k, v, layout), ref, atol=2e-5, rtol=0)


def test_triton_token_decode_matches_torch():
    q, k, v = _qkv(b=2, hq=4, hkv=2, sq=1, skv=60)
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.sort(torch.randperm(50, generator=g)[:12]).values for _ in range(4)]).view(
        2, 2, 12
    )
    sel = sa.TokenSelection(idx, torch.tensor([[12, 5], [0, 12]]), torch.randn(2, 2, 12, generator=g))
    ref, ref_lse = sa.token_sparse_attention(q, k, v, sel, kv_lens=[60, 50], return_lse=True, backend="torch")
    out, lse = sa.token_sparse_attention(q, k, v, sel, kv_lens=[60, 50], return_lse=True, backend="triton")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))  # the empty selection stays empty


def test_triton_backend_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    q, k, v = _qkv()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(sa.BackendError, match="CUDA"):
        sa.sparse_attention(q, k, v, TRITON_METHODS["S2"], backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(sa.BackendError, match="CUDA"):
        sa.sparse_attention(q, k, v, TRITON_METHODS["S2"], backend="triton")


def test_triton_backend_refuses_float64():
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.raises(sa.BackendError, match="float64"):
        sa.sparse_attention(q, k, v, TRITON_METHODS["S2"], backend="triton")


def test_auto_backend_on_cpu_is_torch_even_in_the_interpreter(monkeypatch):
    monkeypatch.setattr(api, "_logged_choices", set())
    assert api.select_backend("auto", torch.device("cpu")) == "torch"

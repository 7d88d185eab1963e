"""The paged run step of the core (sparse_attn.paged), decode selections from layouts, and where the
vLLM plugin reads its config (no vLLM needed)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse_attn import (
    S2,
    BlockSparse,
    ConfigError,
    Dense,
    LayoutError,
    ShapeError,
    SinkLocal,
    SparseAttentionConfig,
    TokenSelection,
)
from sparse_attn.integrations.vllm.settings import config_spec, sparse_config
from sparse_attn.paged import gather_rows, paged_block_sparse_attention, paged_token_sparse_attention

METHODS = st.sampled_from(
    [
        SinkLocal(sink_tokens=3, window_tokens=21, block_size=16),
        S2(block_size=16, local_blocks=2, vert_stride=4),
        BlockSparse(block_size=16, sink_blocks=1, local_blocks=1),
        Dense(block_size=16),
    ]
)


@given(
    method=METHODS,
    kv_lens=st.lists(st.integers(0, 150), min_size=1, max_size=4),
    heads=st.sampled_from([(4, 2), (2, 2), (4, 1)]),
)
def test_decode_selection_equals_the_layout_mask(method, kv_lens, heads) -> None:
    """For one-query rows the selection's keys are exactly the layout's mask row."""
    hq, hkv = heads
    q_lens = [1 if k else 0 for k in kv_lens]
    layout = method.plan(q_lens, kv_lens, hq, hkv)
    sel = layout.decode_selection()
    width = max(kv_lens)
    assert sel.validate(torch.tensor(kv_lens)) is sel
    got = sel.to_dense_mask(width)  # [B, H, kv]
    want = layout.to_dense_mask(1, width)[:, :, 0]
    assert torch.equal(got, want)


def test_decode_selection_rejects_prefill_rows() -> None:
    layout = SinkLocal(block_size=16).plan([2], [40], 2, 2)
    with pytest.raises(LayoutError, match="q_lens <= 1"):
        layout.decode_selection()


def _paged(k: torch.Tensor, page_size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, S, D] -> (cache [P, page_size, H, D] with NaN in unused slots, block_table [B, pages])."""
    b, h, s, d = k.shape
    per = -(-s // page_size)
    order = torch.randperm(b * per + 2, generator=gen)
    cache = torch.full((b * per + 2, page_size, h, d), float("nan"), dtype=k.dtype)
    table = order[: b * per].view(b, per).to(torch.int32)
    for r in range(b):
        for j in range(s):
            cache[table[r, j // page_size], j % page_size] = k[r, :, j]
    return cache, table


def _with_table(v: torch.Tensor, like: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """v [B, H, S, D] paged with an existing block table (the values beside their keys)."""
    page_size = like.shape[1]
    cache = torch.full_like(like, float("nan"))
    for r in range(v.shape[0]):
        for j in range(v.shape[2]):
            cache[table[r, j // page_size], j % page_size] = v[r, :, j]
    return cache


def test_gather_rows_zero_pads_past_each_length() -> None:
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, 50, 8, generator=gen)
    cache, table = _paged(k, 16, gen)
    lens = torch.tensor([50, 17, 33])
    rows = gather_rows(cache, table, lens)
    for r, n in enumerate(lens.tolist()):
        assert torch.equal(rows[r, :, :n], k[r, :, :n])
        assert bool((rows[r, :, n:] == 0).all())


@pytest.mark.parametrize("page_size", [16, 64])
def test_paged_block_sparse_equals_contiguous(page_size: int) -> None:
    from sparse_attn import block_sparse_attention

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 30, 64, generator=gen)
    k = torch.randn(2, 2, 90, 64, generator=gen)
    v = torch.randn(2, 2, 90, 64, generator=gen)
    kc, table = _paged(k, page_size, gen)
    vc = _with_table(v, kc, table)
    layout = S2(block_size=16, local_blocks=2, vert_stride=2).plan([30, 12], [90, 61], 4, 2)
    want = block_sparse_attention(q, k, v, layout, backend="torch")
    got = paged_block_sparse_attention(q, kc, vc, table, layout, backend="torch")
    valid = torch.arange(30)[None, :] < torch.tensor([30, 12])[:, None]
    torch.testing.assert_close(got.permute(0, 2, 1, 3)[valid], want.permute(0, 2, 1, 3)[valid])


def test_paged_token_decode_equals_contiguous() -> None:
    from sparse_attn import token_sparse_attention

    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 64, generator=gen)
    k = torch.randn(2, 2, 70, 64, generator=gen)
    v = torch.randn(2, 2, 70, 64, generator=gen)
    kc, table = _paged(k, 16, gen)
    vc = _with_table(v, kc, table)
    indices = torch.tensor([[[0, 5, 44, 69], [1, 2, 3, 0]], [[7, 8, 0, 0], [60, 61, 62, 63]]])
    sel = TokenSelection(indices, torch.tensor([[4, 3], [2, 4]]))
    want = token_sparse_attention(q, k, v, sel, backend="torch")
    got = paged_token_sparse_attention(q, kc, vc, table, sel, kv_lens=torch.tensor([70, 70]), backend="torch")
    torch.testing.assert_close(got, want)


def test_paged_full_selection_reuses_rows_only_for_its_own_table() -> None:
    """A static layout's decode selection (every slot used) run by two layers over one block table,
    then over a cache paged differently: each equals float64 attention over the selected keys."""
    from oracle import dense_attention

    gen = torch.Generator().manual_seed(4)
    lens = (70, 45)
    idx = torch.stack([torch.randperm(n, generator=gen)[:20].sort().values for n in lens for _ in range(2)])
    sel = TokenSelection(idx.view(2, 2, 20), torch.full((2, 2), 20))  # one row per KV head, all used
    mask = sel.to_dense_mask(70).repeat_interleave(3, dim=1)[:, :, None]  # [B, Hq, 1, 70]
    for _ in range(3):
        q = torch.randn(2, 6, 1, 64, generator=gen)
        k = torch.randn(2, 2, 70, 64, generator=gen)
        v = torch.randn(2, 2, 70, 64, generator=gen)
        kc, table = _paged(k, 16, gen)
        vc = _with_table(v, kc, table)
        want, _ = dense_attention(q, k, v, mask)
        for _layer in range(2):
            got = paged_token_sparse_attention(q, kc, vc, table, sel, kv_lens=torch.tensor(lens))
            torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_paged_inputs_are_checked() -> None:
    q = torch.randn(1, 4, 1, 64)
    kc = torch.randn(4, 16, 2, 64)
    table = torch.zeros(1, 2, dtype=torch.int32)
    layout = SinkLocal(block_size=16).plan([1], [40], 4, 2)
    with pytest.raises(ShapeError, match="block_table"):
        paged_block_sparse_attention(q, kc, kc, torch.zeros(2, 2, dtype=torch.int32), layout)
    with pytest.raises(ShapeError, match="beyond the block_table"):
        paged_block_sparse_attention(q, kc, kc, table, layout)
    with pytest.raises(ShapeError, match="value_cache"):
        paged_block_sparse_attention(q, kc, kc[:, :8], table, layout)
    with pytest.raises(LayoutError, match="TokenSelection"):
        paged_token_sparse_attention(q, kc, kc, table, layout, kv_lens=torch.tensor([20]))


class _VllmConfig:
    def __init__(self, additional):
        self.additional_config = additional


def test_config_from_additional_config_and_env(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("SPARSE_ATTN_CONFIG", raising=False)
    assert sparse_config(_VllmConfig({})) is None
    assert sparse_config(None) is None
    shorthand = {"method": "sink_local", "sink_tokens": 4, "window_tokens": 64}
    assert sparse_config(_VllmConfig({"sparse_attn": shorthand})).default == SinkLocal(4, 64)
    full = SparseAttentionConfig(default=S2(), dense_layers=(0,), min_seq_len=128)
    data = full.to_dict()
    del data["schema_version"]
    assert sparse_config(_VllmConfig({"sparse_attn": data})) == full
    assert sparse_config(_VllmConfig({"sparse_attn": "sink_local"})).default == SinkLocal()
    path = tmp_path / "cfg.json"
    full.save(path)
    monkeypatch.setenv("SPARSE_ATTN_CONFIG", str(path))
    assert sparse_config(_VllmConfig({})) == full
    monkeypatch.setenv("SPARSE_ATTN_CONFIG", json.dumps(shorthand))
    assert sparse_config(None).default == SinkLocal(4, 64)
    # --additional-config wins over the environment
    assert config_spec(_VllmConfig({"sparse_attn": "s2"})) == "s2"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"method": "nope"}, "unknown method"),
        ("no_such_preset", "unknown preset"),
        ({"defaults": None}, "unknown config keys"),
        (3, "must be a config object"),
    ],
)
def test_bad_configs_are_rejected(monkeypatch, spec, match) -> None:
    monkeypatch.delenv("SPARSE_ATTN_CONFIG", raising=False)
    with pytest.raises(ConfigError, match=match):
        sparse_config(_VllmConfig({"sparse_attn": spec}))


def test_bad_env_json_is_rejected(monkeypatch) -> None:
    monkeypatch.setenv("SPARSE_ATTN_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        sparse_config(None)


def test_selection_validation_is_remembered_per_lengths() -> None:
    """A decode step validates its selection once for all layers; other lengths are checked again."""
    sel = TokenSelection(torch.tensor([[[0, 5, 44]]]), torch.tensor([[3]]))
    lens = torch.tensor([70])
    assert sel.validate(lens) is sel
    assert sel.__dict__["_valid_for"] == (70,)
    assert sel.validate(torch.tensor([70])) is sel
    with pytest.raises(LayoutError, match="kv_len"):
        sel.validate(torch.tensor([40]))
    bad = TokenSelection(torch.tensor([[[5, 5]]]), torch.tensor([[2]]))
    for _ in range(2):  # a failed check is never remembered
        with pytest.raises(LayoutError, match="strictly increasing"):
            bad.validate(10)

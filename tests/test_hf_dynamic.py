"""Dynamic methods (TopK, Quest, Loki, MagicPIG) through the Hugging Face patch: dense limit, cached
decode against a
float64 reference over exactly the keys each step reports selecting, and no stale side data across
generate calls, beam search and left-padded batches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hf_models import DECODERS, build, inputs, loki_basis
from oracle import dense_attention

import sparse_attn
from sparse_attn import S2, Loki, MagicPIG, Quest, SparseAttentionConfig, TopK
from sparse_attn.artifact import ModelShape
from sparse_attn.errors import PlanFileError
from sparse_attn.integrations.hf import SparsePatch
from sparse_attn.methods.magicpig import save_centres
from sparse_attn.side_data import ContiguousSideStore

PADS = [0, 7]
GEN = dict(do_sample=False, pad_token_id=0)
SPARSE = {
    "topk": TopK(tokens=12, sink_tokens=2, local_tokens=3, block_size=8),
    "quest": Quest(tokens=16, sink_tokens=2, local_tokens=4, block_size=4),
    # 4 bits, 6 tables: a key at a random angle is sampled with u of a few percent
    "magicpig": MagicPIG(bits=4, tables=6, seed=1, sink_tokens=2, local_tokens=3),
}
NAMES = ["loki", "magicpig", "quest", "topk"]


@pytest.fixture(scope="module")
def sparse(tmp_path_factory) -> dict[str, object]:
    """SPARSE plus Loki with a basis calibrated for the tiny llama (rank 6 of its 16 dims)."""
    basis = loki_basis("llama", tmp_path_factory.mktemp("loki") / "llama")
    return {**SPARSE, "loki": Loki(tokens=12, sink_tokens=2, local_tokens=3, rank=6, basis=basis)}


@pytest.mark.parametrize("arch", [a for a in DECODERS if a.window is None][:3], ids=lambda a: a.name)
@pytest.mark.parametrize("name", NAMES)
def test_budget_covering_the_row_generates_like_the_unpatched_model(arch, name, tmp_path) -> None:
    method = {
        "loki": lambda: Loki(density=1.0, rank=4, basis=loki_basis(arch.name, tmp_path / "basis")),
        "magicpig": lambda: MagicPIG(local_tokens=10_000),
        "quest": lambda: Quest(density=1.0, block_size=4),
        "topk": lambda: TopK(density=1.0, block_size=8),
    }[name]()
    model = build(arch.name)
    ids, mask = inputs(arch, 2, 30, PADS)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
        with sparse_attn.patch(model, method):
            got = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
            stats = sparse_attn.stats(model)
    assert torch.equal(got, expected)
    assert stats["fallbacks"] == {}
    assert stats["prefill_by_design"] == (0 if isinstance(method, TopK) else 2)


@pytest.mark.parametrize("name", [*NAMES, "magicpig-centred"])
def test_cached_decode_equals_float64_attention_over_the_reported_selection(
    name, sparse, monkeypatch, tmp_path
) -> None:
    """Every decode call of every layer: the patch's output equals float64 attention over exactly the
    keys its selection names (mapped back through the left padding the test built), with the
    selection's log-weights (MagicPIG's) added to their logits. A selection has one row per KV head
    (shared by its group) or per query head (MagicPIG)."""
    model = build("llama")
    method = sparse[name.removesuffix("-centred")]
    if name.endswith("-centred"):
        method = _with_centres(method, model, tmp_path)
    original = SparsePatch._attend_dynamic
    checked = []

    def spy(self, method_, state, spans, causal, args):
        out, extra = original(self, method_, state, spans, causal, args)
        _, query, key, value, _, _, scaling, _ = args
        if query.shape[2] != 1:
            return out, extra
        sel = state.last_selection
        b, hq, _, _ = query.shape
        group = hq // sel.num_heads
        mask = torch.zeros(b, hq, 1, key.shape[2], dtype=torch.bool)
        bias = torch.zeros(b, hq, 1, key.shape[2], dtype=torch.float64)
        for row in range(b):
            for h in range(hq):
                n = int(sel.counts[row, h // group])
                cols = PADS[row] + sel.indices[row, h // group, :n]
                mask[row, h, 0, cols] = True
                if sel.log_weights is not None:
                    bias[row, h, 0, cols] = sel.log_weights[row, h // group, :n].double()
        assert int(sel.counts.min()) < key.shape[2] - max(PADS), "the selection must drop keys"
        if isinstance(method_, MagicPIG):
            assert sel.num_heads == hq and bool((bias > 0).any()), "MagicPIG samples with weights"
            assert method_.centres is None or method_.layer == args[0].layer_idx, "the layer's centre"
        ref, _ = dense_attention(query, key, value, mask, scale=scaling, bias=bias)
        torch.testing.assert_close(out.transpose(1, 2).double(), ref, atol=2e-5, rtol=1e-5)
        checked.append(state)
        return out, extra

    monkeypatch.setattr(SparsePatch, "_attend_dynamic", spy)
    ids, mask = inputs(DECODERS[0], 2, 40, PADS)
    with torch.no_grad(), sparse_attn.patch(model, method):
        model.generate(ids, attention_mask=mask, max_new_tokens=8, **GEN)
    assert len(checked) == 2 * 7  # two layers x seven cached steps


def _with_centres(method: MagicPIG, model, tmp_path, layers: int | None = None) -> MagicPIG:
    """``method`` with a centres artifact of random key means made for ``model``'s shape (with
    ``layers`` layers instead, to make one for another model), at the scale of the tiny models' key
    means (keys of std ~0.15, channel means up to ~0.08)."""
    shape = ModelShape.from_hf_config(model.config)
    if layers is not None:
        shape = dataclasses.replace(shape, num_layers=layers)
    g = torch.Generator().manual_seed(3)
    centres = torch.randn(shape.num_layers, shape.num_kv_heads, shape.head_dim, generator=g) * 0.05
    path = save_centres(tmp_path / f"centres-{shape.num_layers}", centres, shape, "test")
    return dataclasses.replace(method, centres=str(path))


def test_magicpig_centres_made_for_another_model_are_refused_naming_both(tmp_path) -> None:
    model = build("llama")
    method = _with_centres(SPARSE["magicpig"], model, tmp_path, layers=5)
    with pytest.raises(PlanFileError) as err:
        sparse_attn.patch(model, method)
    assert "5 layers" in str(err.value) and "2 layers" in str(err.value)


def _poison_stores(handle) -> int:
    poisoned = 0
    for state in handle.layers.values():
        if state.store is not None and state.store.side is not None:
            state.store.side.fill_(float("nan"))
            poisoned += 1
    return poisoned


def test_a_new_generate_never_uses_the_previous_prompts_side_data() -> None:
    model = build("llama")
    ids_a, mask_a = inputs(DECODERS[0], 2, 40, PADS, seed=1)
    ids_b, mask_b = inputs(DECODERS[0], 2, 40, PADS[::-1], seed=2)
    method = SPARSE["quest"]
    with torch.no_grad():
        with sparse_attn.patch(model, method):
            fresh = model.generate(ids_b, attention_mask=mask_b, max_new_tokens=6, **GEN)
        with sparse_attn.patch(model, method) as handle:
            model.generate(ids_a, attention_mask=mask_a, max_new_tokens=6, **GEN)
            assert _poison_stores(handle) == 2
            again = model.generate(ids_b, attention_mask=mask_b, max_new_tokens=6, **GEN)
    assert torch.equal(again, fresh)


@pytest.mark.parametrize("name", NAMES)
def test_beam_search_equals_a_store_that_always_rebuilds(name, sparse, monkeypatch) -> None:
    model = build("llama")
    ids, mask = inputs(DECODERS[0], 2, 40, PADS)
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, **GEN)
    with torch.no_grad(), sparse_attn.patch(model, sparse[name]) as handle:
        got = model.generate(ids, attention_mask=mask, **kw)
        stores = [s.store for s in handle.layers.values()]
    with monkeypatch.context() as m:
        m.setattr(ContiguousSideStore, "_can_extend", lambda self, *a: False)
        with torch.no_grad(), sparse_attn.patch(model, sparse[name]):
            expected = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(got, expected)
    if name != "topk":  # the stores followed the beams' reorders instead of rebuilding every step
        assert all(s is not None and s.reorders > 0 and s.updates > 0 for s in stores)


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_generates_like_each_row_alone(name, sparse) -> None:
    model = build("llama")
    ids, mask = inputs(DECODERS[0], 2, 40, PADS)
    with torch.no_grad(), sparse_attn.patch(model, sparse[name]):
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=6, **GEN)
        for row, pad in enumerate(PADS):
            alone = model.generate(ids[row : row + 1, pad:], max_new_tokens=6, **GEN)
            assert torch.equal(batch[row, 40:], alone[0, 40 - pad :]), row


def test_stats_report_the_last_selection_and_prefill_by_design() -> None:
    model = build("llama")
    ids, mask = inputs(DECODERS[0], 2, 40, PADS)
    quest = SPARSE["quest"]
    config = SparseAttentionConfig(default=quest, layers={1: S2(block_size=8, local_blocks=1, vert_stride=2)})
    with torch.no_grad(), sparse_attn.patch(model, config) as handle:
        model.generate(ids, attention_mask=mask, max_new_tokens=3, **GEN)
        stats = sparse_attn.stats(model)
        sel = handle.layers[0].last_selection
        kv_lens = handle.layers[0].last_kv_lens
    assert sel is not None and kv_lens is not None
    assert stats["layers"][0]["density"] == pytest.approx(sel.density(kv_lens))
    assert stats["layers"][0]["density"] < 0.6
    assert stats["layers"][0]["side_rebuilds"] == 1
    assert stats["prefill_by_design"] == 1 and stats["fallbacks"] == {}
    assert stats["layers"][1]["sparse_calls"] == 3

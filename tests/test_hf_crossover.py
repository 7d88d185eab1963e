"""The decode crossovers (``SparseAttentionConfig.dense_above``, ``dense_below``) of the Hugging Face
patch.

A decode step whose plan keeps more than ``dense_above`` of the keys, or whose rows hold fewer than
``dense_below`` keys, runs the model's own dense attention: its logits equal the unpatched model's, it is counted per layer, the layer reports density
1, and strict mode never crosses over. Once the context outgrows the crossover the method's own
selection runs again (a dynamic method's side data, skipped while dense, is rebuilt).
"""

from __future__ import annotations

import pytest
import torch
from hf_models import DECODERS, build, inputs, positions

import sparse_attn
from sparse_attn import ConfigError, Quest, SinkLocal, SparseAttentionConfig, TopK

PROMPT = 20
STEPS = 30  # the context grows from 21 to 50 keys over the steps


def _decode_logits(model, ids, mask) -> list[torch.Tensor]:
    """Logits of every cached decode step after a prompt of PROMPT tokens."""
    from transformers import DynamicCache

    pos = positions(mask)
    cache = DynamicCache()
    model(input_ids=ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], position_ids=pos[:, :PROMPT],
          past_key_values=cache, use_cache=True)
    steps = []
    for t in range(PROMPT, PROMPT + STEPS):
        out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                    position_ids=pos[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits[:, -1])
    return steps


METHODS = [
    SinkLocal(sink_tokens=2, window_tokens=14, block_size=8),
    Quest(tokens=16, sink_tokens=2, local_tokens=4, block_size=4),
    TopK(tokens=16, sink_tokens=2, local_tokens=4),
]
# (config fields, whether the step over rows of these key counts crosses over): the 16 kept keys of
# every row are more than half of the batch's keys, or every row holds fewer than 38 keys
RULES = {
    "dense_above": ({"dense_above": 0.5}, lambda rows: sum(min(16, n) for n in rows) > 0.5 * sum(rows)),
    "dense_below": ({"dense_below": 38}, lambda rows: max(rows) < 38),
}


@pytest.mark.parametrize("pads", [[0], [3, 6]], ids=["b1", "b2-left-padded"])
@pytest.mark.parametrize("rule", list(RULES))
@pytest.mark.parametrize("method", METHODS, ids=["sink_local", "quest", "topk"])
def test_steps_above_the_crossover_run_dense_and_later_ones_sparse(method, rule, pads) -> None:
    # one layer: its keys do not depend on attention, so every run decodes over the same cache and
    # each step's logits depend only on that step's attention. With every row padded the cache is
    # longer than any row: the rows' lengths decide, not the cache's.
    fields, crosses = RULES[rule]
    model = build("llama", layers=1, dtype=torch.float64)
    ids, mask = inputs(DECODERS[0], len(pads), PROMPT + STEPS, pads)
    with torch.no_grad():
        dense = _decode_logits(model, ids, mask)
        config = SparseAttentionConfig(default=method, **fields)
        with sparse_attn.patch(model, config) as handle:
            got = _decode_logits(model, ids, mask)
            stats = handle.stats()
        with sparse_attn.patch(model, SparseAttentionConfig(default=method)):
            sparse = _decode_logits(model, ids, mask)
    crossed = [t for t in range(STEPS) if crosses([PROMPT + 1 + t - p for p in pads])]
    assert crossed and len(crossed) < STEPS
    assert stats["dense_crossover"] == len(crossed)
    assert all(layer["dense_crossovers"] == len(crossed) for layer in stats["layers"].values())
    assert stats["fallbacks"] == {}
    if rule == "dense_below" and len(pads) > 1:
        assert any(PROMPT + 1 + t >= 38 for t in crossed)  # the cache was long enough, the rows were not
    for t in range(STEPS):
        expected = dense[t] if t in crossed else sparse[t]
        torch.testing.assert_close(got[t], expected, atol=1e-9, rtol=1e-9)
    # the method really differs from dense over the steps that did not cross over
    assert max(float((dense[t] - sparse[t]).abs().max()) for t in range(len(crossed), STEPS)) > 1e-6


@pytest.mark.parametrize("rule", list(RULES))
def test_every_layer_of_a_step_makes_the_same_decision_as_the_context_grows(rule) -> None:
    # the decision is made once per forward and shared by the layers: each layer counts exactly the
    # steps the rule says, and the later steps run sparse again on every layer
    fields, crosses = RULES[rule]
    model = build("llama", layers=3)
    ids, mask = inputs(DECODERS[0], 2, PROMPT + STEPS, [0, 4])
    with torch.no_grad(), sparse_attn.patch(model, SparseAttentionConfig(default=METHODS[2], **fields)) as handle:
        _decode_logits(model, ids, mask)
        stats = handle.stats()
    crossed = sum(crosses([PROMPT + 1 + t, PROMPT + 1 + t - 4]) for t in range(STEPS))
    assert 0 < crossed < STEPS
    assert stats["dense_crossover"] == 3 * crossed
    assert [layer["dense_crossovers"] for layer in stats["layers"].values()] == [crossed] * 3
    assert [layer["sparse_calls"] for layer in stats["layers"].values()] == [STEPS - crossed + 1] * 3


def test_density_reports_the_dense_step_and_strict_never_crosses_over() -> None:
    model = build("llama")
    ids, mask = inputs(DECODERS[0], 1, PROMPT + 2, [0])
    method = SinkLocal(sink_tokens=2, window_tokens=14, block_size=8)
    with torch.no_grad():
        with sparse_attn.patch(model, SparseAttentionConfig(default=method, dense_above=0.5)) as handle:
            model(input_ids=ids, attention_mask=mask)
            model(input_ids=ids[:, :PROMPT], attention_mask=mask[:, :PROMPT])
            stats = handle.stats()
        assert stats["dense_crossover"] == 0  # prefill never crosses over
        with sparse_attn.patch(model, SparseAttentionConfig(default=method, dense_above=0.5)) as handle:
            _decode_once(model, ids, mask)
            stats = handle.stats()
        assert stats["dense_crossover"] == 2
        assert all(layer["density"] == 1.0 for layer in stats["layers"].values())
        for fields in ({"dense_above": 0.5}, {"dense_below": 10_000}):
            with sparse_attn.patch(model, SparseAttentionConfig(default=method, **fields), strict=True) as h:
                _decode_once(model, ids, mask)
                stats = h.stats()
            assert stats["dense_crossover"] == 0 and stats["sparse_calls"] == 4
            assert all(layer["density"] < 1.0 for layer in stats["layers"].values())


def _decode_once(model, ids, mask) -> None:
    from transformers import DynamicCache

    cache = DynamicCache()
    model(input_ids=ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], past_key_values=cache, use_cache=True)
    model(input_ids=ids[:, PROMPT : PROMPT + 1], attention_mask=mask[:, : PROMPT + 1], past_key_values=cache,
          use_cache=True)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_dense_below_not_a_count_is_a_config_error(bad) -> None:
    with pytest.raises(ConfigError, match="dense_below"):
        SparseAttentionConfig(default=TopK(), dense_below=bad)


def test_topk_and_quest_presets_cross_over_below_their_measured_lengths() -> None:
    from sparse_attn.presets import QUEST_CROSSOVER_TOKENS, TOPK_CROSSOVER_TOKENS, resolve_config

    assert resolve_config("topk").dense_below == TOPK_CROSSOVER_TOKENS > 0
    assert resolve_config("quest").dense_below == QUEST_CROSSOVER_TOKENS > 0


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, True, "0.5"])
def test_dense_above_out_of_range_is_a_config_error(bad) -> None:
    with pytest.raises(ConfigError, match="dense_above"):
        SparseAttentionConfig(default=SinkLocal(), dense_above=bad)


def test_dense_above_round_trips_through_json() -> None:
    config = SparseAttentionConfig(default=SinkLocal(), dense_above=0.25, dense_below=4096)
    assert SparseAttentionConfig.from_json(config.to_json()) == config
    assert SparseAttentionConfig.from_json(SparseAttentionConfig(default=SinkLocal()).to_json()).dense_above is None

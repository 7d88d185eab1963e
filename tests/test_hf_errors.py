"""sparse_attn.patch: bad input, fallbacks, stats, idempotence and the context manager."""

from __future__ import annotations

import pytest
import torch
from hf_models import ARCHS, DECODERS, build, inputs, outputs

import sparse_attn
from sparse_attn import S2, ConfigError, DenseFallbackError, SinkLocal, SparseAttentionConfig

LLAMA = DECODERS[0]
MISTRAL = next(a for a in ARCHS if a.window is not None)
SL = SinkLocal(sink_tokens=2, window_tokens=11, block_size=8)


def test_unknown_preset_lists_the_presets() -> None:
    with pytest.raises(ConfigError, match=r"unknown preset 'nope'.*'dense'.*'s2'"):
        sparse_attn.patch(build("llama"), "nope")


def test_wrong_kind_of_config() -> None:
    with pytest.raises(ConfigError, match="expected a method"):
        sparse_attn.patch(build("llama"), 3.5)


def test_config_layer_count_must_match_the_model() -> None:
    model = build("llama", layers=2)
    with pytest.raises(ConfigError, match="num_layers=3, the model has 2 layers"):
        sparse_attn.patch(model, SparseAttentionConfig(default=SL, num_layers=3))
    with pytest.raises(ConfigError, match=r"names layers \[5\], but the model has 2 layers"):
        sparse_attn.patch(model, SparseAttentionConfig(default=SL, layers={5: None}))
    with pytest.raises(ConfigError, match=r"heads\[0\] names heads \[4\].*num_heads=4"):
        sparse_attn.patch(model, SparseAttentionConfig(default=SL, heads={0: {4: None}}))
    assert model.config._attn_implementation == "sdpa"  # nothing was changed


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50)).eval()
    with pytest.raises(ConfigError, match=r"'gpt2' is not a supported architecture.*llama.*allow_untested=True"):
        sparse_attn.patch(model, SL)
    with pytest.raises(ConfigError, match="must be a transformers PreTrainedModel"):
        sparse_attn.patch(torch.nn.Linear(2, 2), SL)


def test_allow_untested_runs_an_interface_model_dense_equivalently() -> None:
    import transformers as tf

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(
        tf.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, attn_implementation="sdpa")
    ).eval()
    ids = torch.randint(0, 50, (1, 33))
    with torch.no_grad():
        expected = model(ids).logits
        with sparse_attn.patch(model, "dense", allow_untested=True):
            got = model(ids).logits
            assert sparse_attn.stats(model)["sparse_calls"] == 2
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)


def test_patching_twice_is_idempotent_for_an_equal_config_and_an_error_otherwise() -> None:
    model = build("llama")
    first = sparse_attn.patch(model, SL)
    assert sparse_attn.patch(model, SparseAttentionConfig(default=SL)) is first
    with pytest.raises(ConfigError, match="already patched"):
        sparse_attn.patch(model, S2(block_size=8))
    sparse_attn.unpatch(model)
    with pytest.raises(ConfigError, match="not patched"):
        sparse_attn.unpatch(model)
    with pytest.raises(ConfigError, match="not patched"):
        sparse_attn.stats(model)


def test_context_manager_unpatches_on_exit_even_after_an_error() -> None:
    model = build("llama")
    with pytest.raises(RuntimeError, match="boom"), sparse_attn.patch(model, SL):
        assert model.config._attn_implementation == "sparse_attn"
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"


def test_setting_the_implementation_by_hand_is_refused_at_call_time() -> None:
    from sparse_attn.integrations.hf import register

    register()
    model = build("llama")
    model.set_attn_implementation("sparse_attn")
    ids, mask = inputs(LLAMA, 1, 9, [0])
    with pytest.raises(ConfigError, match="not patched"):
        outputs(model, ids, mask)


def test_preset_and_json_path(tmp_path) -> None:
    model = build("llama")
    ids, mask = inputs(LLAMA, 2, 40, [0, 5])
    path = tmp_path / "cfg.json"
    SparseAttentionConfig(default=SL).save(path)
    with torch.no_grad():
        with sparse_attn.patch(model, str(path)) as handle:
            from_file = outputs(model, ids, mask)
            assert handle.config == SparseAttentionConfig(default=SL)
        with sparse_attn.patch(model, SparseAttentionConfig(default=SL)):
            direct = outputs(model, ids, mask)
        with sparse_attn.patch(model, "sink_local") as handle:
            assert handle.config.default == SinkLocal()
    assert torch.equal(from_file, direct)


def test_min_seq_len_and_dense_layers_are_counted_and_strict_raises() -> None:
    model = build("llama")
    ids, mask = inputs(LLAMA, 2, 40, [0, 5])
    config = SparseAttentionConfig(default=SL, dense_layers=(1,), min_seq_len=64)
    with torch.no_grad():
        expected = outputs(model, ids, mask)
        with sparse_attn.patch(model, config):
            got = outputs(model, ids, mask)
            stats = sparse_attn.stats(model)
        with sparse_attn.patch(model, config, strict=True), pytest.raises(DenseFallbackError, match="min_seq_len"):
            outputs(model, ids, mask)
    assert stats["fallbacks"] == {"min_seq_len": 1}
    assert stats["dense_calls"] == 1 and stats["sparse_calls"] == 0
    assert stats["layers"][0]["density"] is None
    assert torch.equal(got, expected)  # both layers ran the model's own sdpa


def test_sink_tokens_outside_a_sliding_window_fall_back() -> None:
    model = build(MISTRAL.name)
    ids, mask = inputs(MISTRAL, 2, 40, [0, 5])  # longer than Mistral's window of 24
    real = mask.bool()
    with torch.no_grad():
        expected = outputs(model, ids, mask)
        with sparse_attn.patch(model, SL):
            got = outputs(model, ids, mask)
            assert sparse_attn.stats(model)["fallbacks"] == {"sink_outside_window": 2}
        with sparse_attn.patch(model, SL, strict=True), pytest.raises(DenseFallbackError):
            outputs(model, ids, mask)
        short_ids, short_mask = inputs(MISTRAL, 2, 20, [0, 5])  # inside the window: sinks are fine
        with sparse_attn.patch(model, SL):
            outputs(model, short_ids, short_mask)
            assert sparse_attn.stats(model)["fallbacks"] == {}
    torch.testing.assert_close(got[real], expected[real], atol=1e-6, rtol=1e-6)


def test_unsupported_attention_kwargs_fall_back_to_the_original_implementation() -> None:
    model = build("llama")
    ids, mask = inputs(LLAMA, 1, 20, [0])
    model.train()  # attention dropout > 0 in training mode
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    with sparse_attn.patch(model, SL):
        outputs(model, ids, mask)
        assert sparse_attn.stats(model)["fallbacks"] == {"dropout": 2}


def test_packed_sequences_are_not_misread() -> None:
    model = build("llama", dtype=torch.float64)
    ids, _ = inputs(LLAMA, 1, 24, [0])
    # Two sequences packed in one row: position ids restart, HF builds a block-diagonal mask.
    pos = torch.cat([torch.arange(12), torch.arange(12)])[None]
    with torch.no_grad():
        expected = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        with sparse_attn.patch(model, "dense"):
            got = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            assert sparse_attn.stats(model)["fallbacks"] == {"unsupported_mask": 2}
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)


def test_softcap_falls_back_to_an_eager_model_with_its_additive_mask() -> None:
    """An eager model gets HF's boolean mask turned back into the additive form eager expects."""
    model = build("llama", dtype=torch.float64)
    model.set_attn_implementation("eager")
    ids, mask = inputs(LLAMA, 2, 30, [0, 0])  # no padding: sdpa_mask returns None for plain causal
    real = mask.bool()
    with torch.no_grad():
        expected = outputs(model, ids, mask, softcap=5.0)
        plain = outputs(model, ids, mask)
        with sparse_attn.patch(model, SL):
            got = outputs(model, ids, mask, softcap=5.0)
            assert sparse_attn.stats(model)["fallbacks"] == {"softcap": 2}
        assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(got[real], expected[real], atol=1e-12, rtol=1e-12)
    assert torch.equal(plain, expected)  # Llama's eager attention ignores softcap; the fallback is what matters

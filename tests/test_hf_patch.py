"""sparse_attn.patch on tiny random transformers models of every supported architecture.

Dense-equivalent configs must reproduce the unpatched sdpa model; sparse configs must equal a float64
reference that applies each method's own mask per row (tests/hf_reference.py); cached decoding must
equal one full forward; unpatch must restore the model exactly.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import ARCHS, DECODERS, Arch, build, inputs, outputs, positions
from hf_reference import Spec, reference

import sparse_attn
from sparse_attn import S2, SinkLocal, SparseAttentionConfig

LENGTH = 40
PADS = (0, 7)


def sparse_configs(arch: Arch) -> dict[str, SparseAttentionConfig]:
    # Mistral's tiny window (24) is shorter than the prompt: sink tokens would fall outside it (that
    # case is a counted fallback, tested below), so its SinkLocal keeps no sinks.
    sinks = 0 if arch.window is not None else 2
    sink_local = SinkLocal(sink_tokens=sinks, window_tokens=11, block_size=8)
    s2 = S2(block_size=8, local_blocks=1, vert_stride=2)
    return {
        "sink_local": SparseAttentionConfig(default=sink_local),
        "s2": SparseAttentionConfig(default=s2),
        "mixed": SparseAttentionConfig(
            default=s2, heads={0: {0: None, 1: sink_local}}, layers={1: sink_local}
        ),
    }


SPARSE_CASES = [(a, name) for a in ARCHS for name in ("sink_local", "s2", "mixed")]


def _ids(case) -> str:
    arch, name = case
    return f"{arch.name}-{name}"


def _pos_kwargs(arch: Arch, mask: torch.Tensor) -> dict:
    return {"position_ids": positions(mask)} if arch.causal else {}


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_dense_equivalent_matches_unpatched_sdpa(arch: Arch) -> None:
    model = build(arch.name)
    ids, mask = inputs(arch, 2, LENGTH, list(PADS))
    real = mask.bool()
    with torch.no_grad():
        expected = outputs(model, ids, mask)
        with sparse_attn.patch(model, "dense"):
            got = outputs(model, ids, mask)
            stats = sparse_attn.stats(model)
    torch.testing.assert_close(got[real], expected[real], atol=2e-5, rtol=1e-5)
    assert stats["sparse_calls"] == 2 and stats["fallbacks"] == {}


@pytest.mark.parametrize("arch", DECODERS, ids=lambda a: a.name)
def test_dense_equivalent_generate_gives_identical_tokens(arch: Arch) -> None:
    model = build(arch.name)
    ids, mask = inputs(arch, 2, 16, [0, 5])  # + 6 new tokens: inside Mistral's window (no cropping)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(ids, attention_mask=mask, **kw)
        with sparse_attn.patch(model, "dense"):
            got = model.generate(ids, attention_mask=mask, **kw)
            stats = sparse_attn.stats(model)
    assert torch.equal(got, expected)
    assert stats["fallbacks"] == {}
    assert stats["sparse_calls"] == 2 * 6  # two layers, prefill + 5 cached steps


@pytest.mark.parametrize("case", SPARSE_CASES, ids=_ids)
def test_sparse_prefill_equals_float64_reference(case) -> None:
    arch, name = case
    config = sparse_configs(arch)[name]
    model = build(arch.name, dtype=torch.float64)
    ids, mask = inputs(arch, 2, LENGTH, list(PADS))
    real = mask.bool()
    kw = _pos_kwargs(arch, mask)
    with torch.no_grad():
        with reference(model, Spec(config, PADS, arch.causal, arch.window)):
            expected = outputs(model, ids, mask, **kw)
        with sparse_attn.patch(model, config):
            got = outputs(model, ids, mask, **kw)
            stats = sparse_attn.stats(model)
        dense = outputs(model, ids, mask, **kw)
    torch.testing.assert_close(got[real], expected[real], atol=1e-9, rtol=1e-9)
    assert stats["fallbacks"] == {}
    assert all(0 < layer["density"] < 1 for layer in stats["layers"].values())
    # the pattern really changes the result (the test could not pass with dense attention)
    assert (dense[real] - expected[real]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", DECODERS, ids=lambda a: a.name)
@pytest.mark.parametrize("name", ["sink_local", "s2", "mixed"])
def test_cached_decoding_equals_one_full_forward(arch: Arch, name: str) -> None:
    from transformers import DynamicCache

    config = sparse_configs(arch)[name]
    model = build(arch.name, dtype=torch.float64)
    ids, mask = inputs(arch, 2, LENGTH, [3, 0])
    pos = positions(mask)
    prompt = 17
    with torch.no_grad(), sparse_attn.patch(model, config):
        full = outputs(model, ids, mask, position_ids=pos)
        # Without the model config the cache keeps every key, also for Mistral's sliding layers (a
        # cache that drops keys is a counted fallback: test_cropped_sliding_cache_falls_back).
        cache = DynamicCache()
        steps = [model(input_ids=ids[:, :prompt], attention_mask=mask[:, :prompt], position_ids=pos[:, :prompt],
                       past_key_values=cache, use_cache=True).logits]
        for t in range(prompt, LENGTH):
            out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                        past_key_values=cache, use_cache=True)
            steps.append(out.logits)
        assert sparse_attn.stats(model)["fallbacks"] == {}
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.name)
def test_paused_and_unpatch_restore_identical_outputs(arch: Arch) -> None:
    # paused(): the model's own attention inside the block, the patch (plans, counts) kept for after
    model = build(arch.name)
    ids, mask = inputs(arch, 2, LENGTH, list(PADS))
    with torch.no_grad():
        before = outputs(model, ids, mask)
        handle = sparse_attn.patch(model, sparse_configs(arch)["s2"])
        patched = outputs(model, ids, mask)
        calls = handle.stats()["sparse_calls"]
        plans = dict(handle._plans)
        with handle.paused():
            assert model.config._attn_implementation == "sdpa"
            paused = outputs(model, ids, mask)
        assert handle.stats()["sparse_calls"] == calls  # nothing ran through the patch
        again = outputs(model, ids, mask)
        assert handle.stats()["sparse_calls"] == 2 * calls
        assert all(handle._plans[key] is layout for key, layout in plans.items())  # plans kept
        sparse_attn.unpatch(model)
        after = outputs(model, ids, mask)
        with pytest.raises(sparse_attn.ConfigError, match="active patch"):
            with handle.paused():
                pass
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(after, before) and torch.equal(paused, before)
    assert torch.equal(again, patched) and not torch.equal(patched, before)


def test_gqa_never_repeats_kv_in_the_sparse_path(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers.models.llama.modeling_llama as llama

    import sparse_attn.api as api

    seen: list[tuple[int, int]] = []
    real_kernel = api.block_sparse_attention_torch

    def spy(q, k, v, *args, **kwargs):
        seen.append((q.shape[1], k.shape[1]))
        return real_kernel(q, k, v, *args, **kwargs)

    def no_repeat(*args, **kwargs):
        raise AssertionError("repeat_kv called in the sparse path")

    monkeypatch.setattr(api, "block_sparse_attention_torch", spy)
    monkeypatch.setattr(llama, "repeat_kv", no_repeat)
    model = build("llama", num_heads=6, num_kv_heads=2)
    ids, mask = inputs(DECODERS[0], 2, LENGTH, list(PADS))
    with torch.no_grad(), sparse_attn.patch(model, S2(block_size=8, local_blocks=1, vert_stride=2)):
        outputs(model, ids, mask)
    assert seen == [(6, 2), (6, 2)]


def test_several_patched_models_in_one_process() -> None:
    arch = DECODERS[0]
    configs = [sparse_configs(arch)["sink_local"], sparse_configs(arch)["s2"]]
    models = [build("llama", dtype=torch.float64, seed=s) for s in (0, 1)]
    ids, mask = inputs(arch, 2, LENGTH, list(PADS))
    kw = _pos_kwargs(arch, mask)
    real = mask.bool()
    expected = []
    with torch.no_grad():
        for m, c in zip(models, configs):
            with reference(m, Spec(c, PADS)):
                expected.append(outputs(m, ids, mask, **kw))
        handles = [sparse_attn.patch(m, c) for m, c in zip(models, configs)]
        for _ in range(2):  # interleaved calls keep each model's own config and state
            for m, e in zip(models, expected):
                torch.testing.assert_close(outputs(m, ids, mask, **kw)[real], e[real], atol=1e-9, rtol=1e-9)
    assert [h.stats()["sparse_calls"] for h in handles] == [4, 4]
    for m in models:
        sparse_attn.unpatch(m)


def test_cropped_sliding_cache_falls_back_and_strict_raises() -> None:
    from transformers import DynamicCache

    arch = next(a for a in DECODERS if a.window is not None)
    config = sparse_configs(arch)["s2"]
    model = build(arch.name)
    ids, mask = inputs(arch, 2, LENGTH, [3, 0])
    pos = positions(mask)
    with torch.no_grad(), sparse_attn.patch(model, config):
        cache = DynamicCache(config=model.config)  # sliding layers keep only the last window - 1 keys
        model(input_ids=ids[:, :30], attention_mask=mask[:, :30], position_ids=pos[:, :30], past_key_values=cache)
        assert sparse_attn.stats(model)["fallbacks"] == {}
        model(input_ids=ids[:, 30:31], attention_mask=mask[:, :31], position_ids=pos[:, 30:31], past_key_values=cache)
        assert sparse_attn.stats(model)["fallbacks"] == {"cropped_cache": 2}
    with torch.no_grad(), sparse_attn.patch(model, config, strict=True):
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :30], attention_mask=mask[:, :30], position_ids=pos[:, :30], past_key_values=cache)
        with pytest.raises(sparse_attn.DenseFallbackError, match="cropped_cache"):
            model(input_ids=ids[:, 30:31], attention_mask=mask[:, :31], position_ids=pos[:, 30:31],
                  past_key_values=cache)

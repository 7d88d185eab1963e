"""Dynamic methods end to end through vLLM on CPU with a tiny random Llama, with chunked prefill (at
most 64 scheduled tokens per step) and greedy decoding in float32. Three configs: layer 0 runs TopK,
layer 1 Quest (side data in the paged store); layer 0 Loki (its basis calibrated for the tiny
model), layer 1 Quest; or MagicPIG in both layers (SimHash codes in the paged store, a
per-query-head sample with log-weights), layer 1 with key centres from a calibration artifact.

One engine serves five prompts at once, then each alone (later rounds hit the pages the first one
cached, when prefix caching is on), one of them sharing its first 200 tokens with another. Tokens
equal the Hugging Face model patched with the same config, whether prompts run concurrently or one by
one, with prefix caching on or off, and with tensor_parallel_size=2 (each rank selects on its own KV
head from its own side data).

TopK's prefill oracle scores tiles of ``block_size`` queries, so a chunk boundary inside a tile
changes what the tile's queries select; ``block_size=1`` (a selection per query) makes it independent
of where vLLM cuts the chunks, which is what comparing with the unchunked HF prefill needs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sparse_attn
from sparse_attn import Loki, MagicPIG, Quest, SparseAttentionConfig, TopK
from sparse_attn.artifact import ModelShape
from sparse_attn.methods.magicpig import save_centres

NEW_TOKENS = 8
CONFIG = SparseAttentionConfig(
    layers={
        0: TopK(tokens=48, sink_tokens=4, local_tokens=16, block_size=1),
        1: Quest(tokens=48, sink_tokens=4, local_tokens=16, block_size=16),
    }
)
# 4 bits x 8 tables on 64-dim keys: a key at a right angle to the query is sampled with u ~ 0.1
MAGICPIG = MagicPIG(bits=4, tables=8, seed=3, sink_tokens=4, local_tokens=16)
ROUNDS = [[0, 1, 2, 3, 4], [0], [1], [2], [3], [4]]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(2)
    out = [torch.randint(0, 512, (n,), generator=gen).tolist() for n in (5, 40, 130, 301)]
    return [*out, out[3][:200] + torch.randint(0, 512, (57,), generator=gen).tolist()]


@pytest.fixture(scope="module", params=["topk-quest", "loki-quest", "magicpig"])
def config(request, tiny_llama, tmp_path_factory) -> SparseAttentionConfig:
    if request.param == "topk-quest":
        return CONFIG
    if request.param == "loki-quest":
        from transformers import AutoModelForCausalLM

        from sparse_attn.calibration import calibrate_loki

        model = AutoModelForCausalLM.from_pretrained(
            tiny_llama, dtype=torch.float32, attn_implementation="sdpa"
        )
        ids = torch.randint(0, 512, (512,), generator=torch.Generator().manual_seed(7)).tolist()
        basis = tmp_path_factory.mktemp("loki") / "tiny_llama"
        calibrate_loki(model.eval(), [ids], seq_len=256, out=basis, command="tests/vllm: tiny_llama basis")
        loki = Loki(tokens=48, sink_tokens=4, local_tokens=16, rank=16, basis=str(basis))
        return SparseAttentionConfig(layers={0: loki, 1: CONFIG.layers[1]})
    from transformers import AutoConfig

    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(tiny_llama))
    g = torch.Generator().manual_seed(4)
    # random key means at the scale of the tiny model's (keys of std ~0.15)
    centres = torch.randn(shape.num_layers, shape.num_kv_heads, shape.head_dim, generator=g) * 0.05
    path = save_centres(tmp_path_factory.mktemp("magicpig") / "centres", centres, shape, "test")
    return SparseAttentionConfig(layers={0: MAGICPIG, 1: dataclasses.replace(MAGICPIG, centres=str(path))})


def _engine(run_engine, model, prompts, config, **spec) -> dict:
    return run_engine(
        {
            "model": str(model),
            "prompts": prompts,
            "max_tokens": NEW_TOKENS,
            "sparse_attn": config.to_dict(),
            "rounds": ROUNDS,
            **spec,
        }
    )


@pytest.fixture(scope="module")
def cached(run_engine, tiny_llama, prompts, config) -> dict:
    return _engine(run_engine, tiny_llama, prompts, config, enable_prefix_caching=True)


@pytest.fixture(scope="module")
def hf(tiny_llama, prompts, config) -> dict[str, list[list[int]]]:
    """Greedy tokens of the HF model, patched with the config and unpatched, one prompt at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    model.eval()

    def generate() -> list[list[int]]:
        out = []
        for p in prompts:
            ids = torch.tensor([p])
            # an explicit mask: generate would otherwise take token 0 in a prompt for padding
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
            out.append(gen[0, len(p) :].tolist())
        return out

    with torch.no_grad():
        dense = generate()
        with sparse_attn.patch(model, config):
            sparse = generate()
    return {"sparse": sparse, "dense": dense}


def test_tokens_equal_the_patched_hf_model(cached, hf) -> None:
    concurrent, *alone = cached["tokens"]
    assert concurrent == hf["sparse"]
    assert [t for (t,) in alone] == hf["sparse"]
    # the budget really drops keys: the long prompts decode otherwise than dense attention
    assert hf["sparse"][3:] != hf["dense"][3:]


def test_dynamic_stats(cached, config) -> None:
    stats = cached["stats"]
    dynamic = stats["dynamic"]
    assert stats["batches"]["mixed"] > 0 and stats["batches"]["chunked_prefill"] > 0
    assert dynamic["decode_selections"] > 0
    assert 0.1 < dynamic["decode_density"] < 0.9
    rows = dynamic["prefill_rows"]
    if config is CONFIG:  # TopK's prefill is its block oracle, Quest's dense by design
        assert rows["topk"] > 0 and rows["dense"] > 0
    else:  # Loki's, Quest's and MagicPIG's prefill is dense by design; MagicPIG's sample is its density
        assert set(rows) == {"dense"}
    assert dynamic["side_bytes"] > 0  # Quest's, Loki's or MagicPIG's layers: TopK reads the keys
    assert stats["fallbacks"] == {}


def test_prefix_caching_off_gives_the_same_tokens(run_engine, tiny_llama, prompts, config, cached) -> None:
    uncached = _engine(run_engine, tiny_llama, prompts, config, enable_prefix_caching=False)
    assert uncached["tokens"] == cached["tokens"]
    # with caching on, later rounds computed fewer prompt tokens: their pages (and side data) were reused
    assert cached["stats"]["batches"]["prompt_tokens"] < uncached["stats"]["batches"]["prompt_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("config", ["topk-quest"], indirect=True)
def test_tensor_parallel_2_gives_the_same_tokens(run_engine, tiny_llama, prompts, config, cached) -> None:
    """Two CPU workers, one KV head each (recipe: ENV-NOTES.md)."""
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    spec = {
        "model": str(tiny_llama),
        "prompts": prompts,
        "max_tokens": NEW_TOKENS,
        "sparse_attn": config.to_dict(),
        "rounds": ROUNDS,
        "tensor_parallel_size": 2,
    }
    assert run_engine(spec, env=env)["tokens"] == cached["tokens"]

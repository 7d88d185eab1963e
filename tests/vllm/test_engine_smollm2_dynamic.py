"""SmolLM2-135M (real weights) through vLLM on CPU with content-based layers: TopK on even layers,
Quest on odd ones, 48 keys each, on two ~400-token prompts that share most of their tokens, chunked
prefill (at most 128 scheduled tokens per step) and prefix caching (the later rounds reuse cached
pages and their side data). Tokens equal the Hugging Face model patched with the same config,
concurrently and one prompt at a time, and differ from dense attention's."""

from __future__ import annotations

import pytest
import torch

import sparse_attn
from sparse_attn import Quest, SparseAttentionConfig, TopK
from sparse_attn.bench.passkey import passkey_prompt

pytestmark = pytest.mark.slow

NEW_TOKENS = 8
LAYERS = 30
CONFIG = SparseAttentionConfig(
    default=Quest(tokens=48, block_size=16),
    # block_size=1: TopK's prefill selection then does not depend on where vLLM cuts chunks
    layers={i: TopK(tokens=48, block_size=1) for i in range(0, LAYERS, 2)},
)


@pytest.fixture(scope="module")
def setup(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32, attn_implementation="sdpa")
    first = tokenizer(passkey_prompt("71432", 15, 0.3)).input_ids
    second = first[:-60] + tokenizer(" Ignore that. What is two plus two? The answer is").input_ids
    return model.eval(), [first, second]


def _hf(model, prompts, config) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            if config is None:
                gen = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
                )
            else:
                with sparse_attn.patch(model, config):
                    gen = model.generate(
                        ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
                    )
        out.append(gen[0, len(p) :].tolist())
    return out


def test_topk_and_quest_match_the_patched_hf_model(run_engine, smollm2_dir, setup) -> None:
    model, prompts = setup
    assert model.config.num_hidden_layers == LAYERS
    assert all(350 <= len(p) <= 600 for p in prompts)
    result = run_engine(
        {
            "model": str(smollm2_dir),
            "prompts": prompts,
            "max_tokens": NEW_TOKENS,
            "sparse_attn": CONFIG.to_dict(),
            "max_model_len": 1024,
            "max_num_batched_tokens": 128,
            "rounds": [[0, 1], [0], [1]],
        }
    )
    concurrent, (first,), (second,) = result["tokens"]
    want = _hf(model, prompts, CONFIG)
    assert concurrent == want
    assert [first, second] == want
    assert want != _hf(model, prompts, None)
    stats = result["stats"]
    assert stats["batches"]["chunked_prefill"] > 0
    # the single-prompt rounds hit cached pages: fewer prompt tokens computed than three full prefills
    assert stats["batches"]["prompt_tokens"] < 2 * sum(len(p) for p in prompts)
    assert 0.0 < stats["dynamic"]["decode_density"] < 0.5

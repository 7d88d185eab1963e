"""End to end through vLLM on CPU with a tiny random Llama: a batch of prompts with different lengths,
chunked prefill on (at most 64 scheduled tokens per step, so long prompts are split and decodes of
short prompts share steps with chunks of long ones), greedy decoding in float32."""

from __future__ import annotations

import pytest
import torch

import sparse_attn
from sparse_attn import S2, SinkLocal, SparseAttentionConfig

LENGTHS = (5, 40, 130, 301)
NEW_TOKENS = 8

SPARSE = {
    "sink_local": SinkLocal(sink_tokens=4, window_tokens=32, block_size=16),
    "s2": S2(block_size=16, local_blocks=2, vert_stride=2),
}


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 512, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module")
def native(run_engine, tiny_llama, prompts) -> dict:
    return run_engine({"model": str(tiny_llama), "prompts": prompts, "max_tokens": NEW_TOKENS})


def _hf_tokens(model_dir, prompts, spec) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    out = []
    with sparse_attn.patch(model.eval(), spec), torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            # an explicit mask: generate would otherwise take token 0 in a prompt for padding
            gen = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0
            )
            out.append(gen[0, len(p) :].tolist())
    return out


def test_native_backend_is_vllms_own(native) -> None:
    assert native["stats"] is None  # the plugin's backend module was never even imported
    assert [len(t) for t in native["tokens"]] == [NEW_TOKENS] * len(LENGTHS)


def test_dense_equivalent_config_matches_vllm_backend(run_engine, tiny_llama, prompts, native) -> None:
    ours = run_engine(
        {"model": str(tiny_llama), "prompts": prompts, "max_tokens": NEW_TOKENS, "sparse_attn": "dense"}
    )
    assert ours["stats"]["calls"]["sparse"] > 0
    assert ours["stats"]["fallbacks"] == {}
    # the steps really mixed decodes with prefills, and prefill chunks ran after cached context
    assert ours["stats"]["batches"]["mixed"] > 0
    assert ours["stats"]["batches"]["chunked_prefill"] > 0
    assert ours["tokens"] == native["tokens"]


@pytest.mark.parametrize("name", sorted(SPARSE))
def test_sparse_configs_match_hf_patched_model(run_engine, tiny_llama, prompts, native, name) -> None:
    method = SPARSE[name]
    ours = run_engine(
        {
            "model": str(tiny_llama),
            "prompts": prompts,
            "max_tokens": NEW_TOKENS,
            "sparse_attn": method.to_dict(),
            "attention_backend": "CUSTOM",  # as users select it (vLLM's CPU platform maps it to CPU_ATTN)
        }
    )
    assert ours["stats"]["calls"]["sparse"] > 0
    assert ours["tokens"] == _hf_tokens(tiny_llama, prompts, method)
    # the pattern really applies: the longest prompt sees far fewer keys than dense
    assert ours["tokens"][-1] != native["tokens"][-1]


def test_env_config_and_min_seq_len_fallback(run_engine, tiny_llama, prompts) -> None:
    """SPARSE_ATTN_CONFIG supplies the config; requests shorter than min_seq_len run dense (counted)."""
    config = SparseAttentionConfig(default=SPARSE["sink_local"], min_seq_len=100)
    ours = run_engine(
        {"model": str(tiny_llama), "prompts": prompts, "max_tokens": NEW_TOKENS},
        env={"SPARSE_ATTN_CONFIG": config.to_json()},
    )
    assert ours["stats"]["fallbacks"]["min_seq_len"] > 0
    assert ours["tokens"] == _hf_tokens(tiny_llama, prompts, config)

"""SmolLM2-135M (real weights) through vLLM on CPU on a ~2.3k-token passkey prompt: SinkLocal whose
window reaches the needle answers, one that stops halfway does not, and both give the same tokens as
the Hugging Face model patched with the same config."""

from __future__ import annotations

import pytest
import torch

import sparse_attn
from sparse_attn import SinkLocal
from sparse_attn.bench.passkey import passkey_prompt

pytestmark = pytest.mark.slow

KEY = "71432"
NEW_TOKENS = 7  # digits are single tokens


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()
    prompt = passkey_prompt(KEY, 95, 0.5)
    ids = tokenizer(prompt).input_ids
    before_needle = tokenizer(prompt.split(f"The pass key is {KEY}")[0]).input_ids
    return path, model, tokenizer, ids, len(ids) - len(before_needle)


def _hf(model, ids, method) -> list[int]:
    with sparse_attn.patch(model, method), torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(ids) :].tolist()


@pytest.mark.parametrize("covers", [True, False], ids=["covering", "excluding"])
def test_passkey_through_vllm(run_engine, smollm2, covers: bool) -> None:
    path, model, tokenizer, ids, distance = smollm2
    assert 2000 <= len(ids) <= 2600
    window = distance + 64 if covers else distance // 2
    method = SinkLocal(sink_tokens=4, window_tokens=window)
    result = run_engine(
        {
            "model": str(path),
            "prompts": [ids],
            "max_tokens": NEW_TOKENS,
            "sparse_attn": method.to_dict(),
            "max_model_len": 4096,
            "max_num_batched_tokens": 512,
        }
    )
    tokens = result["tokens"][0]
    assert result["stats"]["batches"]["chunked_prefill"] > 0
    text = tokenizer.decode(tokens)
    assert (KEY in text) == covers, text
    assert tokens == _hf(model, ids, method)

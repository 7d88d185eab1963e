"""sparse_attn.patch with transformers' StaticCache: a preallocated cache longer than the prompt.

HF hands such a cache's empty slots to attention as keys. With no padding, its first prefill comes
with no mask at all (SDPA's top-left ``is_causal`` hides the empty slots); with padding or in decode,
a mask covers them. Both must give what a DynamicCache gives: for static methods, cached decoding
equals one full forward; for dynamic ones, the same selections and outputs as with a DynamicCache.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import DECODERS, build, inputs, outputs, positions

import sparse_attn
from sparse_attn import Quest, SinkLocal, TopK

LENGTH = 37
PROMPT = 21
SLACK = 11  # empty slots left in the static cache after the last step


def _stepped(model, ids, mask, cache) -> torch.Tensor:
    pos = positions(mask)
    steps = [
        model(input_ids=ids[:, :PROMPT], attention_mask=mask[:, :PROMPT], position_ids=pos[:, :PROMPT],
              past_key_values=cache, use_cache=True).logits
    ]
    for t in range(PROMPT, LENGTH):
        out = model(input_ids=ids[:, t : t + 1], attention_mask=mask[:, : t + 1],
                    position_ids=pos[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("pads", [[0, 0], [5, 0]], ids=["no-padding", "left-padding"])
def test_static_cache_decoding_equals_one_full_forward(pads) -> None:
    from transformers import StaticCache

    arch = DECODERS[0]
    model = build(arch.name, num_heads=4, num_kv_heads=2, dtype=torch.float64)
    ids, mask = inputs(arch, 2, LENGTH, pads)
    method = SinkLocal(sink_tokens=2, window_tokens=9, block_size=8)
    with torch.no_grad(), sparse_attn.patch(model, method):
        full = outputs(model, ids, mask, position_ids=positions(mask))
        cache = StaticCache(config=model.config, max_cache_len=LENGTH + SLACK)
        stepped = _stepped(model, ids, mask, cache)
        stats = sparse_attn.stats(model)
    assert stats["fallbacks"] == {}
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=1e-9, rtol=1e-9)
    # the window really drops keys, so a misread of the empty slots could not pass
    with torch.no_grad():
        dense = outputs(model, ids, mask, position_ids=positions(mask))
    assert (dense[real] - full[real]).abs().max() > 1e-4


@pytest.mark.parametrize(
    "method",
    [TopK(tokens=10, sink_tokens=2, local_tokens=3, block_size=8), Quest(tokens=12, sink_tokens=2, local_tokens=4, block_size=4)],
    ids=["topk", "quest"],
)
def test_static_cache_gives_a_dynamic_method_what_a_dynamic_cache_gives(method) -> None:
    from transformers import DynamicCache, StaticCache

    arch = DECODERS[0]
    model = build(arch.name, num_heads=4, num_kv_heads=2, dtype=torch.float64)
    ids, mask = inputs(arch, 2, LENGTH, [4, 0])
    with torch.no_grad(), sparse_attn.patch(model, method):
        expected = _stepped(model, ids, mask, DynamicCache())
        got = _stepped(model, ids, mask, StaticCache(config=model.config, max_cache_len=LENGTH + SLACK))
        stats = sparse_attn.stats(model)
    assert stats["fallbacks"] == {}
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-9, rtol=1e-9)

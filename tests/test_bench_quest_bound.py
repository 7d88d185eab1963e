"""`sparse-attn bench quest-bound`: the bound-tightness measures on synthetic keys where the answer is
known, and the capture of post-RoPE queries and keys from a tiny model."""

from __future__ import annotations

import pytest
import torch
from hf_models import build

from sparse_attn.bench import quest_bound


def _band_of(d: int) -> torch.Tensor:
    return (torch.arange(d) % (d // 2)) * quest_bound.BANDS // (d // 2)


def test_bound_is_exact_when_a_block_holds_one_key_repeated() -> None:
    g = torch.Generator().manual_seed(0)
    hq, hkv, d, n, bs = 4, 2, 16, 512, 8
    distinct = torch.randn(hkv, n // bs, d, generator=g)
    k = distinct.repeat_interleave(bs, dim=1)  # each block: one key bs times -> min == max
    q = torch.randn(hq, 4, d, generator=g)
    out = quest_bound.measure_layer(q, k, [bs], [0.1, 0.25], (100, 104), _band_of(d))[str(bs)]
    assert out["gap_std_median"] == pytest.approx(0.0, abs=1e-9)
    assert out["spearman_median"] == pytest.approx(1.0)
    for x in out["densities"].values():
        assert x["recall_max"] == pytest.approx(1.0)
        assert 0 < x["mass_quest"] <= 1 and 0 < x["mass_topk"] <= 1
        assert x["needle_quest"] in (True, False) and x["needle_topk"] in (True, False)


def test_bound_loosens_with_spread_keys_and_the_gap_is_split_by_band() -> None:
    g = torch.Generator().manual_seed(1)
    hq, hkv, d, n = 2, 1, 16, 512
    k = torch.randn(hkv, n, d, generator=g)
    q = torch.randn(hq, 4, d, generator=g)
    res = quest_bound.measure_layer(q, k, [16, 8], [0.1], None, _band_of(d))
    assert res["16"]["gap_std_median"] > res["8"]["gap_std_median"] > 0  # bigger blocks, looser bound
    for r in res.values():
        assert sum(r["gap_share_by_band"]) == pytest.approx(1.0, abs=1e-3)
        assert all(0 < f <= 1 for f in r["range_fraction_by_band"])
        assert r["densities"]["0.1"]["needle_quest"] is None


def test_capture_returns_post_rope_queries_and_the_cache_keys() -> None:
    model = build("llama", layers=2)
    ids = torch.randint(3, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(2))
    got = quest_bound.capture_qk(model, ids, queries=5)
    assert model.config._attn_implementation == "sdpa"  # restored
    with torch.no_grad():
        cache = model(input_ids=ids[None], use_cache=True).past_key_values
    for layer, (q, k) in got.items():
        assert q.shape == (4, 5, 16) and k.shape == (2, 40, 16)
        torch.testing.assert_close(k, cache.layers[layer].keys[0])


def test_run_on_a_tiny_model_and_its_reports(tmp_path) -> None:
    import transformers as tf
    from transformers import AutoTokenizer

    from sparse_attn.bench import harness, report
    from sparse_attn.bench.smollm2 import gguf_path

    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="sdpa",
    )  # fmt: skip
    model = tf.LlamaForCausalLM(cfg).eval()
    result = quest_bound.run(model, tok, length=400, queries=4, densities=(0.1,))
    assert result["config"]["prompt_tokens"] == 400 and result["config"]["layers"] == 2
    assert set(result["summary"]) == {"16", "8"} and set(result["layers"]["1"]) == {"16", "8"}
    start, stop = result["config"]["needle_tokens"]
    assert 0 < start < stop < 400
    text = quest_bound.format_summary(result)
    assert text.count("| all |") == 2
    json_path = harness.write_json(result, tmp_path / "qb.json")
    overview = report.summary_of(__import__("json").loads(json_path.read_text()))
    assert "| 16 |" in overview and "| 8 |" in overview and "RoPE band" in overview

"""The long-context accuracy benchmark: scoring, token-sized prompts, perplexity buckets, end to end.

Prompts are checked with the real SmolLM2 tokenizer (the benchmark's default model; tokenizer only,
loaded once per module). Model runs use tiny random Llamas: the benchmark's plumbing is what is
tested here, not SmolLM2's answers.
"""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
import torch.nn.functional as F
from hf_models import build
from hypothesis import given
from hypothesis import strategies as st

import sparse_attn
from sparse_attn import SinkLocal
from sparse_attn.bench import accuracy, accuracy_report, harness, perplexity, plots, prompts, report, scoring
from sparse_attn.bench.passkey import FILLER, INTRO, QUESTION, needle

KEY = "71432"
TOKENIZER_LOAD_BUDGET_S = 60.0


# --- scoring -----------------------------------------------------------------------------------------

MATCHES = [
    (" 71432.", KEY),
    ("\n\n  71432", KEY),
    ("71432", KEY),
    ("The pass key is 71432!", KEY),
    ("71432, and that is it", KEY),
    ("abc71432def", KEY),
    ("71,432", KEY),  # thousands separator: the same integer
    (" 71432 is the key, not 12345", KEY),
    ("00714", "00714"),  # leading zeros are part of the key
]
MISSES = [
    ("714321", KEY),  # a longer number containing the key
    ("171432", KEY),
    ("7143", KEY),
    ("71432.5", KEY),  # a decimal is another number
    ("-71432", KEY),  # a negative number is another number
    ("12345 then 71432", KEY),  # the first number is the answer
    ("no number at all", KEY),
    ("", KEY),
    ("714", "00714"),
    ("00714", "714"),
    ("7,1432", KEY),  # not a thousands grouping: "7" comes first
]


@pytest.mark.parametrize(("text", "key"), MATCHES, ids=[repr(t) for t, _ in MATCHES])
def test_exact_match_accepts(text: str, key: str) -> None:
    assert scoring.exact_match(text, key)


@pytest.mark.parametrize(("text", "key"), MISSES, ids=[repr(t) for t, _ in MISSES])
def test_exact_match_rejects(text: str, key: str) -> None:
    assert not scoring.exact_match(text, key)


def test_first_number_and_extract_integer() -> None:
    assert scoring.first_number("x -5 y") == "-5" and scoring.extract_integer("x -5 y") is None
    assert scoring.first_number("pi is 3.25.") == "3.25" and scoring.extract_integer("pi is 3.25.") is None
    assert scoring.first_number("12,345,678 and 9") == "12345678"
    assert scoring.extract_integer(" 71432.") == KEY
    assert scoring.first_number("none") is None and scoring.extract_integer("none") is None


def test_truncated_generation_cannot_match_a_cut_number() -> None:
    # the budget stopped right after "71432": the model might have gone on to "714321"
    assert not scoring.exact_match(" 71432", KEY, truncated=True)
    assert scoring.exact_match(" 71432", KEY, truncated=False)
    assert scoring.exact_match(" 71432.", KEY, truncated=True)


@pytest.mark.parametrize("key", ["", "7a", " 71432", "-5", 71432, None])
def test_bad_key_is_a_value_error(key) -> None:
    with pytest.raises(ValueError, match="key"):
        scoring.exact_match("71432", key)


NON_DIGIT = st.text(
    st.characters(blacklist_characters="0123456789", blacklist_categories=("Cs",)), max_size=12
)


@given(
    prefix=NON_DIGIT.filter(lambda s: not s.endswith("-")),  # "-" + key is a negative number
    key=st.from_regex(r"[0-9]{1,12}", fullmatch=True),
    suffix=NON_DIGIT,
)
def test_key_between_non_digit_affixes_is_found(prefix: str, key: str, suffix: str) -> None:
    text = f"{prefix}{key}{suffix}"
    assert scoring.extract_integer(text) == key
    assert scoring.exact_match(text, key)
    # one more digit on either side makes it another number
    assert not scoring.exact_match(f"{prefix}{key}7{suffix}", key)
    assert not scoring.exact_match(f"{prefix}7{key}{suffix}", key)


def test_relative_accuracy_and_retained() -> None:
    dense = [True, True, False, False]
    method = [True, False, True, False]
    assert accuracy.relative_accuracy(method, dense) == 1.0  # 2 right vs 2 right
    assert accuracy.retained(method, dense) == 0.5  # only one of dense's two
    assert accuracy.relative_accuracy(dense, dense) == 1.0
    assert accuracy.relative_accuracy([False, True], [False, False]) is None  # no signal when dense fails
    assert accuracy.retained([True], [False]) is None
    with pytest.raises(ValueError, match="dense_correct"):
        accuracy.relative_accuracy([True], [True, False])


# --- prompts with the real tokenizer ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sparse_attn.bench.smollm2 import gguf_path

    path = gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    elapsed = time.perf_counter() - t0
    assert elapsed < TOKENIZER_LOAD_BUDGET_S, f"tokenizer load took {elapsed:.1f} s"
    return tok


def _token_at(offsets: list[tuple[int, int]], char: int) -> int:
    """Index of the token holding character ``char`` (independent of the builder's prefix counts)."""
    return next(i for i, (_, end) in enumerate(offsets) if end > char)


def _sentence_tokens(tok) -> int:
    return max(
        len(tok(" " + s.strip() + ".", add_special_tokens=False).input_ids)
        for s in FILLER.split(".")
        if s.strip()
    )


@pytest.mark.parametrize("target", [500, 1000, 2000])
def test_passkey_prompt_length_and_depth(tokenizer, target: int) -> None:
    for depth in (0.0, 0.25, 0.5, 0.75, 1.0):
        p = prompts.passkey_prompt_tokens(tokenizer, KEY, target, depth)
        enc = tokenizer(p.text, return_offsets_mapping=True)
        n = len(enc.input_ids)
        assert n == p.num_tokens and abs(n - target) <= 0.02 * target, (target, n)
        assert p.text.startswith(INTRO) and p.text.endswith(QUESTION) and p.answer == KEY
        assert p.text.count(needle(KEY)) == 1 and p.text.count(KEY) == 2

        offsets = enc.offset_mapping
        start = p.text.index(needle(KEY))
        first, after = _token_at(offsets, start), _token_at(offsets, start + len(needle(KEY)))
        intro_end, question = _token_at(offsets, len(INTRO)), _token_at(offsets, len(p.text) - len(QUESTION))
        before, behind = first - intro_end, question - after
        measured = before / (before + behind)
        # The needle may only sit where a filler sentence ends, so it lands at most half a sentence
        # from the requested token offset, plus one token where the boundary merges (" The").
        tol = (_sentence_tokens(tokenizer) / 2 + 1) / (before + behind)
        assert abs(measured - depth) <= tol, (target, depth, measured, tol)
        assert p.answer_needle.token_start == first  # the builder's own count agrees
        assert abs(p.depth - measured) <= 1 / (before + behind)


def test_key_digits_tokenize_consistently(tokenizer) -> None:
    for key in ("71432", "00714", "99999", "1"):
        info = scoring.number_tokenization(tokenizer, key)
        assert info.clean and info.consistent and info.per_digit, info.to_dict()
        ids = info.ids[0]
        assert tokenizer.decode(list(ids)) == key
    p = prompts.passkey_prompt_tokens(tokenizer, KEY, 500, 0.5)
    ids = tokenizer(p.text).input_ids
    key_ids = list(scoring.key_token_ids(tokenizer, KEY))
    hits = [i for i in range(len(ids) - len(key_ids) + 1) if ids[i : i + len(key_ids)] == key_ids]
    assert len(hits) == 2  # the needle names the key twice, each time as the same tokens


def test_multikey_prompt(tokenizer) -> None:
    p = prompts.multikey_prompt_tokens(tokenizer, 1000, num_keys=4, seed=3)
    assert abs(p.num_tokens - 1000) <= 20
    keys = [n.key for n in p.needles]
    names = [n.name for n in p.needles]
    assert len(set(keys)) == 4 and len(set(names)) == 4
    for key, name in zip(keys, names):
        assert p.text.count(key) == 1 and p.text.count(f"The pass key for {name} is {key}.") == 1
    asked = re.search(r"What is the pass key for (\w+)\? The pass key for \1 is$", p.text)
    assert asked is not None and asked.group(1) == p.query
    assert re.search(rf"The pass key for {p.query} is (\d+)\.", p.text).group(1) == p.answer
    depths = [p.depth_of(n) for n in sorted(p.needles, key=lambda n: n.char_start)]
    assert depths == sorted(depths)
    tol = (_sentence_tokens(tokenizer) / 2 + 1) / p.filler_tokens  # as for the single needle
    for d, want in zip(depths, (0.125, 0.375, 0.625, 0.875)):
        assert abs(d - want) <= tol, (d, want, tol)
    again = prompts.multikey_prompt_tokens(tokenizer, 1000, num_keys=4, seed=3)
    other = prompts.multikey_prompt_tokens(tokenizer, 1000, num_keys=4, seed=4)
    assert again.text == p.text and other.text != p.text
    each = [prompts.multikey_prompt_tokens(tokenizer, 600, seed=3, query=q) for q in range(4)]
    assert sorted(x.answer for x in each) == sorted(keys)


def test_prompt_argument_errors(tokenizer) -> None:
    with pytest.raises(ValueError, match="target_tokens"):
        prompts.passkey_prompt_tokens(tokenizer, KEY, 20, 0.5)  # the fixed text alone is longer
    with pytest.raises(ValueError, match="depth"):
        prompts.passkey_prompt_tokens(tokenizer, KEY, 500, 1.5)
    with pytest.raises(ValueError, match="key"):
        prompts.passkey_prompt_tokens(tokenizer, "7x", 500, 0.5)
    with pytest.raises(ValueError, match="query"):
        prompts.multikey_prompt_tokens(tokenizer, 500, num_keys=2, query=2)


# --- perplexity ---------------------------------------------------------------------------------------


def test_stdlib_text_and_text_file(tokenizer, tmp_path) -> None:
    text, source = perplexity.load_text()
    files = perplexity.stdlib_files()
    assert len(text) > 100_000 and source.startswith("python-stdlib:")
    assert [f.name for f in files] == sorted(f.name for f in files)
    assert perplexity.load_text() == (text, source)
    ids = perplexity.text_token_ids(tokenizer, text, 300)
    assert ids.tolist() == tokenizer(text[:20_000]).input_ids[:300]
    own = tmp_path / "t.txt"
    own.write_text("hello world " * 50, encoding="utf-8")
    assert perplexity.load_text(own) == ("hello world " * 50, str(own))
    with pytest.raises(ValueError, match="text_path"):
        perplexity.load_text(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match="tokens"):
        perplexity.text_token_ids(tokenizer, "short", 300)


def _hand_nll(model, ids: torch.Tensor) -> torch.Tensor:
    """Per-target NLL from one forward: position p scored from the logits at p - 1."""
    with torch.no_grad():
        logits = model(ids[None]).logits[0].double()
    return torch.stack([F.cross_entropy(logits[p - 1], ids[p]) for p in range(1, ids.numel())])


@pytest.mark.parametrize(("window", "buckets"), [(64, 8), (50, 7)], ids=["L64-b8", "L50-b7"])
def test_perplexity_buckets_match_hand_computed_nll(window: int, buckets: int) -> None:
    model = build("llama", layers=2)
    ids = torch.randint(
        3, model.config.vocab_size, (2 * window + 5,), generator=torch.Generator().manual_seed(1)
    )
    got = perplexity.perplexity_by_position(model, ids, window, buckets)
    assert got["windows"] == 2 and len(got["buckets"]) == buckets
    per_window = [_hand_nll(model, ids[w * window : (w + 1) * window]) for w in range(2)]
    nll = (per_window[0] + per_window[1]) / 2  # [window - 1], entry p - 1 for position p
    for b, row in enumerate(got["buckets"]):
        positions = [p for p in range(1, window) if p * buckets // window == b]
        want = float(torch.stack([nll[p - 1] for p in positions]).mean())
        assert row["tokens"] == len(positions) and (row["start"], row["end"]) == (
            positions[0],
            positions[-1] + 1,
        )
        assert row["nll"] == pytest.approx(want, abs=1e-5)
        assert row["ppl"] == pytest.approx(torch.tensor(want).exp().item(), rel=1e-5)
    assert got["nll"] == pytest.approx(float(nll.mean()), abs=1e-5)


def test_windowed_pattern_changes_only_late_buckets() -> None:
    # SinkLocal(window 24): queries 0..23 still see every earlier key, so targets 1..24 (buckets 0-2
    # of a 64-token window in 8 buckets) score exactly as dense; later targets lose keys.
    model = build("llama", layers=2)
    ids = torch.randint(3, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(2))
    dense = perplexity.perplexity_by_position(model, ids, 64, 8)["buckets"]
    with sparse_attn.patch(model, SinkLocal(sink_tokens=0, window_tokens=24, block_size=16)):
        sparse = perplexity.perplexity_by_position(model, ids, 64, 8)["buckets"]
        assert sparse_attn.stats(model)["sparse_calls"] > 0
    early = max(abs(a["nll"] - b["nll"]) for a, b in zip(dense[:3], sparse[:3]))
    late = max(abs(a["nll"] - b["nll"]) for a, b in zip(dense[4:], sparse[4:]))
    assert early < 1e-5 and late > 100 * max(early, 1e-7), (early, late)


# --- end to end ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    return tf.LlamaForCausalLM(cfg).eval()


def test_run_accuracy_end_to_end(tiny_llama, tokenizer, tmp_path, capsys) -> None:
    window = SinkLocal(sink_tokens=4, window_tokens=32, block_size=16)
    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    result = accuracy.run_accuracy(
        tiny_llama, tokenizer, {"dense": None, "sink_local": window}, [128], depths, [0],
        multikey=True, perplexity=True, progress=True, max_new_tokens=8,
        ppl_tokens=128, ppl_windows=2, ppl_buckets=4, multikey_keys=2,
    )  # fmt: skip
    assert list(result)[:4] == ["schema_version", "benchmark", "device", "env"]
    assert {"git_commit", "timestamp_utc", "machine", "torch"} <= set(result["env"])
    assert list(result["methods"]) == ["dense", "sink_local"]
    assert "sink_local" in capsys.readouterr().err  # the tqdm bar, on stderr

    rows = result["rows"]
    assert len(rows) == 2 * (5 + 2)
    for name, s in result["methods"].items():
        own = [r for r in rows if r["method"] == name]
        assert s["status"] == "ok", s["status"]
        for r in own:
            assert abs(r["prompt_tokens"] - 128) <= 0.02 * 128
            assert r["correct"] == scoring.exact_match(r["output"], r["key"], truncated=r["truncated"])
        passkey = [r for r in own if r["task"] == "passkey"]
        assert [r["depth"] for r in passkey] == depths
        assert s["passkey"]["total"] == 5 and s["multikey"]["total"] == 2
        assert s["passkey"]["accuracy"] == sum(r["correct"] for r in passkey) / 5
        assert s["passkey"]["grid"] == [[float(r["correct"]) for r in passkey]]
        assert (
            len(s["perplexity"]["buckets"]) == 4
            and s["perplexity"]["windows"] == 2
            and s["perplexity"]["ppl"] > 1
        )
    # every method answered the same prompts
    keys = {name: [r["key"] for r in rows if r["method"] == name] for name in result["methods"]}
    assert keys["dense"] == keys["sink_local"]

    dense, sparse = result["methods"]["dense"], result["methods"]["sink_local"]
    for task in ("passkey", "multikey"):
        acc = dense[task]["accuracy"]
        assert dense[task]["relative_to_dense"] == (1.0 if acc > 0 else None)
    assert dense["density"] == 1.0 and dense["fallbacks"] == 0
    assert 0 < sparse["density"] < 1 and 0 < sparse["perplexity"]["density"] < 1
    assert sparse["fallbacks"] == 0 and sparse["sparse_calls"] > 0
    assert sparse["perplexity"]["ppl"] != dense["perplexity"]["ppl"]

    table = accuracy.format_table(result)
    for word in (
        "method",
        "passkey acc",
        "rel. to dense",
        "multikey acc",
        "ppl",
        "density",
        "fallbacks",
        "sink_local",
    ):
        assert word in table
    path = harness.write_json(result, tmp_path / "out" / "acc.json")
    assert json.loads(path.read_text())["methods"]["sink_local"]["density"] == pytest.approx(
        sparse["density"]
    )
    for fn, name in ((plots.plot_needle_heatmap, "heat.png"), (plots.plot_perplexity, "ppl.png")):
        png = fn(result, tmp_path / name)
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_run_accuracy_adds_dense_and_checks_arguments(tiny_llama, tokenizer) -> None:
    unfit = sparse_attn.SparseAttentionConfig(
        default=SinkLocal(), dense_layers=(5,)
    )  # the model has 2 layers
    with pytest.warns(UserWarning, match="max_new_tokens=2"):
        result = accuracy.run_accuracy(
            tiny_llama, tokenizer, {"w": SinkLocal(sink_tokens=4, window_tokens=32, block_size=16), "bad": unfit},
            [100], [0.5], [1], multikey=False, perplexity=False, progress=False, max_new_tokens=2,
        )  # fmt: skip
    assert list(result["methods"]) == ["dense", "w", "bad"]
    assert [r["key"] for r in result["rows"]] == [result["rows"][0]["key"]] * 2  # "bad" answered nothing
    # a method that does not fit the model is recorded as an error; the others still ran
    assert result["methods"]["bad"]["status"].startswith("error: ConfigError")
    assert result["methods"]["bad"]["passkey"] is None and "error: ConfigError" in accuracy.format_table(
        result
    )
    assert result["methods"]["w"]["status"] == "ok"
    assert result["config"]["max_new_tokens_enough"] is False
    assert result["methods"]["w"]["multikey"] is None and result["methods"]["w"]["perplexity"] is None
    bad = [
        ({"dense": SinkLocal()}, [100], [0.5], "dense"),
        ({}, [100], [0.5], "methods"),
        ({"d": None}, [], [0.5], "lengths"),
        ({"d": None}, [100], [1.5], "depths"),
    ]
    for methods, lengths, depths, word in bad:
        with pytest.raises(ValueError, match=word):
            accuracy.run_accuracy(tiny_llama, tokenizer, methods, lengths, depths, progress=False)
    # the tiny model knows 512 positions: a prompt plus its answer, or a perplexity window, must fit
    with pytest.raises(ValueError, match=r"lengths: .*max_position_embeddings=512; use lengths <= 504"):
        accuracy.run_accuracy(
            tiny_llama, tokenizer, {"d": None}, [505], [0.5], progress=False, max_new_tokens=8
        )
    # perplexity windows default to the longest prompt
    doc = accuracy.run_accuracy(
        tiny_llama, tokenizer, {"d": None}, [100, 130], [0.5], multikey=False, progress=False,
        ppl_windows=1, ppl_buckets=3,
    )  # fmt: skip
    assert (
        doc["config"]["perplexity"]["tokens"] == 130
        and doc["methods"]["d"]["perplexity"]["window_tokens"] == 130
    )
    with pytest.raises(ValueError, match="ppl_tokens=513"):
        accuracy.run_accuracy(
            tiny_llama, tokenizer, {"d": None}, [100], [0.5], progress=False, ppl_tokens=513
        )
    with sparse_attn.patch(tiny_llama, "dense"), pytest.raises(ValueError, match="already patched"):
        accuracy.run_accuracy(tiny_llama, tokenizer, {"d": None}, [100], [0.5], progress=False)


# --- decode tail, density sweep (dynamic methods) ----------------------------------------------------


def test_question_tokens_and_tail_length(tokenizer) -> None:
    cases = accuracy.build_cases(tokenizer, [300], [0.5], [0], multikey=True, multikey_keys=2)
    for case in cases:
        q = accuracy.question_tokens(tokenizer, case)
        question = accuracy.question_text(case)
        assert q >= len(tokenizer(question, add_special_tokens=False)["input_ids"]) - 1 and q > 5
        n = case.prompt.num_tokens
        assert accuracy.tail_length(n, q, 0) == 0  # the whole prompt in one prefill
        assert accuracy.tail_length(n, q, 1) == q  # at least the question
        assert accuracy.tail_length(n, q, 64) == 64
        assert accuracy.tail_length(n, q, 10**6) == n - 1  # the head keeps one token


def test_expand_densities() -> None:
    window = SinkLocal(sink_tokens=4, window_tokens=32, block_size=16)
    out = accuracy.expand_densities(
        {"dense": None, "w": window, "topk": sparse_attn.TopK(), "quest": sparse_attn.Quest(block_size=8)},
        [0.1, 0.02],
    )
    assert list(out) == ["dense", "w", "topk@0.02", "topk@0.1", "quest@0.02", "quest@0.1"]
    assert out["dense"] is None and out["w"] is window
    assert out["quest@0.02"] == sparse_attn.Quest(density=0.02, block_size=8)  # tokens budget replaced
    assert out["topk@0.1"].density == 0.1 and out["topk@0.1"].tokens is None
    from sparse_attn.presets import resolve_config

    preset = accuracy.expand_densities({"q": resolve_config("quest")}, [0.05])
    assert preset["q@0.05"] == sparse_attn.Quest(density=0.05)
    with pytest.raises(ValueError, match="densities"):
        accuracy.expand_densities({"topk": sparse_attn.TopK()}, [0.0])
    pig = sparse_attn.MagicPIG(bits=6, tables=20)  # no budget: its sample size is measured
    assert accuracy.expand_densities({"pig": pig}, [0.05, 0.1]) == {"pig": pig}


def test_decode_tail_sweep_end_to_end(tiny_llama, tokenizer, tmp_path) -> None:
    methods = accuracy.expand_densities({"dense": None, "topk": sparse_attn.TopK(), "quest": sparse_attn.Quest()}, [0.05, 1.0])  # fmt: skip
    result = accuracy.run_accuracy(
        tiny_llama, tokenizer, methods, [160], [0.0, 1.0], [0], multikey=True, perplexity=False,
        progress=False, max_new_tokens=4, multikey_keys=2, decode_tail=16, head_prefill="dense",
    )  # fmt: skip
    cfg = result["config"]
    assert cfg["decode_tail"] == 16 and cfg["head_prefill"] == "dense" and cfg["shared_prefill_s"] > 0
    assert [e["name"] for e in cfg["sweep"]["topk"]] == ["topk@0.05", "topk@1"]
    by_method: dict[str, list[dict]] = {}
    for r in result["rows"]:
        by_method.setdefault(r["method"], []).append(r)
        assert r["prefill_tokens"] + r["decode_tokens"] == r["prompt_tokens"] and r["decode_tokens"] >= 16
    cases = accuracy.build_cases(tokenizer, [160], [0.0, 1.0], [0], multikey=True, multikey_keys=2)
    for case, r in zip(cases, by_method["dense"]):
        assert r["decode_tokens"] == max(16, accuracy.question_tokens(tokenizer, case))
    # a budget that covers the row answers exactly as dense, through the same split
    outputs = {name: [r["output"] for r in rows] for name, rows in by_method.items()}
    assert outputs["topk@1"] == outputs["dense"] and outputs["quest@1"] == outputs["dense"]
    for name, s in result["methods"].items():
        assert s["status"] == "ok", s["status"]
        assert s["split"]["decode_tail"] == 16 and s["split"]["answer_decided_by"] == "decode path"
        assert s["split"]["head"].startswith("dense (shared")
        if name != "dense":
            assert s["sparse_calls"] > 0 and s["fallbacks"] == 0
    # the density of the step that decided the answer: the selection's, not the dense prefill's
    # (at ~165 keys the 4 sinks + 16 local keys alone exceed 5%: they are always kept)
    assert 0 < result["methods"]["quest@0.05"]["density"] < 0.25
    assert 0 < result["methods"]["topk@0.05"]["density"] < 0.25
    assert result["methods"]["topk@1"]["density"] == 1.0
    table = accuracy.format_table(result)
    assert "accuracy by density" in table and "through decode" in table
    assert "| task | method | 0.05 | 1 |" in accuracy_report.sweep_table(result, markdown=True)
    # the README block of a result, rendered by `sparse-attn bench report --block NAME`
    path = harness.write_json(result, tmp_path / "acc.json")
    readme = tmp_path / "README.md"
    readme.write_text(
        "intro\n<!-- acc -->\nold\n<!-- /acc -->\n<!-- bench-table -->\nkeep\n<!-- /bench-table -->\n"
    )
    report.update_readme(readme, path, "acc")
    text = readme.read_text()
    assert "old" not in text and "keep" in text and "| passkey | quest |" in text and "through decode" in text
    png = plots.plot_density_sweep(result, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="sweep"):
        plots.plot_density_sweep({**result, "config": {**cfg, "sweep": None}}, tmp_path / "x.png")


def test_tail_through_decode_lets_a_decode_only_method_decide(tiny_llama, tokenizer) -> None:
    """With the whole prompt prefilled densely, the first answer token is dense's whatever the method;
    with the tail through decode the method's selection decides it."""
    methods = {
        "dense": None,
        "quest": sparse_attn.Quest(tokens=8, sink_tokens=1, local_tokens=4, block_size=4),
    }

    def first_tokens(tail: int) -> dict[str, list[str]]:
        result = accuracy.run_accuracy(
            tiny_llama, tokenizer, methods, [160], [0.0, 0.5, 1.0], [0, 1], multikey=False,
            perplexity=False, progress=False, max_new_tokens=1, decode_tail=tail, head_prefill="dense",
        )  # fmt: skip
        out: dict[str, list[str]] = {}
        for r in result["rows"]:
            out.setdefault(r["method"], []).append(r["output"])
        return out

    flattered = first_tokens(0)
    assert flattered["quest"] == flattered["dense"]
    decided = first_tokens(16)
    assert decided["quest"] != decided["dense"]


def test_accuracy_cli_arguments() -> None:
    from sparse_attn import cli

    args = cli.build_parser().parse_args(
        [
            "bench",
            "accuracy",
            "--methods",
            "dense,topk,quest",
            "--densities",
            "0.02,0.05",
            "--decode-tail",
            "0",
        ]
    )
    assert args.densities == [0.02, 0.05] and args.decode_tail == 0 and args.head_prefill == "method"
    methods = cli._methods_arg(args.methods, dynamic=True)
    assert methods["dense"] is None and methods["topk"] == sparse_attn.TopK()
    assert cli.build_parser().parse_args(["bench", "accuracy"]).decode_tail == 64
    for bad in (["--densities", "0"], ["--densities", "1.5"], ["--decode-tail", "-1"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(["bench", "accuracy", *bad])


def test_multikey_only_run_asks_the_prompts_of_a_full_run(tiny_llama, tokenizer) -> None:
    full = accuracy.build_cases(tokenizer, [160], [0.0, 1.0], [0, 1], multikey=True, multikey_keys=2)
    only = accuracy.build_cases(
        tokenizer, [160], [0.0, 1.0], [0, 1], multikey=True, multikey_keys=2, with_passkey=False
    )
    assert [c.prompt.text for c in only] == [c.prompt.text for c in full if c.task == "multikey"]
    result = accuracy.run_accuracy(
        tiny_llama, tokenizer, {"dense": None, "quest@0.1": sparse_attn.Quest(density=0.1)}, [160], [0.5], [0],
        perplexity=False, progress=False, max_new_tokens=2, multikey_keys=2, decode_tail=16, passkey=False,
    )  # fmt: skip
    assert {r["task"] for r in result["rows"]} == {"multikey"} and len(result["rows"]) == 4
    assert result["methods"]["quest@0.1"]["passkey"] is None
    assert result["methods"]["quest@0.1"]["multikey"]["total"] == 2
    assert "multikey" in accuracy.format_table(result)
    with pytest.raises(ValueError, match="nothing to run"):
        accuracy.run_accuracy(tiny_llama, tokenizer, {"d": None}, [160], [0.5], multikey=False, passkey=False)

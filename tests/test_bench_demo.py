"""Full-model throughput rows, the correctness gate in front of every timing, and the demo's methods."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import ClassVar

import pytest
import torch
from hf_models import build

import sparse_attn as sa
from sparse_attn import SinkLocal, SparseAttentionConfig
from sparse_attn.bench import demo, model_throughput
from sparse_attn.methods.dynamic import mask_to_selection


@dataclasses.dataclass(frozen=True)
class _Misplanned(SinkLocal):
    """Plans a narrower window than its mask says: a method whose kernels would be wrong."""

    def plan(self, q_lens, kv_lens, num_heads, num_kv_heads=None, *, causal=True):
        narrow = SinkLocal(self.sink_tokens, self.window_tokens // 4, self.block_size)
        return narrow.plan(q_lens, kv_lens, num_heads, num_kv_heads, causal=causal)


def test_self_check_passes_every_demo_method_at_smollm2_heads() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the demo's settings must not be degenerate (CoverageWarning)
        for length in (demo.QUICK_LENGTH, demo.DEMO_LENGTH):
            for name, method in demo.demo_methods(length).items():
                if method is not None:
                    check = model_throughput.self_check(method, 9, 3, layers=2)
                    assert check["ok"], (length, name, check)


@pytest.mark.parametrize("length", [demo.QUICK_LENGTH, 4096, 6000, 8000])
def test_demo_methods_decode_within_the_budget(length) -> None:
    methods = demo.demo_methods(length)
    assert list(methods) == list(demo.METHODS) and methods["dense"] is None
    budget = demo.BUDGET * length
    for name, method in methods.items():
        if isinstance(method, sa.DynamicMethod):
            assert method.tokens <= budget, name
        elif method is not None:
            # the answer's first step: one query over the whole prompt
            density = method.plan([1], [length], 9, 3).density()
            assert 0.5 * demo.BUDGET < density <= demo.BUDGET, (name, density)
    with pytest.raises(ValueError, match="too small"):
        demo.demo_methods(200)


def _row(method, passkey, density, decode_ms, kind="static", status="ok"):
    return {
        "method": method, "kind": kind, "status": status, "passkey": passkey, "density": density,
        "decode_ms_per_token": decode_ms, "decode_speedup": None if decode_ms is None else 100.0 / decode_ms,
    }  # fmt: skip


def test_best_is_the_most_accurate_then_fastest_method_under_the_density_bar() -> None:
    rows = [
        _row("dense", 1.0, 1.0, 100.0, kind="dense"),
        _row("wide", 1.0, 0.25, 50.0),  # more accurate and faster, but over the bar
        _row("slow_exact", 1.0, 0.10, 120.0, kind="dynamic"),
        _row("fast_exact", 1.0, 0.05, 110.0, kind="dynamic"),
        _row("fastest_wrong", 0.33, 0.05, 40.0),
        _row("broken", 1.0, 0.05, 10.0, status="failed-correctness"),
    ]
    assert demo.pick_best(rows) == "fast_exact"
    assert demo.pick_best(rows, density_bar=0.3) == "wide"
    assert demo.pick_best(rows, density_bar=0.01) is None
    assert demo.pick_best([r for r in rows if r["method"] in ("dense", "wide")]) is None
    # a method without a decode time ranks after one with it at the same accuracy
    assert demo.pick_best([_row("a", 1.0, 0.1, None), _row("b", 1.0, 0.1, 500.0)]) == "b"


def test_verdict_needs_dense_accuracy_and_a_faster_decode() -> None:
    dense = _row("dense", 2 / 3, 1.0, 100.0, kind="dense")
    slow = demo.verdict([dense, _row("x", 2 / 3, 0.1, 120.0)], "x")
    assert slow["keeps_dense_accuracy"] and not slow["decodes_faster"] and slow["met"] is False
    assert "NOT met" in slow["text"] and "not faster" in slow["text"]
    fast = demo.verdict([dense, _row("x", 1.0, 0.1, 80.0)], "x")
    assert fast["met"] is True and "(faster)" in fast["text"]
    lossy = demo.verdict([dense, _row("x", 1 / 3, 0.1, 50.0)], "x")
    assert lossy["met"] is False and "loses accuracy" in lossy["text"]
    assert demo.verdict([dense], None)["met"] is None
    blind = demo.verdict([_row("dense", 0.0, 1.0, 100.0, kind="dense"), _row("x", 0.0, 0.1, 50.0)], "x")
    assert blind["met"] is None and "cannot tell" in blind["text"]


def test_self_check_catches_a_wrong_kernel_plan() -> None:
    check = model_throughput.self_check(_Misplanned(sink_tokens=4, window_tokens=256, block_size=64), 4, 2)
    assert not check["ok"]
    assert check["max_abs_err"] > 100 * check["tol"]


@dataclasses.dataclass(frozen=True)
class _Unfaithful(sa.Quest):
    """Attends other keys than it reports: every second selection is the complement of the one before."""

    calls: ClassVar[list[int]] = [0]

    def select_decode(self, q, k, side, kv_lens, q_lens, scale, causal, backend="torch"):
        sel = super().select_decode(q, k, side, kv_lens, q_lens, scale, causal, backend)
        self.calls[0] += 1
        if self.calls[0] % 2:
            return sel
        others = ~sel.to_dense_mask(int(kv_lens.max()))
        return mask_to_selection(others)


@pytest.mark.parametrize("method", [sa.TopK(density=0.05), sa.Quest(density=0.05)], ids=["topk", "quest"])
def test_self_check_passes_the_dynamic_methods_at_a_decode_step(method) -> None:
    check = model_throughput.self_check(method, 9, 3, layers=2)
    assert check["ok"], check


def test_self_check_catches_a_dynamic_method_attending_other_keys() -> None:
    check = model_throughput.self_check(_Unfaithful(density=0.05), 9, 3)
    assert not check["ok"]
    assert check["max_abs_err"] > 100 * check["tol"]


def test_measure_rows_and_the_correctness_gate() -> None:
    model = build("llama", head_dim=16)  # GQA 4:2, 512 positions
    methods = {
        "dense": None,
        "sink_local": SinkLocal(sink_tokens=4, window_tokens=60, block_size=16),
        "broken": _Misplanned(sink_tokens=4, window_tokens=256, block_size=16),
        # decode steps over fewer than 150 keys cross over to dense: all at 96, none at 200
        "short_dense": SparseAttentionConfig(
            default=SinkLocal(sink_tokens=4, window_tokens=60, block_size=16), dense_below=150
        ),
    }
    rows = model_throughput.measure(model, methods, [96, 200], decode_tokens=2)
    by = {(r["method"], r["length"]): r for r in rows}
    assert set(by) == {(m, n) for m in methods for n in (96, 200)}
    for n in (96, 200):
        assert by[("dense", n)]["prefill_speedup"] == pytest.approx(1.0)
        assert by[("broken", n)]["status"] == "failed-correctness"
        assert "prefill_s" not in by[("broken", n)]
        sl = by[("sink_local", n)]
        assert sl["status"] == "ok" and sl["prefill_s"] > 0 and sl["decode_ms_per_token"] > 0
        # speedups against the unpatched runs interleaved with the row's own (paired_dense)
        paired = sl["paired_dense"]
        assert paired["prefill_s"] > 0 and paired["decode_ms_per_token"] > 0
        assert sl["prefill_speedup"] == pytest.approx(paired["prefill_s"] / sl["prefill_s"], rel=1e-2)
        assert sl["decode_speedup"] == pytest.approx(
            paired["decode_ms_per_token"] / sl["decode_ms_per_token"], rel=1e-2
        )
        assert "paired_dense" not in by[("dense", n)]
    assert by[("sink_local", 200)]["density"] < by[("sink_local", 96)]["density"] < 1.0
    assert by[("sink_local", 96)]["decode_dense_crossover"] == 0.0
    assert by[("short_dense", 96)]["decode_dense_crossover"] == 1.0
    assert by[("short_dense", 200)]["decode_dense_crossover"] == 0.0
    table = model_throughput.format_rows(rows)
    assert "failed-correctness" in table and "sink_local" in table


def test_measure_takes_medians_after_a_warm_up_that_does_not_count() -> None:
    model = build("llama", head_dim=16)  # GQA 4:2, 512 positions
    window = SinkLocal(sink_tokens=4, window_tokens=60, block_size=16)
    (row,) = [
        r
        for r in model_throughput.measure(model, {"w": window}, [200], decode_tokens=2, repeats=3)
        if r["method"] == "w"
    ]
    assert row["status"] == "ok" and row["repeats"] == 3
    # the density is the prefill's own layout: the short warm-up (all inside the window) is not in it
    heads = model.config.num_attention_heads, model.config.num_key_value_heads
    assert row["density"] == pytest.approx(window.plan([200], [200], *heads).density(), abs=1e-4)
    with pytest.raises(ValueError, match="repeats"):
        model_throughput.measure(model, {"w": window}, [200], repeats=0)
    with pytest.raises(ValueError, match="cache"):
        model_throughput.measure(model, {"w": window}, [200], cache="paged")


def test_decode_pairs_time_steps_from_one_prefill() -> None:
    model = build("llama", head_dim=16)  # GQA 4:2, 512 positions
    window = SinkLocal(sink_tokens=4, window_tokens=60, block_size=16)
    methods = {
        "dense": None,
        "w": window,
        "quest": sa.Quest(tokens=48),
        "broken": _Misplanned(sink_tokens=4, window_tokens=256, block_size=16),
        "short_dense": SparseAttentionConfig(default=window, dense_below=10_000),
    }
    rows = model_throughput.measure_decode_pairs(model, methods, [200], decode_tokens=3, pairs=2)
    by = {r["method"]: r for r in rows}
    assert by["broken"]["status"] == "failed-correctness"
    assert by["dense"]["decode_speedup"] == 1.0 and "paired_dense" not in by["dense"]
    for name in ("w", "quest", "short_dense"):
        r = by[name]
        assert r["status"] == "ok" and r["mode"] == "decode_pairs" and (r["pairs"], r["decode_tokens"]) == (2, 3)
        assert "prefill_s" not in r and r["first_step_ms"] > 0 and r["decode_ms_per_token"] > 0
        paired = r["paired_dense"]
        assert r["decode_speedup"] == pytest.approx(paired["decode_ms_per_token"] / r["decode_ms_per_token"], rel=1e-2)
    # the patched runs ran through the patch (a sparse decode density), the crossed-over ones dense
    heads = model.config.num_attention_heads, model.config.num_key_value_heads
    assert by["w"]["density"] == pytest.approx(window.plan([1], [203], *heads).density(), abs=1e-4)
    assert by["quest"]["density"] < 0.5 and by["quest"]["decode_dense_crossover"] == 0.0
    assert by["short_dense"]["decode_dense_crossover"] == 1.0
    assert "quest" in model_throughput.format_rows(rows)
    with pytest.raises(ValueError, match="pairs"):
        model_throughput.measure_decode_pairs(model, {"w": window}, [200], pairs=0)
    with pytest.raises(ValueError, match="decode_tokens"):
        model_throughput.measure_decode_pairs(model, {"w": window}, [200], decode_tokens=1)


def test_speedup_plot_is_written(tmp_path) -> None:
    rows = [
        {"method": "dense", "length": 1024, "status": "ok", "prefill_speedup": 1.0, "decode_speedup": 1.0},
        {"method": "s2", "length": 1024, "status": "ok", "prefill_speedup": 1.5, "decode_speedup": 1.2},
        {"method": "s2", "length": 2048, "status": "ok", "prefill_speedup": 2.5, "decode_speedup": 1.9},
    ]
    path = model_throughput.plot_speedup(rows, str(tmp_path / "speedup.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A local checkpoint: a tiny random Llama with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sparse_attn.bench.smollm2 import gguf_path

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    model_dir = tmp_path_factory.mktemp("model")
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def test_bench_accuracy_cli_writes_table_json_and_plots(tiny_checkpoint, tmp_path, capsys) -> None:
    from sparse_attn.cli import main

    out = tmp_path / "out"
    args = ["--methods", "dense,sink_local", "--lengths", "256", "--depths", "0,0.5,1", "--no-multikey"]
    ppl = ["--ppl-tokens", "200", "--ppl-windows", "2"]
    code = main(["bench", "accuracy", "--model", str(tiny_checkpoint), *args, *ppl, "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "sink_local" in printed and "dense" in printed
    for name in ("accuracy.json", "needle-heatmap.png", "perplexity.png"):
        assert (out / name).stat().st_size > 0
    perplexity = json.loads((out / "accuracy.json").read_text())["methods"]["sink_local"]["perplexity"]
    assert (perplexity["window_tokens"], perplexity["windows"]) == (200, 2)


def test_bench_throughput_cli_adds_full_model_rows(tiny_checkpoint, tmp_path, capsys) -> None:
    from sparse_attn.cli import main

    path = tmp_path / "tp.json"
    model_args = [
        "--model",
        str(tiny_checkpoint),
        "--model-lengths",
        "128,256",
        "--model-methods",
        "dense,a_shape",
        "--model-repeats",
        "2",
        "--model-decode-tokens",
        "3",
    ]
    code = main(["bench", "throughput", "--quick", *model_args, "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    rows = result["model"]["rows"]
    assert result["model"]["decode_tokens"] == 3
    assert {(r["method"], r["length"]) for r in rows} == {
        (m, n) for m in ("dense", "a_shape") for n in (128, 256)
    }
    assert all(r["status"] == "ok" and r["prefill_s"] > 0 and r["repeats"] == 2 for r in rows)
    assert result["rows"], "the kernel rows are still there"
    assert (tmp_path / "tp-model-speedup.png").stat().st_size > 0
    assert "a_shape" in capsys.readouterr().out


def test_bench_throughput_model_only_has_no_kernel_rows(tiny_checkpoint, tmp_path, capsys) -> None:
    from sparse_attn.bench import report
    from sparse_attn.cli import main

    path = tmp_path / "tp.json"
    args = ["--model", str(tiny_checkpoint), "--model-lengths", "128", "--model-methods", "dense,a_shape"]
    code = main(
        ["bench", "throughput", "--model-only", *args, "--model-cache", "static", "--model-repeats", "1",
         "--json", str(path)]
    )
    assert code == 0
    result = json.loads(path.read_text())
    assert result["rows"] == []
    assert {r["method"] for r in result["model"]["rows"]} == {"dense", "a_shape"}
    assert result["model"]["cache"] == "static"
    assert all(r["status"] == "ok" and r["cache"] == "static" for r in result["model"]["rows"])
    assert "Full model" in report.markdown_summary(result)
    pairs = ["--model-decode-pairs", "2", "--model-decode-tokens", "2", "--json", str(path)]
    assert main(["bench", "throughput", "--model-only", *args, *pairs]) == 0
    result = json.loads(path.read_text())
    assert (result["model"]["mode"], result["model"]["pairs"]) == ("decode_pairs", 2)
    rows = {r["method"]: r for r in result["model"]["rows"]}
    assert "prefill_s" not in rows["a_shape"] and rows["a_shape"]["paired_dense"]["decode_ms_per_token"] > 0
    assert "decode only" in report.markdown_summary(result)
    assert main(["bench", "throughput", "--model-only", "--json", str(path)]) == 2
    assert "--model-only needs --model" in capsys.readouterr().err

def test_demo_quick_on_a_tiny_checkpoint(tiny_checkpoint, tmp_path) -> None:
    out = tmp_path / "demo"
    # every method but Loki, whose demo basis is SmolLM2's (refused for another model)
    names = [m for m in demo.METHODS if m != "loki"]
    with pytest.raises(ValueError, match="basis shipped for smollm2"):
        demo.run(out, quick=True, model=str(tiny_checkpoint), methods=demo.METHODS, progress=False)
    result = demo.run(out, quick=True, model=str(tiny_checkpoint), methods=names, threads=None, progress=False)
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == names
    assert result["config"]["length"] == demo.QUICK_LENGTH
    for name, r in rows.items():
        assert r["status"] == "ok", (name, r)
        assert r["passkey_total"] == len(demo.DEPTHS) and set(r["by_depth"]) == {"0.1", "0.5", "0.9"}
        assert r["prefill_s"] > 0 and r["decode_ms_per_token"] > 0
        assert r["density"] <= (1.0 if name == "dense" else demo.BUDGET)
    assert rows["dense"]["prefill_speedup"] == pytest.approx(1.0)
    assert rows["dense"]["decode_speedup"] == pytest.approx(1.0)
    assert [rows[n]["prefill"] for n in names] == ["dense", "own", "own", "dense (by design)", "dense (by design)"]
    # the dynamic methods prefill densely: dense's shared prefill is theirs
    assert rows["topk"]["prefill_s"] == rows["dense"]["prefill_s"]
    assert 0 < rows["sink_local"]["prefill_density"] < 1
    assert result["best"] == demo.pick_best(result["rows"])
    assert [n for n, r in rows.items() if r["best"]] == ([result["best"]] if result["best"] else [])
    # the question (not the whole prompt) goes through decode, every step timed
    question = result["config"]["decode_tokens"]
    assert len(question) == 1 and 5 <= question[0] <= 20
    for r in result["accuracy"]["rows"]:
        assert r["decode_steps"] >= r["decode_tokens"] and r["decode_ms_per_token"] > 0
    assert json.loads((out / "demo.json").read_text())["verdict"] == result["verdict"]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = demo.format_table(result)
    for text in ("torch threads", "commit", str(demo.QUICK_LENGTH), result["verdict"]["text"]):
        assert text in table
    with pytest.raises(ValueError, match="unknown demo methods"):
        demo.run(None, quick=True, model=str(tiny_checkpoint), methods=["s2"], threads=None)


def test_demo_cli(tiny_checkpoint, tmp_path, capsys) -> None:
    from sparse_attn.cli import main

    out = tmp_path / "cli"
    threads = torch.get_num_threads()
    args = ["--quick", "--model", str(tiny_checkpoint), "--methods", "topk", "--threads", "1", "--out", str(out)]
    try:
        assert main(["demo", *args]) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "dense" in printed and "topk" in printed and "demo.png" in printed
    methods = json.loads((out / "demo.json").read_text())["config"]["methods"]
    assert list(methods) == ["dense", "topk"]

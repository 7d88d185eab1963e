"""Full-model throughput rows, the correctness gate in front of every timing, and the demo's methods."""

from __future__ import annotations

import dataclasses
import json
import warnings
from typing import ClassVar

import pytest
from hf_models import build

import sparse_attn as sa
from sparse_attn import SinkLocal
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
        for name, method in demo.demo_methods().items():
            if method is not None:
                check = model_throughput.self_check(method, 9, 3, layers=2)
                assert check["ok"], (name, check)


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
        assert sl["prefill_speedup"] == pytest.approx(
            by[("dense", n)]["prefill_s"] / sl["prefill_s"], rel=1e-2
        )
    assert by[("sink_local", 200)]["density"] < by[("sink_local", 96)]["density"] < 1.0
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
    ]
    code = main(["bench", "throughput", "--quick", *model_args, "--json", str(path)])
    assert code == 0
    result = json.loads(path.read_text())
    rows = result["model"]["rows"]
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
    assert main(["bench", "throughput", "--model-only", "--json", str(path)]) == 2
    assert "--model-only needs --model" in capsys.readouterr().err

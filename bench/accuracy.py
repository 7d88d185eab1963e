"""Long-context accuracy of sparse attention on a real model: passkey, multi-key retrieval, perplexity.

Speed means nothing if the model stops finding what is in its context. ``run_accuracy`` runs every
method on the *same* prompts (built once per run from seeded keys) and reports, per method:

- passkey retrieval over a grid of lengths x needle depths x seeds (exact match of the first number);
- multi-key retrieval: several named keys in one prompt, one of them asked for (each in turn);
- perplexity per position bucket over long text (default: the Python standard library);
- the attention density the prefills really used (from ``sparse_attn.stats``) and dense fallbacks.

"Relative to dense" is the method's accuracy divided by the unpatched model's accuracy on the same
prompts. It is None when the dense model answered none of them: a ratio to zero says nothing, and a
method cannot be judged on prompts the model itself cannot solve. ``retained`` is the stricter view:
the fraction of the prompts dense got right that the method also got right.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import generation, harness
from .accuracy_report import (
    format_table,
    mean_or_none,
    passkey_grid,
    relative_accuracy,
    retained,
    task_summary,
)
from .generation import eos_token_ids, forward_density, layer_calls
from .passkey import QUESTION
from .perplexity import load_text, perplexity_by_position, text_token_ids
from .prompts import Prompt, multikey_prompt_tokens, multikey_question, passkey_prompt_tokens, random_key
from .scoring import exact_match, extract_integer, number_tokenization

SCHEMA_VERSION = 1
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_MAX_NEW_TOKENS = 8  # " 71432." is 7 tokens for a per-digit tokenizer; one spare
DEFAULT_PPL_BUCKETS = 8
DEFAULT_PPL_WINDOWS = 4  # one window mixes position with content; several average the content out
DEFAULT_MULTIKEY_KEYS = 4
REFERENCE = "dense"
DEFAULT_DECODE_TAIL = 64  # the CLI's default: at least the question goes through decode
HEAD_PREFILL = ("method", "dense")

__all__ = [
    "Case",
    "build_cases",
    "expand_densities",
    "format_table",
    "load_model",
    "relative_accuracy",
    "retained",
    "run_accuracy",
]


def load_model(spec: str) -> tuple[Any, Any]:
    """(model, tokenizer): ``"smollm2"`` loads the embedded SmolLM2-135M-Instruct (float32); anything
    else must be a local transformers checkpoint directory (there is no model hub here)."""
    if spec == "smollm2":
        from .smollm2 import load_smollm2

        return load_smollm2(torch.float32)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"model spec must be 'smollm2' or a local checkpoint directory, got {spec!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


@dataclass(frozen=True)
class Case:
    """One prompt of the grid; every method answers the same cases."""

    task: str  # "passkey" | "multikey"
    length: int
    depth: float  # requested depth of the asked needle
    seed: int
    prompt: Prompt


def build_cases(
    tokenizer: Any,
    lengths: Sequence[int],
    depths: Sequence[float],
    seeds: Sequence[int],
    multikey: bool,
    multikey_keys: int = DEFAULT_MULTIKEY_KEYS,
    with_passkey: bool = True,
) -> list[Case]:
    """The passkey grid (unless ``with_passkey`` is False) and, when ``multikey``, one multi-key
    prompt per length x seed x asked key.

    Everything is drawn from ``random.Random(seed)``: the passkeys in length x depth order, then one
    seed per length for the multi-key prompts (so their keys are not the passkeys again). The
    passkeys do not depend on ``multikey`` or ``multikey_keys``, and the multi-key prompts not on
    ``with_passkey`` (the passkeys are drawn either way).
    """
    passkey, multi = [], []
    for seed in seeds:
        rng = random.Random(seed)
        for length in lengths:
            for depth in depths:
                key = random_key(rng)
                if with_passkey:
                    prompt = passkey_prompt_tokens(tokenizer, key, length, depth)
                    passkey.append(Case("passkey", length, depth, seed, prompt))
        for length in lengths:
            sub_seed = rng.getrandbits(32)
            for q in range(multikey_keys if multikey else 0):
                prompt = multikey_prompt_tokens(
                    tokenizer, length, num_keys=multikey_keys, seed=sub_seed, query=q
                )
                multi.append(Case("multikey", length, (q + 0.5) / multikey_keys, seed, prompt))
    return passkey + multi


def _check_args(methods: Any, lengths: Any, depths: Any, seeds: Any, max_new_tokens: Any) -> dict[str, Any]:
    if not isinstance(methods, dict) or not methods or not all(isinstance(k, str) and k for k in methods):
        raise ValueError("methods must be a non-empty dict {name: method or None}")
    if REFERENCE in methods and methods[REFERENCE] is not None:
        raise ValueError(f"methods[{REFERENCE!r}] is reserved for the unpatched model and must be None")
    for name, ok in (("lengths", lambda x: isinstance(x, int) and not isinstance(x, bool) and x > 0),
                     ("depths", lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x <= 1),
                     ("seeds", lambda x: isinstance(x, int) and not isinstance(x, bool))):  # fmt: skip
        values = {"lengths": lengths, "depths": depths, "seeds": seeds}[name]
        if not values or not all(ok(v) for v in values):
            raise ValueError(f"{name} must be a non-empty list of valid values, got {values!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    # the unpatched model is the reference of every ratio: run it first, add it when it is missing
    ref = next((k for k, v in methods.items() if v is None), None)
    ordered = {REFERENCE: None} if ref is None else {ref: None}
    ordered.update({k: v for k, v in methods.items() if k not in ordered})
    return ordered


def _check_context(model: Any, lengths: list[int], max_new_tokens: int, ppl_tokens: int | None) -> None:
    # Past its trained positions a model's answers say nothing about the attention method.
    limit = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return
    if max(lengths) + max_new_tokens > limit:
        raise ValueError(
            f"lengths: the longest prompt ({max(lengths)} tokens) plus max_new_tokens={max_new_tokens} "
            f"exceeds the model's max_position_embeddings={limit}; use lengths <= {limit - max_new_tokens}"
        )
    if ppl_tokens is not None and ppl_tokens > limit:
        raise ValueError(f"ppl_tokens={ppl_tokens} exceeds the model's max_position_embeddings={limit}")


def _method_record(method: object) -> dict[str, Any]:
    if method is None:
        return {"method": "dense", "patched": False}
    if isinstance(method, str):
        return {"method": "preset", "preset": method, "patched": True}
    return {
        "method": getattr(method, "name", type(method).__name__),
        "params": harness.method_params(method),
        "patched": True,
    }


def _progress(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError as exc:
        raise ImportError("progress bars need tqdm: pip install tqdm (or pass progress=False)") from exc
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=True, dynamic_ncols=True)


# --- how a prompt is split between prefill and decode ------------------------------------------------


def question_text(case: Case) -> str:
    """The question that ends a case's prompt."""
    return QUESTION if case.task == "passkey" else multikey_question(str(case.prompt.query))


def question_tokens(tokenizer: Any, case: Case) -> int:
    """Tokens of the prompt that belong to its closing question (counted on the final text)."""
    text, question = case.prompt.text, question_text(case)
    if not text.endswith(question):
        raise ValueError(f"the {case.task} prompt does not end with its question {question!r}")
    before = len(tokenizer(text[: len(text) - len(question)])["input_ids"])
    return case.prompt.num_tokens - before


def tail_length(num_tokens: int, question: int, decode_tail: int) -> int:
    """Prompt tokens fed through the decode path: 0 when ``decode_tail`` is 0 (one prefill of the whole
    prompt), else ``decode_tail`` but at least the question, and never the whole prompt (the head
    keeps one token)."""
    if decode_tail == 0:
        return 0
    return max(0, min(max(decode_tail, question), num_tokens - 1))


def _dynamic_of(method: object) -> Any:
    """The dynamic method of ``method`` (itself, or a config's default), or None."""
    from sparse_attn.methods.dynamic import DynamicMethod

    if isinstance(method, DynamicMethod):
        return method
    default = getattr(method, "default", None)  # a SparseAttentionConfig with a dynamic default
    return default if isinstance(default, DynamicMethod) else None


def head_prefill_label(method: object, head_prefill: str) -> str:
    """How a method's prompt head is prefilled: the shared dense prefill, or its own prefill path."""
    if head_prefill == "dense":
        return "dense (shared: the unpatched model, once per prompt)"
    if method is None:
        return "dense (unpatched)"
    dyn = _dynamic_of(method)
    if dyn is not None:
        label = dyn.prefill_label()
        return f"{label} (the method's own prefill{', by design' if label != dyn.name else ''})"
    return "the method's prefill layout"


def expand_densities(
    methods: dict[str, object | None], densities: Sequence[float]
) -> dict[str, object | None]:
    """Each dynamic method of ``methods`` once per density (``name@0.05``, budget by density); dense
    and static methods, and dynamic ones without a budget (MagicPIG), once, unchanged. The order: as
    given, densities ascending within a method."""
    if not densities:
        return dict(methods)
    ds = sorted({float(d) for d in densities})
    if not all(0.0 < d <= 1.0 for d in ds):
        raise ValueError(f"densities must lie in (0, 1], got {list(densities)!r}")
    out: dict[str, object | None] = {}
    for name, method in methods.items():
        dyn = _dynamic_of(method)
        if dyn is None or not dyn.has_budget:
            out[name] = method
            continue
        for d in ds:
            out[f"{name}@{d:g}"] = dataclasses.replace(dyn, density=d, tokens=None)  # type: ignore[type-var]
    return out


def _sweep_record(methods: dict[str, object | None]) -> dict[str, Any] | None:
    """{family: [{"name", "density"}]} for the ``name@density`` entries (None when there are none)."""
    fam: dict[str, list[dict[str, Any]]] = {}
    for name, method in methods.items():
        dyn = _dynamic_of(method)
        if dyn is None or "@" not in name:
            continue
        family = name.rsplit("@", 1)[0]
        fam.setdefault(family, []).append({"name": name, "method": dyn.name, "density": dyn.density})
    return fam or None


# --- running the cases --------------------------------------------------------------------------------


@dataclass
class _MethodRun:
    """One method's results, accumulated case by case (every method answers each case in turn)."""

    name: str
    method: object
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: str = "ok"
    fallbacks: dict[str, int] = dataclasses.field(default_factory=dict)
    sparse_calls: int = 0
    dense_calls: int = 0
    seconds: float = 0.0
    perplexity: dict[str, Any] | None = None

    @property
    def patched(self) -> bool:
        return self.method is not None

    def add_stats(self, before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
        if before is None or after is None:
            return
        for reason, n in after["fallbacks"].items():
            self.fallbacks[reason] = (
                self.fallbacks.get(reason, 0) + int(n) - int(before["fallbacks"].get(reason, 0))
            )
        self.sparse_calls += int(after["sparse_calls"]) - int(before["sparse_calls"])
        self.dense_calls += int(after["dense_calls"]) - int(before["dense_calls"])

    def fail(self, exc: BaseException) -> None:
        self.status = "error: " + harness.short_error(exc)


def _stats(model: Any, patched: bool) -> dict[str, Any] | None:
    import sparse_attn

    return copy.deepcopy(sparse_attn.stats(model)) if patched else None


def _answer_case(
    model: Any,
    tokenizer: Any,
    run: _MethodRun,
    case: Case,
    ids: torch.Tensor,
    tail: int,
    shared: tuple[Any, torch.Tensor] | None,
    max_new_tokens: int,
    eos: set[int],
) -> None:
    """One method answers one case: its head prefill (or a copy of the shared one), the tail through
    decode, then greedy generation; the row goes to ``run.rows``."""
    import sparse_attn

    ctx: AbstractContextManager[Any] = sparse_attn.patch(model, run.method) if run.patched else nullcontext()
    with ctx:
        before = _stats(model, run.patched)
        density: list[float | None] = [1.0]
        calls = layer_calls(before) if before is not None else {}

        def read_density() -> None:
            if run.patched:
                density[0] = forward_density(calls, sparse_attn.stats(model))

        n = ids.numel()
        if shared is not None:
            cache, logits = generation.copy_cache(shared[0]), shared[1]
        else:
            cache, logits = generation.prefill_head(model, ids[: n - tail])
        steps: list[float] = []
        new, cut = generation.continue_greedy(
            model, cache, logits, ids[n - tail :], max_new_tokens, eos, read_density, steps
        )
        del cache
        run.add_stats(before, _stats(model, run.patched))
    text = tokenizer.decode(new, skip_special_tokens=True)
    run.rows.append({
        "task": case.task, "method": run.name, "length": case.length, "depth": case.depth,
        "measured_depth": round(case.prompt.depth, 4), "seed": case.seed,
        "prompt_tokens": case.prompt.num_tokens, "prefill_tokens": n - tail, "decode_tokens": tail,
        "key": case.prompt.answer, "query": case.prompt.query,
        "output": text, "answer": extract_integer(text), "truncated": cut,
        "correct": exact_match(text, case.prompt.answer, truncated=cut), "density": density[0],
        "decode_steps": len(steps),
        # the median, so that a first step's one-time cost (e.g. side data built over the shared
        # dense head) does not count as the per-token cost
        "decode_ms_per_token": round(statistics.median(steps) * 1000.0, 3) if steps else None,
    })  # fmt: skip


def _run_cases(
    model: Any,
    tokenizer: Any,
    runs: list[_MethodRun],
    cases: list[Case],
    max_new_tokens: int,
    decode_tail: int,
    head_prefill: str,
    bar: Any,
) -> float:
    """Every method answers every case, case by case (so one dense head prefill can serve them all);
    a method that raises is marked and skipped from then on. Returns the seconds of shared prefills."""
    eos = eos_token_ids(model, tokenizer)
    shared_s = 0.0
    for case in cases:
        ids = torch.tensor(tokenizer(case.prompt.text)["input_ids"], dtype=torch.long)
        tail = tail_length(ids.numel(), question_tokens(tokenizer, case), decode_tail)
        shared = None
        if head_prefill == "dense" and any(r.status == "ok" for r in runs):
            t0 = time.perf_counter()
            shared = generation.prefill_head(model, ids[: ids.numel() - tail])
            shared_s += time.perf_counter() - t0
        for run in runs:
            if bar is not None:
                bar.set_description(run.name)
            if run.status == "ok":
                t0 = time.perf_counter()
                try:
                    _answer_case(model, tokenizer, run, case, ids, tail, shared, max_new_tokens, eos)
                except Exception as exc:  # one failing method must not cost the others' results
                    run.fail(exc)
                run.seconds += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
        del shared
    return shared_s


def _run_perplexity(
    model: Any, run: _MethodRun, ppl_ids: torch.Tensor, ppl_window: int, ppl_buckets: int
) -> None:
    import sparse_attn

    if run.status != "ok":
        return
    t0 = time.perf_counter()
    try:
        ctx: AbstractContextManager[Any] = (
            sparse_attn.patch(model, run.method) if run.patched else nullcontext()
        )
        with ctx:
            before = _stats(model, run.patched)
            calls = layer_calls(before) if before is not None else {}
            ppl = perplexity_by_position(model, ppl_ids, ppl_window, ppl_buckets)
            ppl["density"] = forward_density(calls, sparse_attn.stats(model)) if run.patched else 1.0
            run.add_stats(before, _stats(model, run.patched))
        run.perplexity = ppl
    except Exception as exc:  # one failing method must not cost the others' results
        run.fail(exc)
    run.seconds += time.perf_counter() - t0


def run_accuracy(
    model: Any,
    tokenizer: Any,
    methods: dict[str, object | None],
    lengths: Sequence[int],
    depths: Sequence[float] = DEFAULT_DEPTHS,
    seeds: Sequence[int] = (0,),
    multikey: bool = True,
    perplexity: bool = True,
    text_path: str | Path | None = None,
    progress: bool = True,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    *,
    ppl_tokens: int | None = None,
    ppl_windows: int = DEFAULT_PPL_WINDOWS,
    ppl_buckets: int = DEFAULT_PPL_BUCKETS,
    multikey_keys: int = DEFAULT_MULTIKEY_KEYS,
    decode_tail: int = 0,
    head_prefill: str = "method",
    passkey: bool = True,
) -> dict[str, Any]:
    """Run every method of ``methods`` ({name: method, preset, config or None}; None is the unpatched
    model, added as "dense" when absent because every ratio needs it) over the same prompts.

    ``lengths`` are prompt sizes in tokens of ``tokenizer``; the passkey grid is lengths x ``depths``
    x ``seeds``; ``multikey`` adds one prompt per length x seed x asked key (``multikey_keys`` keys);
    ``perplexity`` scores ``ppl_windows`` consecutive windows of ``ppl_tokens`` tokens (default: the
    longest of ``lengths``, so the windows reach as far as the prompts) of ``text_path`` (default:
    Python's standard library), averaged per position, in ``ppl_buckets`` position buckets.
    ``decode_tail`` > 0 feeds the last ``decode_tail`` prompt tokens (at least the question) through
    the cached decode path one token at a time, for every method alike, so a method that selects only
    at decode decides the answer (0: the whole prompt in one prefill). ``head_prefill`` is how the rest
    (the head) runs: "method" (each method's own prefill path) or "dense" (one unpatched prefill per
    prompt, copied for every method: what decode-only methods run anyway, and TopK then selects only
    at decode). Each method's split is recorded (``split`` in its summary, ``prefill_tokens`` and
    ``decode_tokens`` per row).
    A method that raises gets ``status: "error: ..."`` and the others still run. The model must not be
    patched already. Returns the result document (``schema_version``, ``env`` first; per-method
    summaries under "methods"; one row per prompt and method under "rows").
    """
    import sparse_attn

    methods = _check_args(methods, lengths, depths, seeds, max_new_tokens)
    if isinstance(decode_tail, bool) or not isinstance(decode_tail, int) or decode_tail < 0:
        raise ValueError(f"decode_tail must be an int >= 0, got {decode_tail!r}")
    if head_prefill not in HEAD_PREFILL:
        raise ValueError(f"head_prefill must be one of {HEAD_PREFILL}, got {head_prefill!r}")
    lengths, depths, seeds = list(lengths), [float(d) for d in depths], list(seeds)
    if ppl_tokens is None:
        ppl_tokens = max(lengths)
    _check_context(model, lengths, max_new_tokens, ppl_tokens if perplexity else None)
    try:
        sparse_attn.stats(model)
    except sparse_attn.ConfigError:
        pass  # not patched: good, the reference must be the model's own attention
    else:
        raise ValueError("model is already patched with sparse_attn: unpatch it before run_accuracy")
    t0 = time.perf_counter()
    env = harness.environment()
    if not passkey and not multikey:
        raise ValueError("nothing to run: passkey and multikey are both off")
    cases = build_cases(tokenizer, lengths, depths, seeds, multikey, multikey_keys, with_passkey=passkey)
    ppl_ids, source = None, None
    if perplexity:
        text, source = load_text(text_path)
        for arg, value, low in (("ppl_tokens", ppl_tokens, 2), ("ppl_windows", ppl_windows, 1),
                                ("ppl_buckets", ppl_buckets, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg} must be an int >= {low}, got {value!r}")
        if ppl_buckets > ppl_tokens - 1:
            raise ValueError(f"ppl_buckets={ppl_buckets} exceeds the {ppl_tokens - 1} scored positions")
        ppl_ids = text_token_ids(tokenizer, text, ppl_tokens * ppl_windows)
    first_key = cases[0].prompt.answer
    tokenization = number_tokenization(tokenizer, first_key)
    needed = max(len(x or first_key) for x in tokenization.ids) + 2  # space + key + one token after it
    if max_new_tokens < needed:
        warnings.warn(
            f"max_new_tokens={max_new_tokens} leaves no room to finish a key ({needed} tokens needed with "
            "this tokenizer): answers cut by the budget score as wrong",
            stacklevel=2,
        )
    runs = [_MethodRun(name, method) for name, method in methods.items()]
    bar = _progress(progress, len(cases) * len(runs) + (len(runs) if ppl_ids is not None else 0), "accuracy")
    try:
        shared_s = _run_cases(model, tokenizer, runs, cases, max_new_tokens, decode_tail, head_prefill, bar)
        if ppl_ids is not None:
            for run in runs:
                if bar is not None:
                    bar.set_description(f"{run.name} ppl")
                _run_perplexity(model, run, ppl_ids, ppl_tokens, ppl_buckets)
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    summaries: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for run in runs:
        st_ok = run.status == "ok"
        summaries[run.name] = {
            **_method_record(run.method),
            "status": run.status,
            "split": {
                "head": head_prefill_label(run.method, head_prefill),
                "decode_tail": decode_tail,
                "tail_tokens": sorted({r["decode_tokens"] for r in run.rows}),
                "answer_decided_by": "decode path" if decode_tail else "prefill",
            },
            "fallbacks": sum(run.fallbacks.values()),
            "fallbacks_by_reason": run.fallbacks,
            "sparse_calls": run.sparse_calls if run.patched else 0,
            "dense_calls": run.dense_calls if run.patched else 0,
            "seconds": round(run.seconds, 2),
            "rows": run.rows,
        }
        if run.perplexity is not None:
            summaries[run.name]["perplexity"] = run.perplexity
        if not st_ok:
            summaries[run.name].update(sparse_calls=None, dense_calls=None)
        rows.extend(run.rows)
    ref = summaries[next(iter(methods))]["rows"]
    for s in summaries.values():
        own = s.pop("rows")
        pk_rows = [r for r in own if r["task"] == "passkey"]
        multi = [r for r in own if r["task"] == "multikey"]
        ok = s["status"] == "ok"
        s["passkey"] = (
            task_summary(pk_rows, [r for r in ref if r["task"] == "passkey"], lengths)
            if ok and passkey
            else None
        )
        if s["passkey"] is not None:
            s["passkey"]["grid"] = passkey_grid(pk_rows, lengths, depths)
        s["multikey"] = (
            task_summary(multi, [r for r in ref if r["task"] == "multikey"], lengths)
            if ok and multikey
            else None
        )
        s["density"] = mean_or_none([r["density"] for r in own]) if ok else None
        s.setdefault("perplexity", None)
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "accuracy",
        "device": str(next(model.parameters()).device),
        "env": env,
        "config": {
            "model": getattr(model.config, "_name_or_path", None)
            or getattr(model.config, "model_type", None),
            "methods": {name: _method_record(m) for name, m in methods.items()},
            "reference": next(iter(methods)),
            "lengths": lengths,
            "depths": depths,
            "seeds": seeds,
            "max_new_tokens": max_new_tokens,
            "passkey": {"enabled": passkey},
            "multikey": {"enabled": multikey, "keys": multikey_keys},
            "perplexity": {
                "enabled": perplexity,
                "tokens": ppl_tokens,
                "windows": ppl_windows,
                "buckets": ppl_buckets,
                "text": source,
            },
            "decode_tail": decode_tail,
            "head_prefill": head_prefill,
            "shared_prefill_s": round(shared_s, 2) if head_prefill == "dense" else None,
            "sweep": _sweep_record(methods),
            "number_tokenization": tokenization.to_dict(),
            "max_new_tokens_enough": max_new_tokens >= needed,
        },
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "methods": summaries,
        "rows": rows,
    }

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

import random
import sys
import time
import warnings
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import harness
from .accuracy_report import (
    format_table,
    mean_or_none,
    passkey_grid,
    relative_accuracy,
    retained,
    task_summary,
)
from .generation import eos_token_ids, forward_density, greedy_generate, layer_calls
from .perplexity import load_text, perplexity_by_position, text_token_ids
from .prompts import Prompt, multikey_prompt_tokens, passkey_prompt_tokens, random_key
from .scoring import exact_match, extract_integer, number_tokenization

SCHEMA_VERSION = 1
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_MAX_NEW_TOKENS = 8  # " 71432." is 7 tokens for a per-digit tokenizer; one spare
DEFAULT_PPL_BUCKETS = 8
DEFAULT_PPL_WINDOWS = 4  # one window mixes position with content; several average the content out
DEFAULT_MULTIKEY_KEYS = 4
REFERENCE = "dense"

__all__ = [
    "Case",
    "build_cases",
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
) -> list[Case]:
    """The passkey grid and, when ``multikey``, one multi-key prompt per length x seed x asked key.

    Everything is drawn from ``random.Random(seed)``: the passkeys in length x depth order, then one
    seed per length for the multi-key prompts (so their keys are not the passkeys again). The
    passkeys do not depend on ``multikey`` or ``multikey_keys``.
    """
    passkey, multi = [], []
    for seed in seeds:
        rng = random.Random(seed)
        for length in lengths:
            for depth in depths:
                prompt = passkey_prompt_tokens(tokenizer, random_key(rng), length, depth)
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


def _run_method(
    model: Any,
    tokenizer: Any,
    name: str,
    method: object,
    cases: list[Case],
    ppl_ids: torch.Tensor | None,
    ppl_window: int,
    ppl_buckets: int,
    max_new_tokens: int,
    progress: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    import sparse_attn

    patched = method is not None
    eos = eos_token_ids(model, tokenizer)
    bar = _progress(progress, len(cases) + (ppl_ids is not None), name)
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {"status": "ok"}
    t0 = time.perf_counter()
    try:
        # inside the try: a method that does not fit the model (ConfigError) is that method's error
        ctx: AbstractContextManager[Any] = sparse_attn.patch(model, method) if patched else nullcontext()
        with ctx:
            for case in cases:
                density: list[float | None] = [1.0]
                before = layer_calls(sparse_attn.stats(model)) if patched else {}

                def read_density(before: dict[int, tuple[int, int]] = before, out: list = density) -> None:
                    if patched:
                        out[0] = forward_density(before, sparse_attn.stats(model))

                ids = torch.tensor(tokenizer(case.prompt.text)["input_ids"], dtype=torch.long)
                new, cut = greedy_generate(model, ids, max_new_tokens, eos, read_density)
                text = tokenizer.decode(new, skip_special_tokens=True)
                rows.append({
                    "task": case.task, "method": name, "length": case.length, "depth": case.depth,
                    "measured_depth": round(case.prompt.depth, 4), "seed": case.seed,
                    "prompt_tokens": case.prompt.num_tokens, "key": case.prompt.answer, "query": case.prompt.query,
                    "output": text, "answer": extract_integer(text), "truncated": cut,
                    "correct": exact_match(text, case.prompt.answer, truncated=cut), "density": density[0],
                })  # fmt: skip
                if bar is not None:
                    bar.update(1)
            if ppl_ids is not None:
                before = layer_calls(sparse_attn.stats(model)) if patched else {}
                summary["perplexity"] = perplexity_by_position(model, ppl_ids, ppl_window, ppl_buckets)
                summary["perplexity"]["density"] = (
                    forward_density(before, sparse_attn.stats(model)) if patched else 1.0
                )
                if bar is not None:
                    bar.update(1)
            st = (
                sparse_attn.stats(model)
                if patched
                else {"fallbacks": {}, "sparse_calls": 0, "dense_calls": 0}
            )
    except Exception as exc:  # one failing method must not cost the others' results
        summary["status"] = "error: " + harness.short_error(exc)
        st = {"fallbacks": {}, "sparse_calls": None, "dense_calls": None}
    finally:
        if bar is not None:
            bar.close()
    summary.update(
        fallbacks=sum(st["fallbacks"].values()), fallbacks_by_reason=st["fallbacks"],
        sparse_calls=st["sparse_calls"], dense_calls=st["dense_calls"],
        seconds=round(time.perf_counter() - t0, 2),
    )  # fmt: skip
    return summary, rows


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
) -> dict[str, Any]:
    """Run every method of ``methods`` ({name: method, preset, config or None}; None is the unpatched
    model, added as "dense" when absent because every ratio needs it) over the same prompts.

    ``lengths`` are prompt sizes in tokens of ``tokenizer``; the passkey grid is lengths x ``depths``
    x ``seeds``; ``multikey`` adds one prompt per length x seed x asked key (``multikey_keys`` keys);
    ``perplexity`` scores ``ppl_windows`` consecutive windows of ``ppl_tokens`` tokens (default: the
    longest of ``lengths``, so the windows reach as far as the prompts) of ``text_path`` (default:
    Python's standard library), averaged per position, in ``ppl_buckets`` position buckets.
    A method that raises gets ``status: "error: ..."`` and the others still run. The model must not be
    patched already. Returns the result document (``schema_version``, ``env`` first; per-method
    summaries under "methods"; one row per prompt and method under "rows").
    """
    import sparse_attn

    methods = _check_args(methods, lengths, depths, seeds, max_new_tokens)
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
    cases = build_cases(tokenizer, lengths, depths, seeds, multikey, multikey_keys)
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
    summaries: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    for name, method in methods.items():
        summary, method_rows = _run_method(
            model, tokenizer, name, method, cases, ppl_ids, ppl_tokens, ppl_buckets, max_new_tokens, progress
        )
        summaries[name] = {**_method_record(method), **summary, "rows": method_rows}
        rows.extend(method_rows)
    ref = summaries[next(iter(methods))]["rows"]
    for s in summaries.values():
        own = s.pop("rows")
        passkey = [r for r in own if r["task"] == "passkey"]
        multi = [r for r in own if r["task"] == "multikey"]
        ok = s["status"] == "ok"
        s["passkey"] = (
            task_summary(passkey, [r for r in ref if r["task"] == "passkey"], lengths) if ok else None
        )
        if s["passkey"] is not None:
            s["passkey"]["grid"] = passkey_grid(passkey, lengths, depths)
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
            "multikey": {"enabled": multikey, "keys": multikey_keys},
            "perplexity": {
                "enabled": perplexity,
                "tokens": ppl_tokens,
                "windows": ppl_windows,
                "buckets": ppl_buckets,
                "text": source,
            },
            "number_tokenization": tokenization.to_dict(),
            "max_new_tokens_enough": max_new_tokens >= needed,
        },
        "wall_time_s": round(time.perf_counter() - t0, 2),
        "methods": summaries,
        "rows": rows,
    }

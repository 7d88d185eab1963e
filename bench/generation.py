"""Greedy decoding with a hook after the prefill, and the attention density a prefill really used.

``model.generate`` hides the boundary between prefill and decode, but a patched model's
``stats(model)["layers"]`` keep only each layer's *last* layout: read after ``generate`` they would
describe a one-row decode step, not the long prefill the benchmark is about. This loop calls back
right after the forward that decides the first answer token, where the layouts are the prompt's own.

A prompt can be split: its head through one prefill forward, its last ``decode_tail`` tokens through
the cached decode path one token at a time (``prefill_head`` + ``continue_greedy``). A method that
selects only at decode (Quest) is judged by its own selection only then: with the whole prompt
prefilled densely the first answer token would come from dense attention.
"""

from __future__ import annotations

import copy
import inspect
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """Token ids that end a generation: the tokenizer's EOS and the model's generation config EOS."""
    ids: set[int] = set()
    candidates: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    gen = getattr(model, "generation_config", None)
    candidates.append(getattr(gen, "eos_token_id", None))
    for c in candidates:
        if isinstance(c, int):
            ids.add(c)
        elif isinstance(c, Iterable):
            ids.update(int(x) for x in c)
    return ids


@torch.inference_mode()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    on_prefill: Callable[[], None] | None = None,
) -> tuple[list[int], bool]:
    """Greedy tokens after a 1-D prompt ``input_ids`` (with the KV cache), and whether the token
    budget cut the generation (False when an EOS token ended it; the EOS is not returned)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if input_ids.dim() != 1 or input_ids.numel() < 1:
        raise ValueError(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=input_ids.to(device)[None], use_cache=True, **extra)
    if on_prefill is not None:
        on_prefill()
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(out.logits[0, -1].argmax())
        if token in eos_ids:
            return new, False
        new.append(token)
        if len(new) == max_new_tokens:
            break
        step = torch.tensor([[token]], device=device)
        out = model(input_ids=step, past_key_values=out.past_key_values, use_cache=True, **extra)
    return new, True


def _extra(model: Any) -> dict[str, Any]:
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def prefill_head(model: Any, head_ids: torch.Tensor) -> tuple[Any, torch.Tensor]:
    """One prefill forward of the 1-D ``head_ids``: (KV cache, logits of the last position [V])."""
    if head_ids.dim() != 1 or head_ids.numel() < 1:
        raise ValueError(f"head_ids must be a non-empty 1-D tensor, got shape {tuple(head_ids.shape)}")
    device = next(model.parameters()).device
    out = model(input_ids=head_ids.to(device)[None], use_cache=True, **_extra(model))
    return out.past_key_values, out.logits[0, -1]


def copy_cache(cache: Any) -> Any:
    """An independent copy of a KV cache (the shared head prefill is continued by several methods)."""
    return copy.deepcopy(cache)


@torch.inference_mode()
def continue_greedy(
    model: Any,
    cache: Any,
    last_logits: torch.Tensor,
    tail_ids: torch.Tensor,
    max_new_tokens: int,
    eos_ids: set[int] | frozenset[int] = frozenset(),
    on_answer_step: Callable[[], None] | None = None,
    step_seconds: list[float] | None = None,
) -> tuple[list[int], bool]:
    """Feed ``tail_ids`` (1-D, maybe empty) one token at a time through the decode path of a model
    whose ``cache`` holds the prompt's head (``last_logits``: the head's last-position logits), then
    decode greedily as ``greedy_generate`` does. ``on_answer_step`` runs right after the forward that
    decides the first answer token (the last tail token's; the head's when the tail is empty).
    ``step_seconds``, when given, gets the wall time of every decode forward (tail and answer) appended:
    the method's decode cost at this context length, measured on the steps that decide the answer.
    ``cache`` is extended in place."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    device = next(model.parameters()).device
    extra = _extra(model)

    def forward(token: int) -> tuple[Any, torch.Tensor]:
        t0 = time.perf_counter()
        ids = torch.tensor([[token]], device=device)
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, **extra)
        if step_seconds is not None:
            if out.logits.is_cuda:  # kernels run asynchronously: wait for them before reading the clock
                torch.cuda.synchronize()
            step_seconds.append(time.perf_counter() - t0)
        return out.past_key_values, out.logits[0, -1]

    logits = last_logits
    for t in tail_ids.tolist():
        cache, logits = forward(int(t))
    if on_answer_step is not None:
        on_answer_step()
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(logits.argmax())
        if token in eos_ids:
            return new, False
        new.append(token)
        if len(new) == max_new_tokens:
            break
        cache, logits = forward(token)
    return new, True


def layer_calls(stats: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """(calls, sparse_calls) per layer from ``sparse_attn.stats(model)``: the snapshot taken before
    a forward, to tell afterwards which layers ran and which of them ran sparse."""
    return {int(i): (int(s["calls"]), int(s["sparse_calls"])) for i, s in stats["layers"].items()}


def forward_density(before: dict[int, tuple[int, int]], stats: dict[str, Any]) -> float | None:
    """Mean attention density over the layers that ran since ``before``: a layer that ran sparse
    counts its layout's density, one that ran dense (a dense layer or a fallback) counts 1.0.
    None when no layer ran through the patch."""
    values = []
    for i, s in stats["layers"].items():
        calls, sparse = before.get(int(i), (0, 0))
        if int(s["calls"]) == calls:
            continue
        ran_sparse = int(s["sparse_calls"]) > sparse and s["density"] is not None
        values.append(float(s["density"]) if ran_sparse else 1.0)
    return sum(values) / len(values) if values else None

"""MagicPIG calibration: the mean post-RoPE key per layer and KV head (the keys' centres).

MagicPIG hashes ``k - c`` rather than ``k``: post-RoPE keys share a large common component (their
mean), which squeezes the angles between a query and the keys together, so the SimHash collisions
tell keys apart poorly. The paper centres by the current prompt's mean key; a centre calibrated once
keeps the side data a pure function of the key (``sparse_attn.methods.magicpig``). The keys are the
ones Loki's calibration reads (``keys.collect_windows``), so the two artifacts of a model can come
from the same text.

Artifact (``sparse_attn.artifact``, kind "magicpig", written by ``save_centres``): ``centres``
[L, Hkv, D] float32. The sidecar names the model and the command that made it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..methods.magicpig import save_centres
from .keys import KeyStats, collect_windows, key_means


def calibrate_magicpig(
    model: Any,
    token_ids_or_texts: Iterable[Sequence[int] | str],
    *,
    tokenizer: Any | None = None,
    seq_len: int = 2048,
    max_tokens: int | None = None,
    out: str | Path | None = None,
    command: str = "sparse_attn.calibration.calibrate_magicpig(...)",
    meta: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, KeyStats]:
    """Calibrate MagicPIG's centres for ``model`` (a transformers causal LM) on token id sequences or
    texts.

    Returns (centres [L, Hkv, D] float32, key sums); with ``out`` also writes the artifact
    ``out``.{safetensors,json} recording ``command`` and ``meta``. ``progress`` gets the tokens of
    each window as it runs."""
    stats, info = collect_windows(model, token_ids_or_texts, tokenizer, seq_len, max_tokens, progress)
    centres = key_means(stats).float().contiguous()
    if out is not None:
        save_centres(out, centres, stats.model, command, {**info, **(meta or {})})
    return centres, stats

"""Loki calibration: principal directions of a model's post-RoPE keys per layer and KV head.

The keys are *not* centred: Loki approximates the dot products ``q.k`` themselves, and the rank-r
subspace that loses the least of them (for queries spread in all directions) is spanned by the top
eigenvectors of the uncentred second moment ``E[k k^T]``; centring would fit ``k - mean`` and could
drop the mean direction, which carries a large, shared part of every key (Loki keeps the raw
post-rotary keys' principal components). ``explained[..., i]`` is then the share of the keys' energy
``sum ||k||^2`` that the first i + 1 directions keep, exactly what the projection reconstructs on the
calibration keys.

Artifact (``sparse_attn.artifact``, kind "loki"): ``basis`` [L, Hkv, D, D] float32, orthonormal
columns sorted by decreasing eigenvalue (column i is direction i); ``explained`` [L, Hkv, D] float32,
cumulative. The sidecar names the model and the command that made it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..artifact import save_artifact
from .keys import KeyStats, collect_windows


def principal_directions(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis [..., D, D], cumulative explained share [..., D]) of symmetric PSD matrices [..., D, D]:
    eigenvectors as columns, by decreasing eigenvalue; each column's sign makes its largest-magnitude
    entry positive (eigh leaves signs arbitrary; this makes the artifact reproducible)."""
    evals, evecs = torch.linalg.eigh(second_moment.double())
    evals, evecs = evals.flip(-1).clamp(min=0), evecs.flip(-1)
    peak = evecs.abs().argmax(-2, keepdim=True)
    sign = torch.sign(evecs.gather(-2, peak))
    evecs = evecs * torch.where(sign == 0, torch.ones_like(sign), sign)
    total = evals.sum(-1, keepdim=True)
    explained = evals.cumsum(-1) / torch.where(total > 0, total, torch.ones_like(total))
    return evecs, explained


def loki_tensors(stats: KeyStats) -> dict[str, torch.Tensor]:
    """The Loki artifact's tensors from collected key sums."""
    basis, explained = principal_directions(stats.second_moment())
    return {"basis": basis.float().contiguous(), "explained": explained.float().contiguous()}


def calibrate_loki(
    model: Any,
    token_ids_or_texts: Iterable[Sequence[int] | str],
    *,
    tokenizer: Any | None = None,
    seq_len: int = 2048,
    max_tokens: int | None = None,
    out: str | Path | None = None,
    command: str = "sparse_attn.calibration.calibrate_loki(...)",
    meta: dict[str, Any] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, torch.Tensor], KeyStats]:
    """Calibrate a Loki basis for ``model`` (a transformers causal LM) on token id sequences or texts.

    Returns (tensors, key sums); with ``out`` also writes the artifact ``out``.{safetensors,json}
    recording ``command`` and ``meta``. ``progress`` gets the tokens of each window as it runs."""
    stats, info = collect_windows(model, token_ids_or_texts, tokenizer, seq_len, max_tokens, progress)
    tensors = loki_tensors(stats)
    if out is not None:
        save_artifact(out, "loki", tensors, stats.model, command, {**info, "centred": False, **(meta or {})})
    return tensors, stats

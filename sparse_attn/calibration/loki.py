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
from ..errors import ConfigError
from .keys import KeyStats, collect_key_stats


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


def token_windows(
    token_ids_or_texts: Iterable[Sequence[int] | str],
    tokenizer: Any | None,
    seq_len: int,
    max_tokens: int | None,
) -> list[list[int]]:
    """The calibration sequences: every source tokenised (texts need ``tokenizer``), concatenated in
    order and cut into windows of ``seq_len`` tokens, at most ``max_tokens`` in all (a last shorter
    window is kept)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ConfigError(f"seq_len must be a positive int, got {seq_len!r}")
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0
    ):
        raise ConfigError(f"max_tokens must be a positive int or None, got {max_tokens!r}")
    stream: list[int] = []
    for item in token_ids_or_texts:
        if isinstance(item, str):
            if tokenizer is None:
                raise ConfigError("texts need a tokenizer: pass tokenizer= or token ids")
            stream.extend(int(t) for t in tokenizer(item, add_special_tokens=False)["input_ids"])
        else:
            stream.extend(int(t) for t in torch.as_tensor(item).reshape(-1).tolist())
        if max_tokens is not None and len(stream) >= max_tokens:
            break
    if max_tokens is not None:
        stream = stream[:max_tokens]
    if not stream:
        raise ConfigError("no calibration tokens: the sources are empty")
    return [stream[i : i + seq_len] for i in range(0, len(stream), seq_len)]


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
    windows = token_windows(token_ids_or_texts, tokenizer, seq_len, max_tokens)
    stats = collect_key_stats(model, windows, progress=progress)
    tensors = loki_tensors(stats)
    if out is not None:
        info = {"tokens": stats.tokens(), "seq_len": seq_len, "windows": len(windows), "centred": False}
        save_artifact(out, "loki", tensors, stats.model, command, {**info, **(meta or {})})
    return tensors, stats

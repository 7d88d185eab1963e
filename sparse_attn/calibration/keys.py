"""Streaming statistics of a Hugging Face model's post-RoPE keys, per layer and KV head.

The keys are read where the sparse patch reads them: an attention function registered with
transformers' ``AttentionInterface`` receives k ``[B, Hkv, S, D]`` after the rotary embedding and
before any GQA repeat. ``collect_key_stats`` registers such a function for the duration of the run
(it records the keys, then calls the model's own ``sdpa`` attention, so the forward is unchanged),
runs the model over the token sequences without a cache and restores the model's implementation.
Never a copied model forward.

Only sums are kept (float64): the key count, the sum of keys and the sum of their outer products per
(layer, KV head), so memory is O(layers x KV heads x D^2) whatever the number of tokens. From them:
``means`` (MagicPIG's centres) and ``second_moment`` (Loki's PCA). ``collect_windows`` cuts the
calibration text into windows (``token_windows``) and collects them: what every calibration shares.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..artifact import ModelShape
from ..errors import ConfigError

ATTN_IMPLEMENTATION = "sparse_attn_calibrate"

# The registered function finds the run's statistics through this table (id of every module of a
# model under calibration -> its sums), as transformers calls it without any handle of ours.
_ACTIVE: dict[int, KeyStats] = {}
_ACTIVE_LOCK = threading.Lock()


@dataclass(frozen=True)
class KeyStats:
    """Sums over the collected keys: ``count`` [L, Hkv], ``sum`` [L, Hkv, D] and ``outer``
    [L, Hkv, D, D] (sum of k k^T), float64."""

    model: ModelShape
    count: torch.Tensor
    sum: torch.Tensor
    outer: torch.Tensor

    @classmethod
    def empty(cls, model: ModelShape) -> KeyStats:
        n, h, d = model.num_layers, model.num_kv_heads, model.head_dim
        f64 = torch.float64
        return cls(
            model,
            torch.zeros(n, h, dtype=f64),
            torch.zeros(n, h, d, dtype=f64),
            torch.zeros(n, h, d, d, dtype=f64),
        )

    def add(self, layer: int, keys: torch.Tensor) -> None:
        """Accumulate keys [Hkv, n, D] of ``layer`` (in place)."""
        k = keys.detach().to("cpu", torch.float64)
        self.count[layer] += k.shape[1]
        self.sum[layer] += k.sum(1)
        self.outer[layer] += k.transpose(1, 2) @ k

    def tokens(self) -> int:
        """Keys seen per (layer, KV head) (the same everywhere after a run)."""
        return int(self.count.min()) if self.count.numel() else 0

    def means(self) -> torch.Tensor:
        """Mean key per (layer, KV head): [L, Hkv, D] float64."""
        self._check_seen()
        return self.sum / self.count[..., None]

    def second_moment(self) -> torch.Tensor:
        """E[k k^T] per (layer, KV head), uncentred: [L, Hkv, D, D] float64."""
        self._check_seen()
        return self.outer / self.count[..., None, None]

    def _check_seen(self) -> None:
        if bool((self.count == 0).any()):
            missing = sorted({int(i) for i in (self.count == 0).nonzero()[:, 0]})
            raise ConfigError(
                f"no keys were collected for layers {missing}: does the model route "
                "attention through transformers' AttentionInterface?"
            )


def _record(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    **kwargs: Any,
) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    stats = _ACTIVE.get(id(module))
    if stats is not None:
        # batch 1, no padding, no cache (collect_key_stats feeds nothing else): every key is real
        for row in key:  # [Hkv, S, D]
            stats.add(int(module.layer_idx), row)
    return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _record)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def collect_key_stats(
    model: Any,
    sequences: Iterable[Sequence[int] | torch.Tensor],
    *,
    progress: Callable[[int], None] | None = None,
) -> KeyStats:
    """Run ``model`` (a transformers causal LM that routes attention through ``AttentionInterface``)
    over each token sequence (batch 1, no cache, no padding) and return the sums of its post-RoPE keys.
    ``progress`` is called with the tokens of each sequence after it ran."""
    shape = ModelShape.from_hf_config(model.config)
    stats = KeyStats.empty(shape)
    _register()
    original = model.config._attn_implementation
    ids_of_modules = [id(m) for m in model.modules()]
    with _ACTIVE_LOCK:
        for i in ids_of_modules:
            _ACTIVE[i] = stats
    device = next(model.parameters()).device
    try:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
        with torch.no_grad():
            for seq in sequences:
                ids = torch.as_tensor(seq, dtype=torch.long, device=device).reshape(1, -1)
                if ids.shape[1] == 0:
                    continue
                model(input_ids=ids, use_cache=False)
                if progress is not None:
                    progress(ids.shape[1])
    finally:
        model.set_attn_implementation(original)
        with _ACTIVE_LOCK:
            for i in ids_of_modules:
                _ACTIVE.pop(i, None)
    return stats


def key_means(stats: KeyStats) -> torch.Tensor:
    """The mean post-RoPE key per (layer, KV head), [L, Hkv, D] float64 (MagicPIG's centres)."""
    return stats.means()


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


def collect_windows(
    model: Any,
    token_ids_or_texts: Iterable[Sequence[int] | str],
    tokenizer: Any | None,
    seq_len: int,
    max_tokens: int | None,
    progress: Callable[[int], None] | None = None,
) -> tuple[KeyStats, dict[str, Any]]:
    """The key sums of ``model`` over the ``token_windows`` of the sources, and what an artifact's
    sidecar records of the run (tokens, seq_len, windows): the part every calibration shares."""
    windows = token_windows(token_ids_or_texts, tokenizer, seq_len, max_tokens)
    stats = collect_key_stats(model, windows, progress=progress)
    return stats, {"tokens": stats.tokens(), "seq_len": seq_len, "windows": len(windows)}

"""A pattern intersected with a model's own sliding window (Mistral, Phi-3, Qwen sliding layers).

A model trained with a sliding window never looks further back than ``window`` keys; a sparse pattern
on top of it may only narrow that, never widen it. ``Windowed(inner, window)`` is ``inner`` with the
extra element rule ``|p - j| < window``. The formats express a window and sink tokens per head, so the
intersection is exact when the inner pattern has no sink tokens (its window, if any, becomes the
smaller of the two) or when the window cannot cut (every key is within ``window`` of every query,
i.e. ``kv_len <= window``). Sink tokens that fall out of the model's window are not expressible:
``element_window`` raises ``SinkOutsideWindowError`` and the caller falls back (counted).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import LayoutError
from ..validation import check_positive_int
from .base import StaticMethod


class SinkOutsideWindowError(LayoutError):
    """The pattern's sink tokens lie outside the model's sliding window for some queries."""


@dataclass(frozen=True)
class Windowed(StaticMethod):
    """``inner`` restricted to keys within ``window`` positions of the query (not serialisable: the
    window comes from the model, not from the user's config)."""

    name: ClassVar[str] = "windowed"
    inner: StaticMethod
    window: int

    def __post_init__(self) -> None:
        if not isinstance(self.inner, StaticMethod):
            raise LayoutError(f"inner must be a StaticMethod, got {type(self.inner).__name__}")
        check_positive_int(self.window, "window")

    @property
    def block_size(self) -> int:  # type: ignore[override]
        return self.inner.block_size

    def pattern_heads(self, num_heads: int, num_kv_heads: int) -> int:
        return self.inner.pattern_heads(num_heads, num_kv_heads)

    def block_visibility(self, q_blocks, kv_blocks, **kwargs) -> torch.Tensor | None:  # type: ignore[no-untyped-def]
        return self.inner.block_visibility(q_blocks, kv_blocks, **kwargs)

    def element_window(
        self, *, num_heads: int, num_kv_heads: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        cons = self.inner.element_window(num_heads=num_heads, num_kv_heads=num_kv_heads, kv_len=kv_len)
        if kv_len <= self.window:
            return cons
        if cons is None:
            return torch.zeros(1, dtype=torch.int64), torch.tensor([self.window])
        sink, window = cons
        if bool((sink > 0).any()):
            raise SinkOutsideWindowError(
                f"{type(self.inner).__name__} keeps {int(sink.max())} sink tokens, which fall outside the "
                f"model's sliding window of {self.window} keys at kv_len={kv_len}"
            )
        return sink, torch.clamp(window, max=self.window)

    def check_fits(self, num_heads: int, num_kv_heads: int) -> None:
        self.inner.check_fits(num_heads, num_kv_heads)

    def for_layer(self, layer_idx: int) -> StaticMethod:
        return Windowed(self.inner.for_layer(layer_idx), self.window)

    def _batch_dependent(self) -> bool:
        return self.inner._batch_dependent()

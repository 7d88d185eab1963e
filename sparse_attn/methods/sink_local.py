"""Attention sinks + local window (StreamingLLM's "streaming" / A-shape pattern), token exact.

Causal: query at position p attends key j iff j <= p and (j < sink_tokens or j > p - window_tokens),
i.e. the first ``sink_tokens`` keys and the last ``window_tokens`` keys up to and including itself.
Non-causal: j < sink_tokens or |p - j| < window_tokens. The defaults (4 sinks + 1020 window, a 1024-key
budget) are StreamingLLM's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..validation import check_nonnegative_int, check_positive_int
from .base import StaticMethod


@dataclass(frozen=True)
class SinkLocal(StaticMethod):
    name: ClassVar[str] = "sink_local"
    sink_tokens: int = 4
    window_tokens: int = 1020
    block_size: int = 64

    def __post_init__(self) -> None:
        check_nonnegative_int(self.sink_tokens, "sink_tokens")
        check_nonnegative_int(self.window_tokens, "window_tokens")
        check_positive_int(self.block_size, "block_size")

    def element_window(
        self, *, num_heads: int, num_kv_heads: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.tensor([self.sink_tokens]), torch.tensor([self.window_tokens])

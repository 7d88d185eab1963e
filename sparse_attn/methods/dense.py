"""Dense attention expressed as a pattern: every key (causal when causal). The budget-unlimited limit
of every static method, and the row used for dense heads inside a mixed layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..validation import check_positive_int
from .base import StaticMethod


@dataclass(frozen=True)
class Dense(StaticMethod):
    """All keys. ``block_size`` only sets the tiling of the compiled layout."""

    name: ClassVar[str] = "dense"
    block_size: int = 64

    def __post_init__(self) -> None:
        check_positive_int(self.block_size, "block_size")

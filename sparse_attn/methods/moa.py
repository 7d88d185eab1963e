"""MoA (Mixture of Sparse Attention): per-head elastic sink + window spans.

For layer l and query head h with N keys in total: ``span = min(N, max(min_span, floor(alpha + beta*N)))``
and the head attends like SinkLocal with ``window_tokens = span``. The per-(layer, head) alphas and
betas come from a plan file ``{"alphas": [[...] per head] per layer, "betas": ...}`` produced by
calibration.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, PlanFileError
from ..validation import check_nonnegative_int, check_positive_int
from .base import StaticMethod

Table = tuple[tuple[float, ...], ...]


def _table(value: object, name: str, error: type[ConfigError] = ConfigError) -> Table:
    """A non-empty rectangular [layers][heads] table of finite numbers, as tuples."""
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise error(f"{name} must be a non-empty [layers][heads] nested list of numbers")
    rows = []
    for i, row in enumerate(value):
        if not isinstance(row, Sequence) or isinstance(row, str) or not row:
            raise error(f"{name}[{i}] must be a non-empty list of numbers (one per head)")
        vals = []
        for x in row:
            if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
                raise error(f"{name}[{i}] must hold finite numbers, got {x!r}")
            vals.append(float(x))
        rows.append(tuple(vals))
    if len({len(r) for r in rows}) != 1:
        raise error(f"{name} must be rectangular (the same number of heads in every layer)")
    return tuple(rows)


@dataclass(frozen=True)
class MoA(StaticMethod):
    name: ClassVar[str] = "moa"
    alphas: Table
    betas: Table
    sink_tokens: int = 64
    min_span: int = 64
    block_size: int = 64

    def __post_init__(self) -> None:
        alphas = _table(self.alphas, "alphas")
        betas = _table(self.betas, "betas")
        if len(alphas) != len(betas) or len(alphas[0]) != len(betas[0]):
            raise ConfigError(
                f"alphas and betas must have one shape, got {len(alphas)}x{len(alphas[0])} "
                f"and {len(betas)}x{len(betas[0])}"
            )
        object.__setattr__(self, "alphas", alphas)
        object.__setattr__(self, "betas", betas)
        check_nonnegative_int(self.sink_tokens, "sink_tokens")
        check_nonnegative_int(self.min_span, "min_span")
        check_positive_int(self.block_size, "block_size")

    @classmethod
    def from_plan_file(cls, path: str | Path, **kwargs: Any) -> MoA:
        """Load ``{"alphas": [[...]], "betas": [[...]]}`` (layers x heads); PlanFileError if malformed."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise PlanFileError(f"cannot read MoA plan file {str(path)!r}: {exc}") from exc
        if not isinstance(data, dict) or "alphas" not in data or "betas" not in data:
            raise PlanFileError(f"MoA plan file {str(path)!r} must be an object with 'alphas' and 'betas'")
        alphas = _table(data["alphas"], "alphas", PlanFileError)
        betas = _table(data["betas"], "betas", PlanFileError)
        if (len(alphas), len(alphas[0])) != (len(betas), len(betas[0])):
            raise PlanFileError(f"alphas and betas in {str(path)!r} must have one [layers][heads] shape")
        return cls(alphas=alphas, betas=betas, **kwargs)

    @property
    def num_layers(self) -> int:
        return len(self.alphas)

    def for_layer(self, layer_idx: int) -> MoA:
        if not 0 <= layer_idx < self.num_layers:
            raise ConfigError(f"layer_idx {layer_idx} is outside the MoA plan's {self.num_layers} layers")
        return replace(self, alphas=(self.alphas[layer_idx],), betas=(self.betas[layer_idx],))

    def spans(self, kv_len: int) -> torch.Tensor:
        """Window span per head for N = kv_len keys, [num_heads]."""
        n = kv_len
        out = [
            min(n, max(self.min_span, math.floor(a + b * n)))
            for a, b in zip(self.alphas[0], self.betas[0], strict=True)
        ]
        return torch.tensor(out, dtype=torch.int64)

    def check_fits(self, num_heads: int, num_kv_heads: int) -> None:
        if self.num_layers != 1:
            raise ConfigError(
                f"this MoA holds {self.num_layers} layers; pick one with .for_layer(layer_idx) "
                "(a SparseAttentionConfig does this per layer)"
            )
        if len(self.alphas[0]) != num_heads:
            raise ConfigError(
                f"MoA plan has {len(self.alphas[0])} heads, the layer has num_heads={num_heads}"
            )

    def pattern_heads(self, num_heads: int, num_kv_heads: int) -> int:
        return num_heads

    def element_window(
        self, *, num_heads: int, num_kv_heads: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        spans = self.spans(kv_len)
        return torch.full_like(spans, self.sink_tokens), spans

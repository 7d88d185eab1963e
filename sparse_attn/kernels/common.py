"""Pieces shared by the torch kernels: head grouping and the masked softmax-times-V step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ShapeError


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class HeadUnits:
    """How query heads group into units that share one K/V gather and one pattern row.

    A unit is one KV head with the ``group_size`` query heads that read it and share one row of the
    pattern (pattern heads 1 or Hkv), or a single query head (pattern heads Hq with GQA).
    """

    kv_head: torch.Tensor  # [U]
    q_heads: torch.Tensor  # [U, group_size]
    pattern_row: torch.Tensor  # [U]

    @property
    def num_units(self) -> int:
        return int(self.kv_head.shape[0])

    @property
    def group_size(self) -> int:
        return int(self.q_heads.shape[1])


def head_units(num_heads: int, num_kv_heads: int, pattern_heads: int) -> HeadUnits:
    group = num_heads // num_kv_heads
    if pattern_heads == num_heads and group > 1:
        q = torch.arange(num_heads)
        return HeadUnits(q // group, q[:, None], q)
    if pattern_heads in (1, num_kv_heads):
        kv = torch.arange(num_kv_heads)
        q = kv[:, None] * group + torch.arange(group)
        return HeadUnits(kv, q, kv if pattern_heads == num_kv_heads else torch.zeros_like(kv))
    raise ShapeError(
        f"pattern has {pattern_heads} heads; expected 1, num_kv_heads={num_kv_heads} or num_heads={num_heads}"
    )


def softmax_av(
    scores: torch.Tensor, values: torch.Tensor, need_lse: bool, may_be_empty: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """softmax(scores) @ values where masked scores are already -inf.

    scores [..., R, M] (accumulation dtype), values [..., M, Dv]. Returns out [..., R, Dv] and lse
    [..., R] (or None); rows with every score -inf give 0 and -inf (pass ``may_be_empty=False`` only
    when every row is known to keep a key). NaN in a score propagates. One fused softmax pass; the
    lse is recovered exactly from the row max m and the largest probability, exp(m - lse).
    """
    m = scores.amax(dim=-1) if (need_lse or may_be_empty) else None
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values)
    if m is None:
        return out, None
    empty = torch.isneginf(m)
    if may_be_empty:
        out.masked_fill_(empty[..., None], 0.0)
    if not need_lse:
        return out, None
    lse = m - torch.log(probs.amax(dim=-1))
    return out, lse.masked_fill_(empty, float("-inf"))

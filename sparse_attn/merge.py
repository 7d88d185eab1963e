"""Exact combination of partial attentions over disjoint key sets by their log-sum-exp."""

from __future__ import annotations

import torch

from .errors import ShapeError


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial attentions: out [..., S, D] with lse [..., S].

    The result equals attention over the union of both key sets. A part whose lse is -inf (it saw no
    key) contributes nothing; NaN in either part propagates. Returns (out in out_a's dtype, lse fp32
    or fp64).
    """
    if out_a.shape != out_b.shape:
        raise ShapeError(
            f"out_a and out_b must have one shape, got {tuple(out_a.shape)} and {tuple(out_b.shape)}"
        )
    if lse_a.shape != lse_b.shape or tuple(lse_a.shape) != tuple(out_a.shape[:-1]):
        raise ShapeError(
            f"lse_a and lse_b must have shape {tuple(out_a.shape[:-1])}, got {tuple(lse_a.shape)} and {tuple(lse_b.shape)}"
        )
    acc = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    la, lb = lse_a.to(acc), lse_b.to(acc)
    m = torch.maximum(la, lb)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(la - m_safe), torch.exp(lb - m_safe)
    total = wa + wb
    denom = torch.where(total > 0, total, torch.ones_like(total))
    out = (out_a.to(acc) * wa[..., None] + out_b.to(acc) * wb[..., None]) / denom[..., None]
    lse = m_safe + torch.log(total)
    return out.to(out_a.dtype), lse

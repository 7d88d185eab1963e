"""Float64 dense attention with an explicit mask: the oracle every kernel is tested against.

It materialises the full score matrix on purpose; use it on small shapes only.
"""

from __future__ import annotations

import torch

from .validation import check_qkv, check_scale


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense masked attention in float64.

    q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D]; mask bool broadcastable to [B, Hq, Sq, Skv] (True = attend).
    Returns out [B, Hq, Sq, Dv] and lse [B, Hq, Sq] in float64; a row with no attended key gives
    out 0 and lse -inf.
    """
    shape = check_qkv(q, k, v)
    sc = check_scale(scale, shape.head_dim)
    kr = k.double().repeat_interleave(shape.group, dim=1)
    vr = v.double().repeat_interleave(shape.group, dim=1)
    scores = torch.matmul(q.double(), kr.transpose(-1, -2)) * sc
    m = torch.broadcast_to(mask.to(scores.device, torch.bool), scores.shape)
    scores = scores.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    empty = ~m.any(dim=-1)
    probs = torch.exp(scores - torch.where(empty, 0.0, lse)[..., None])
    out = torch.matmul(probs, vr)
    out = torch.where(empty[..., None], 0.0, out)
    return out, lse

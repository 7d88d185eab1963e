"""Token-sparse attention over a TokenSelection in plain PyTorch (decode, and small query counts)."""

from __future__ import annotations

import torch

from ..token_selection import TokenSelection
from .common import accum_dtype, head_units, softmax_av


def token_sparse_attention_torch(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D]
    v: torch.Tensor,  # [B, Hkv, Skv, Dv]
    selection: TokenSelection,
    scale: float,
    causal: bool,
    q_lens: torch.Tensor,  # [B]
    kv_lens: torch.Tensor,  # [B]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query attends to its head's selected keys (plus log-weights). Returns out [B, Hq, Sq, Dv]
    and lse [B, Hq, Sq]; rows outside q_lens, and rows with no selected key, are 0 with lse -inf."""
    b, hq, sq, _ = q.shape
    dev = q.device
    acc = accum_dtype(q.dtype)
    units = head_units(hq, k.shape[1], selection.num_heads)
    gq = units.group_size
    lrow = units.pattern_row.to(selection.indices.device)  # the selection may live on the host
    idx = selection.indices[:, lrow].to(dev, torch.int64)  # [B, U, km]
    kv_lens_d, q_lens_d = kv_lens.to(dev), q_lens.to(dev)
    used = selection.used()[:, lrow].to(dev) & (idx < kv_lens_d[:, None, None])
    hkv, skv = k.shape[1], k.shape[2]
    # rows of k/v flattened to [B*Hkv*Skv, D]: one index_select instead of a 3-index gather
    base = (torch.arange(b, device=dev)[:, None] * hkv + units.kv_head.to(dev)[None, :]) * skv  # [B, U]
    flat = (torch.where(used, idx, torch.zeros_like(idx)) + base[..., None]).flatten()
    k_sel = k.reshape(-1, k.shape[-1]).index_select(0, flat).view(*idx.shape, -1).to(acc)  # [B, U, km, D]
    v_sel = v.reshape(-1, v.shape[-1]).index_select(0, flat).view(*idx.shape, -1).to(acc)  # [B, U, km, Dv]
    q_sel = q[:, units.q_heads.to(dev)].to(acc).flatten(2, 3) * scale  # [B, U, gq*Sq, D]
    scores = torch.matmul(q_sel, k_sel.transpose(-1, -2))  # [B, U, gq*Sq, km]
    if selection.log_weights is not None:
        log_weights = selection.log_weights.to(dev, acc)[:, lrow.to(dev)]
        scores.add_(log_weights[:, :, None, :])
    i = torch.arange(sq, device=dev)
    row_ok = i[None, :] < q_lens_d[:, None]  # [B, Sq]
    allowed = used[:, :, None, :] & row_ok.repeat(1, gq)[:, None, :, None]
    if causal:
        pos = (kv_lens_d - q_lens_d)[:, None] + i[None, :]  # [B, Sq] absolute query positions
        allowed = allowed & (idx[:, :, None, :] <= pos.repeat(1, gq)[:, None, :, None])
    scores.masked_fill_(~allowed, float("-inf"))
    out, lse = softmax_av(scores, v_sel, need_lse=True)  # [B, U, gq*Sq, Dv], [B, U, gq*Sq]
    out = out.unflatten(2, (gq, sq)).flatten(1, 2)  # [B, Hq, Sq, Dv] in unit order
    lse = lse.unflatten(2, (gq, sq)).flatten(1, 2)
    order = units.q_heads.flatten().to(dev)
    result = torch.empty(b, hq, sq, out.shape[-1], dtype=q.dtype, device=dev)
    result[:, order] = out.to(q.dtype)
    lse_full = torch.empty(b, hq, sq, dtype=acc, device=dev)
    lse_full[:, order] = lse
    return result, lse_full

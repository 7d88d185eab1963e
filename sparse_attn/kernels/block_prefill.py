"""Block-sparse attention over a BlockLayout in plain PyTorch (the CPU path and the kernels' oracle).

Per batch row, query tiles are processed in chunks: the selected key blocks of every tile are
gathered (never the whole key range), the query heads of a GQA group are stacked so each K/V block is
gathered once per KV head, and scores exist only for the chunk: memory stays O(selected keys).
"""

from __future__ import annotations

import torch

from ..block_layout import BlockLayout, TileGeometry, element_allowed
from .common import HeadUnits, accum_dtype, head_units, masked_softmax_av

# Upper bound on the scratch (scores + gathered K/V) of one chunk of tiles, in bytes.
CHUNK_BYTES = 48 * 2**20


def _chunks(counts: torch.Tensor, units: int, rows: int, block_k: int, head_dim: int, elem: int):
    """Split tiles [0, nt) into chunks whose scratch fits CHUNK_BYTES; yields (t0, t1, max count)."""
    per_block = units * block_k * (rows + 2 * head_dim) * elem
    tile_max = counts.amax(dim=0).tolist()  # [nt]
    t0, mk = 0, 0
    for t, c in enumerate(tile_max):
        new_mk = max(mk, c)
        if t > t0 and (t + 1 - t0) * new_mk * per_block > CHUNK_BYTES:
            yield t0, t, mk
            t0, new_mk = t, c
        mk = new_mk
    if t0 < len(tile_max):
        yield t0, len(tile_max), mk


def _row_attention(
    qb: torch.Tensor,  # [Hq, Sq, D] one batch row
    kb: torch.Tensor,  # [Hkv, Skv, D]
    vb: torch.Tensor,  # [Hkv, Skv, Dv]
    layout: BlockLayout,
    b: int,
    units: HeadUnits,
    scale: float,
    out: torch.Tensor,  # [Hq, Sq, Dv] written in place
    lse_out: torch.Tensor,  # [Hq, Sq]
) -> None:
    geo: TileGeometry = layout.geometry(b)
    nt = geo.num_tiles
    if nt == 0:
        return
    dev = qb.device
    acc = accum_dtype(qb.dtype)
    bq, bk = layout.block_q, layout.block_k
    gq, n_units = units.group_size, units.num_units
    pos = geo.tile_positions().to(dev)  # [nt, bq] absolute query positions
    row = pos - geo.q_start
    row_ok = (row >= 0) & (row < geo.q_len)
    row_c = row.clamp(0, max(geo.q_len - 1, 0))
    prow = pos.repeat(1, gq)  # [nt, gq*bq], matching the stacked group heads
    lrow = units.pattern_row.to(dev)
    counts = layout.kv_counts[b, lrow, :nt].to(dev, torch.int64)  # [U, nt]
    sink, window = layout.head_constraints(b)
    if window is not None:
        sink = sink.to(dev)[lrow][:, None, None, None]
        window = window.to(dev)[lrow][:, None, None, None]
    kv_u = units.kv_head.to(dev)
    k_u, v_u = kb[kv_u], vb[kv_u]  # [U, Skv, D]
    unit_ix = torch.arange(n_units, device=dev)[:, None, None]
    q_heads = units.q_heads.to(dev)[:, :, None, None]  # [U, gq, 1, 1]
    elem = torch.finfo(acc).bits // 8
    for t0, t1, mk in _chunks(counts.cpu(), n_units, gq * bq, bk, qb.shape[-1], elem):
        if mk == 0:
            continue
        blk = layout.kv_indices[b, lrow, t0:t1, :mk].to(dev, torch.int64)  # [U, T, mk]
        used = torch.arange(mk, device=dev) < counts[:, t0:t1, None]  # [U, T, mk]
        keys = (blk[..., None] * bk + torch.arange(bk, device=dev)).flatten(-2)  # [U, T, mk*bk]
        col_ok = used.repeat_interleave(bk, dim=-1) & (keys < geo.kv_len)
        keys_c = torch.where(col_ok, keys, torch.zeros_like(keys))
        k_sel = k_u[unit_ix, keys_c].to(acc)  # [U, T, M, D]
        v_sel = v_u[unit_ix, keys_c].to(acc)  # [U, T, M, Dv]
        q_sel = qb[q_heads, row_c[t0:t1][None, None]].to(acc)  # [U, gq, T, bq, D]
        q_sel = q_sel.transpose(1, 2).flatten(2, 3)  # [U, T, gq*bq, D]
        scores = torch.matmul(q_sel, k_sel.transpose(-1, -2)).mul_(scale)  # [U, T, gq*bq, M]
        full = layout.full[b, lrow, t0:t1, :mk].to(dev).repeat_interleave(bk, dim=-1)  # [U, T, M]
        if bool(full[col_ok].all()):  # full blocks need no element mask
            allowed = col_ok[:, :, None, :]
        else:
            pred = element_allowed(
                prow[None, t0:t1, :, None], keys[:, :, None, :], geo.kv_len, layout.causal, sink, window
            )
            allowed = col_ok[:, :, None, :] & (full[:, :, None, :] | pred)
        o, lse = masked_softmax_av(scores, allowed, v_sel)  # [U, T, gq*bq, Dv], [U, T, gq*bq]
        o = o.unflatten(2, (gq, bq)).transpose(1, 2)  # [U, gq, T, bq, Dv]
        lse = lse.unflatten(2, (gq, bq)).transpose(1, 2)
        ok = row_ok[t0:t1][None, None].expand(n_units, gq, -1, -1)
        heads = q_heads.expand(-1, -1, t1 - t0, bq)[ok]
        rows = row[t0:t1][None, None].expand(n_units, gq, -1, -1)[ok]
        out.index_put_((heads, rows), o[ok].to(out.dtype))
        lse_out.index_put_((heads, rows), lse[ok].to(lse_out.dtype))


def block_sparse_attention_torch(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D]
    v: torch.Tensor,  # [B, Hkv, Skv, Dv]
    layout: BlockLayout,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the layout's blocks. Returns out [B, Hq, Sq, Dv] (q.dtype) and lse [B, Hq, Sq]
    (float32, float64 for float64 inputs). Rows outside q_lens are 0 with lse -inf."""
    b, hq, sq, _ = q.shape
    units = head_units(hq, k.shape[1], layout.num_heads)
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, sq), float("-inf"), dtype=accum_dtype(q.dtype), device=q.device)
    for row in range(b):
        _row_attention(q[row], k[row], v[row], layout, row, units, scale, out[row], lse[row])
    return out, lse

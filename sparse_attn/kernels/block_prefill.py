"""Block-sparse attention over a BlockLayout in plain PyTorch (the CPU path and the kernels' oracle).

Per batch row, query tiles are processed in chunks: the selected key blocks of every tile are
gathered (never the whole key range), the query heads of a GQA group are stacked so each K/V block is
gathered once per KV head, and scores exist only for the chunk: memory stays O(selected keys). The
element predicate is evaluated only inside partial blocks; full blocks need no mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..block_layout import BlockLayout, element_allowed
from .common import accum_dtype, head_units, softmax_av

# Upper bound on the scratch (scores + gathered K/V) of one chunk of tiles, in bytes.
CHUNK_BYTES = 8 * 2**20
# Units (KV heads, or query heads with per-head patterns) are processed together only while the
# largest per-unit block count is within this factor of the mean: padding to the largest costs work.
UNIT_SPREAD = 1.25


def _chunks(counts: torch.Tensor, per_block: int):
    """Split tiles into chunks whose scratch fits CHUNK_BYTES; yields (t0, t1, max count in chunk)."""
    tile_max = counts.amax(dim=0).tolist()  # [nt]
    t0, mk = 0, 0
    for t, c in enumerate(tile_max):
        grown = max(mk, c)
        if t > t0 and (t + 1 - t0) * grown * per_block > CHUNK_BYTES:
            yield t0, t, mk
            t0, grown = t, c
        mk = grown
    if t0 < len(tile_max):
        yield t0, len(tile_max), mk


def _blocked(
    layout: BlockLayout,
    blk: torch.Tensor,  # [U, T, P] key blocks of the masked prefix
    used: torch.Tensor,  # [U, T, P]
    full: torch.Tensor,  # [U, T, P]
    tile_pos: torch.Tensor,  # [T, R] absolute query positions of the computed rows
    kv_len: int,
    sink: torch.Tensor | None,  # [U]
    window: torch.Tensor | None,  # [U]
) -> torch.Tensor:
    """bool [U, T, R, P*bk]: True where a gathered key of the prefix must be masked.

    Unused slots are masked whole; the element predicate runs only inside partial blocks."""
    bk = layout.block_k
    keys = blk[..., None] * bk + torch.arange(bk, device=blk.device)  # [U, T, P, bk]
    blocked = (~used[..., None] | (keys >= kv_len)).flatten(-2)[:, :, None, :]
    blocked = blocked.repeat(1, 1, tile_pos.shape[1], 1)  # [U, T, R, P*bk]
    u, t, s = (used & ~full).nonzero().unbind(1)
    if u.numel():
        pred = element_allowed(
            tile_pos[t][:, :, None],  # [n, R, 1]
            keys[u, t, s][:, None, :],  # [n, 1, bk]
            kv_len,
            layout.causal,
            None if sink is None else sink[u][:, None, None],
            None if window is None else window[u][:, None, None],
        )
        blocked.view(*blocked.shape[:3], -1, bk)[u, t, :, s] = ~pred
    return blocked


def _row_attention(
    q_u: torch.Tensor,  # [U, gq, Sq, D] one batch row, query heads grouped by unit
    k_row: torch.Tensor,  # [Hkv, Skv, D] one batch row
    v_row: torch.Tensor,  # [Hkv, Skv, Dv]
    kv_head: torch.Tensor,  # [U] KV head of each unit
    layout: BlockLayout,
    b: int,
    pattern_row: torch.Tensor,  # [U] layout head of each unit
    scale: float,
    out: torch.Tensor,  # [U, gq, Sq, Dv] written in place
    lse_out: torch.Tensor | None,  # [U, gq, Sq]
) -> None:
    geo = layout.geometry(b)
    nt = geo.num_tiles
    dev = q_u.device
    acc = accum_dtype(q_u.dtype)
    bq, bk = layout.block_q, layout.block_k
    n_units, gq, _, d = q_u.shape
    dv = v_row.shape[-1]
    pos = geo.tile_positions().to(dev)  # [nt, bq] absolute query positions
    lrow = pattern_row.to(layout.kv_counts.device)  # index the layout where it lives (often the host)
    counts = layout.kv_counts[b, lrow, :nt].to(dev, torch.int64)  # [U, nt]
    sink, window = layout.head_constraints(b)
    if window is not None:
        sink, window = sink[lrow.cpu()].to(dev), window[lrow.cpu()].to(dev)
    # gather straight from the row's cache: flat row = kv_head * Skv + key (no per-unit copy)
    unit_base = (kv_head.to(dev) * k_row.shape[1])[:, None, None]
    k_flat, v_flat = k_row.reshape(-1, d), v_row.reshape(-1, dv)
    per_block = n_units * bk * (gq * bq + d + dv) * (torch.finfo(acc).bits // 8)
    for t0, t1, mk in _chunks(counts.cpu(), per_block):
        n_t = t1 - t0
        r_lo = (geo.first_q_block + t0) * bq - geo.q_start  # query row of the chunk's first slot
        r0, r1 = max(r_lo, 0), min(r_lo + n_t * bq, geo.q_len)
        if mk == 0:
            continue
        # A lone tile computes only its real rows (decode: one row, not block_q).
        lo, hi = (r0 - r_lo, r1 - r_lo) if n_t == 1 else (0, bq)
        rt = hi - lo
        blk = layout.kv_indices[b, lrow.to(layout.kv_indices.device), t0:t1, :mk].to(
            dev, torch.int64
        )  # [U, T, mk]
        used = torch.arange(mk, device=dev) < counts[:, t0:t1, None]  # [U, T, mk]
        full = layout.full[b, lrow.to(layout.full.device), t0:t1, :mk].to(dev) & used
        clean = full & (blk * bk + bk <= geo.kv_len)  # slots that need no mask at all
        # Softmax ignores key order: move the slots that need a mask to the front of each tile so the
        # mask touches only a prefix of the scores.
        n_mask = int((~clean).sum(-1).max())
        if 0 < n_mask < mk:
            order = torch.argsort(clean.to(torch.int8), dim=-1, stable=True)
            blk, used, full = blk.gather(-1, order), used.gather(-1, order), full.gather(-1, order)
        keys = (blk[..., None] * bk + torch.arange(bk, device=dev)).flatten(-2)  # [U, T, M]
        flat = torch.where(used.repeat_interleave(bk, dim=-1) & (keys < geo.kv_len), keys, 0) + unit_base
        k_sel = k_flat.index_select(0, flat.flatten()).view(n_units * n_t, -1, d).to(acc)  # [U*T, M, D]
        v_sel = v_flat.index_select(0, flat.flatten()).view(n_units * n_t, -1, dv).to(acc)
        if n_t == 1:
            q_c = q_u[:, :, r0:r1]  # [U, gq, rt, D]
        else:
            q_c = F.pad(q_u[:, :, r0:r1], (0, 0, r0 - r_lo, r_lo + n_t * bq - r1))  # [U, gq, T*bq, D]
        q_c = q_c.reshape(n_units, gq, n_t, rt, d).transpose(1, 2).reshape(n_units * n_t, gq * rt, d)
        scores = torch.bmm(q_c.to(acc) * scale, k_sel.transpose(1, 2))  # [U*T, gq*rt, M]
        if n_mask:
            p = slice(0, n_mask)
            tile_pos = pos[t0:t1, lo:hi]
            blocked = _blocked(
                layout, blk[..., p], used[..., p], full[..., p], tile_pos, geo.kv_len, sink, window
            )
            # one mask row per query position, shared by the GQA group
            scores.view(n_units, n_t, gq, rt, -1)[..., : n_mask * bk].masked_fill_(
                blocked[:, :, None], float("-inf")
            )
        # a query row can see nothing only in a tile without a single full block
        may_be_empty = not bool(full.any(-1).all())
        o, lse = softmax_av(scores, v_sel, need_lse=lse_out is not None, may_be_empty=may_be_empty)
        base = r_lo + lo  # query row of the first computed slot
        o = o.view(n_units, n_t, gq, rt, dv).transpose(1, 2).reshape(n_units, gq, n_t * rt, dv)
        out[:, :, r0:r1] = o[:, :, r0 - base : r1 - base].to(out.dtype)
        if lse_out is not None:
            lse = lse.view(n_units, n_t, gq, rt).transpose(1, 2).reshape(n_units, gq, n_t * rt)
            lse_out[:, :, r0:r1] = lse[:, :, r0 - base : r1 - base]


def _unit_groups(layout: BlockLayout, b: int, pattern_row: torch.Tensor) -> list[slice]:
    """Contiguous unit ranges to process together: all units, or one at a time when their block
    counts differ enough that padding every unit to the largest would waste work (MoA's spans)."""
    n_units = int(pattern_row.shape[0])
    per_unit = layout.kv_counts[b, pattern_row.cpu()].amax(dim=-1).double()  # [U]
    if n_units == 1 or float(per_unit.max()) <= UNIT_SPREAD * float(per_unit.mean()):
        return [slice(0, n_units)]
    return [slice(u, u + 1) for u in range(n_units)]


def block_sparse_attention_torch(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D]
    v: torch.Tensor,  # [B, Hkv, Skv, Dv]
    layout: BlockLayout,
    scale: float,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention over the layout's blocks. Returns out [B, Hq, Sq, Dv] (q.dtype) and lse [B, Hq, Sq]
    (float32, float64 for float64 inputs) or None; rows outside q_lens are 0 with lse -inf."""
    b, hq, sq, d = q.shape
    units = head_units(hq, k.shape[1], layout.num_heads)
    n_units, gq = units.num_units, units.group_size
    # Unit u holds query heads u*gq .. u*gq+gq-1 in both groupings, so views replace gathers.
    out = torch.zeros(b, hq, sq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = (
        torch.full((b, hq, sq), float("-inf"), dtype=accum_dtype(q.dtype), device=q.device)
        if need_lse
        else None
    )
    kv_head = units.kv_head.to(q.device)
    for row in range(b):
        if layout.geometry(row).num_tiles == 0:
            continue
        q_u = q[row].reshape(n_units, gq, sq, d)
        out_u = out[row].view(n_units, gq, sq, -1)
        lse_u = None if lse is None else lse[row].view(n_units, gq, sq)
        for g in _unit_groups(layout, row, units.pattern_row):
            _row_attention(
                q_u[g],
                k[row],
                v[row],
                kv_head[g],
                layout,
                row,
                units.pattern_row[g],
                scale,
                out_u[g],
                None if lse_u is None else lse_u[g],
            )
    return out, lse

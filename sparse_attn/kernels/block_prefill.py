"""Block-sparse attention over a BlockLayout in plain PyTorch (the CPU path and the kernels' oracle).

Per batch row, query tiles are processed in chunks: the selected key blocks of every tile are
gathered (never the whole key range), the query heads of a GQA group are stacked so each K/V block is
gathered once per KV head, and scores exist only for the chunk: memory stays O(selected keys). The
element predicate is evaluated only inside partial blocks; full blocks need no mask.

Plan once, run many: everything that depends on the layout alone (the chunks, the block rows to
gather, which slots need a mask, the masks themselves and the rows that see no key) is built on the
first call and kept on the layout, so a call is a handful of large ops per chunk. Partial blocks'
masks repeat along a band (the diagonal block of every tile is the same mask), so they are kept as a
small palette of distinct [block_q, block_k] masks and an index per (unit, tile, head, slot).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..block_layout import BlockLayout
from .band_prefill import band_attention_row, band_plan
from .common import accum_dtype, head_units

# Upper bound on the scratch (scores + gathered K/V) of one chunk of tiles, in bytes.
CHUNK_BYTES = 8 * 2**20
# Units (KV heads, or query heads with per-head patterns) are processed together only while padding
# each to the largest block count of its tile adds at most this fraction of work: with the plan kept
# on the layout a chunk costs few ops, so separate units are cheap and padding is not.
UNIT_PAD = 0.05
# Per-query-head layouts under GQA (MoA): a KV head's query heads run as one unit over the union of
# their key blocks (one gather, 4x taller matmuls, a mask per head) while the union costs at most
# this factor of the blocks the heads list themselves; otherwise each query head is its own unit.
UNION_WASTE = 1.3

# Causal sink + window layouts (SinkLocal, MoA) run on the token-gathered band kernel
# (``band_prefill``), which computes fewer scores than whole blocks; False keeps them on this one.
BAND_PREFILL = True

# palette entry kinds
_BLOCKED, _FULL, _PARTIAL = 0, 1, 2


@dataclass(frozen=True)
class _Chunk:
    t0: int
    t1: int
    r_lo: int  # query row of the chunk's first tile slot (negative before the first query)
    r0: int  # real query rows written: [r0, r1)
    r1: int
    lo: int  # computed slots of each tile: [lo, hi) (a lone tile computes only its real rows)
    hi: int
    slots: int  # key blocks per tile (padded to the chunk's largest)
    n_mask: int  # leading slots that need a mask
    kv_block: torch.Tensor  # [U*T*slots] rows of the [Hkv * blocks, bk*D] view of K and V
    mask_rows: torch.Tensor | None  # [U*T*G'*rt*n_mask] palette rows of the leading slots' masks
    empty: torch.Tensor | None  # bool [U, T, G', hi-lo]: real rows without a single key


@dataclass(frozen=True)
class _Group:
    """Units run together: ``heads`` query heads per unit, units ``units`` of that grouping."""

    heads: int
    units: slice
    kv_head: torch.Tensor  # [U]
    chunks: list[_Chunk]
    palette: torch.Tensor  # [K*bq, bk] accumulation dtype, -inf where masked, else 0


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


def _union(
    idx: torch.Tensor, used: torch.Tensor, full: torch.Tensor, n_kv_blocks: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key blocks of a unit's heads merged per tile.

    idx/used/full [U, G, nt, mk] -> (blocks [U, nt, M] ascending, counts [U, nt], status
    [U, G, nt, M] int8: 0 the head does not list the block, 1 partial, 2 full)."""
    n_units, g, nt, _ = idx.shape
    col = torch.where(used, idx, n_kv_blocks)
    status = torch.zeros(n_units, g, nt, n_kv_blocks + 1, dtype=torch.int8)
    status.scatter_(3, col, torch.where(used, 1 + full.to(torch.int8), 0).to(torch.int8))
    status = status[..., :n_kv_blocks]  # [U, G, nt, nkb]
    present = status.any(1)  # [U, nt, nkb]
    counts = present.sum(-1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    key = torch.where(present, torch.arange(n_kv_blocks), n_kv_blocks)
    blocks = torch.sort(key, dim=-1).values[..., :width]  # [U, nt, M]
    blocks = torch.where(blocks < n_kv_blocks, blocks, 0)
    slot_status = status.gather(3, blocks[:, None].expand(n_units, g, nt, width))
    in_use = torch.arange(width) < counts[..., None]  # [U, nt, M]
    return blocks, counts, torch.where(in_use[:, None], slot_status, 0)


def _palette(keys: torch.Tensor, bq: int, bk: int, causal: bool) -> torch.Tensor:
    """bool [K, bq, bk], True where masked, from (kind, delta, a, s, w) rows [K, 5] (see _mask_keys)."""
    kind, delta, a, s, w = (x[:, None, None] for x in keys.unbind(1))
    r = torch.arange(bq)[None, :, None]
    c = torch.arange(bk)[None, None, :]
    ok = (c < a) & (kind != _BLOCKED)
    pred = torch.ones_like(ok)
    if causal:
        pred = pred & (c - r <= delta)
    windowed = w > 0
    pred = pred & (~windowed | ((delta + r - c).abs() < w - 1) | (c < s))
    return ~(ok & ((kind == _FULL) | pred))


def _mask_keys(
    status: torch.Tensor,  # [U, G, T, P] int8 (0 unlisted or unused, 1 partial, 2 full)
    blocks: torch.Tensor,  # [U, T, P]
    tile_p0: torch.Tensor,  # [T] absolute position of each tile's first slot
    kv_len: int,
    causal: bool,
    sink: torch.Tensor | None,  # [U, G]
    window: torch.Tensor | None,  # [U, G]
    bq: int,
    bk: int,
) -> torch.Tensor:
    """int64 [U, T, G, P, 5]: the mask of each (unit, tile, head, slot) as (kind, delta, a, s, w),
    clamped so that equal masks get equal keys (delta = first query - first key of the block;
    a, s = keys of the block below kv_len / inside the sink; w = window + 1, 0 for none)."""
    st = status.permute(0, 2, 1, 3).to(torch.int64)  # [U, T, G, P]
    j0 = (blocks * bk)[:, :, None, :]  # [U, T, 1, P]
    delta = tile_p0[None, :, None, None] - j0
    a = (kv_len - j0).clamp(0, bk)
    if window is None:
        w = torch.zeros_like(st)
        s = torch.zeros_like(st)
    else:
        assert sink is not None
        w = window.clamp(max=kv_len + bq + bk)[:, None, :, None].expand_as(st)
        s = (sink[:, None, :, None] - j0).clamp(0, bk)
    if not causal and window is None:
        delta = torch.zeros_like(delta)
    delta = torch.maximum(torch.minimum(delta, w + bk), -(w + bq))
    kind = torch.where(st == 2, _FULL, torch.where(st == 1, _PARTIAL, _BLOCKED))
    keep = kind == _PARTIAL
    z = torch.zeros_like(st)
    a = torch.where(kind == _BLOCKED, z, a.expand_as(st))
    w_key = w + 1 if window is not None else w  # 0 marks "no window" (a window of 0 keeps the sink only)
    return torch.stack(
        [kind, torch.where(keep, delta, z), a, torch.where(keep, s, z), torch.where(keep, w_key, z)], -1
    )


def _plan_group(
    layout: BlockLayout,
    b: int,
    rows: torch.Tensor,  # [U, G'] layout row of each unit's heads (G' = 1: shared by the group)
    kv_head: torch.Tensor,  # [U]
    heads: int,
    units: slice,
    blocks_per_head: int,  # key blocks per KV head of the K/V tensors
    per_block: int,
    acc: torch.dtype,
    device: torch.device,
) -> _Group:
    geo = layout.geometry(b)
    nt, bq, bk = geo.num_tiles, layout.block_q, layout.block_k
    n_units, gp = rows.shape
    flat = rows.flatten()
    counts = layout.kv_counts[b].cpu()[flat, :nt].view(n_units, gp, nt).to(torch.int64)
    idx = layout.kv_indices[b].cpu()[flat, :nt].view(n_units, gp, nt, -1).to(torch.int64)
    full = layout.full[b].cpu()[flat, :nt].view(n_units, gp, nt, -1)
    used = torch.arange(idx.shape[-1]) < counts[..., None]
    if gp == 1:
        blocks, ucount = torch.where(used[:, 0], idx[:, 0], 0), counts[:, 0]
        status = torch.where(used, torch.where(full, 2, 1), 0).to(torch.int8)
    else:
        blocks, ucount, status = _union(idx, used, full, geo.num_kv_blocks)
    sink, window = layout.head_constraints(b)
    if window is not None:
        sink, window = sink[flat].view(n_units, gp), window[flat].view(n_units, gp)
    tile_p0 = (torch.arange(nt) + geo.first_q_block) * bq
    base = (kv_head.cpu() * blocks_per_head)[:, None, None]
    # Blocks are left-packed per tile (used slots first). Softmax ignores key order: within each
    # chunk the slots that need a mask (partial, past kv_len, unused or unlisted by some head) go
    # first so the mask touches only a prefix of the scores.
    specs, keys = [], []
    for t0, t1, mk in _chunks(ucount, per_block):
        n_t = t1 - t0
        r_lo = (geo.first_q_block + t0) * bq - geo.q_start
        r0, r1 = max(r_lo, 0), min(r_lo + n_t * bq, geo.q_len)
        lo, hi = (r0 - r_lo, r1 - r_lo) if n_t == 1 else (0, bq)
        blk, st = blocks[:, t0:t1, :mk], status[:, :, t0:t1, :mk]
        clean = (torch.arange(mk) < ucount[:, t0:t1, None]) & (blk * bk + bk <= geo.kv_len) & (st == 2).all(1)
        order = torch.argsort(clean.to(torch.int8), dim=-1, stable=True)
        blk, clean = blk.gather(-1, order), clean.gather(-1, order)
        st = st.gather(-1, order[:, None].expand_as(st))
        n_mask = int((~clean).sum(-1).max()) if mk else 0
        specs.append((t0, t1, r_lo, r0, r1, lo, hi, mk, n_mask, blk, clean.any(-1)))
        if n_mask:
            keys.append(
                _mask_keys(
                    st[..., :n_mask],
                    blk[..., :n_mask],
                    tile_p0[t0:t1],
                    geo.kv_len,
                    layout.causal,
                    sink,
                    window,
                    bq,
                    bk,
                )
            )
    if keys:
        uniq, inverse = torch.unique(torch.cat([k.reshape(-1, 5) for k in keys]), dim=0, return_inverse=True)
        palette = _palette(uniq, bq, bk, layout.causal)
        row_any = (~palette).any(-1)  # [K, bq] rows of each mask that keep a key
        ids = iter(inverse.split([k[..., 0].numel() for k in keys]))
    else:
        palette, row_any, ids = torch.zeros(0, bq, bk, dtype=torch.bool), None, iter(())

    chunks = []
    for t0, t1, r_lo, r0, r1, lo, hi, mk, n_mask, blk, has_clean in specs:
        if mk == 0:
            chunks.append(_Chunk(t0, t1, r_lo, r0, r1, lo, hi, 0, 0, torch.empty(0), None, None))
            continue
        n_t = t1 - t0
        mask_rows = empty = None
        seen = has_clean[:, :, None, None].expand(n_units, n_t, gp, hi - lo)  # [U, T, G', rt]
        if n_mask:
            mask_id = next(ids).view(n_units, n_t, gp, n_mask)
            assert row_any is not None
            seen = seen | row_any[mask_id][..., lo:hi].any(-2)
            # row r of every leading slot's mask, in the scores' order [U, T, G', rt, P]
            mask_rows = mask_id[:, :, :, None, :] * bq + torch.arange(lo, hi)[:, None]
            mask_rows = mask_rows.flatten().to(device, torch.int32)
        # only real query rows count: a tile's slots before the first query or past kv_len are
        # computed and dropped
        p = tile_p0[t0:t1, None] + torch.arange(lo, hi)  # [T, rt]
        real = (p >= geo.q_start) & (p < geo.kv_len)
        missing = ~seen & real[None, :, None]
        if bool(missing.any()):
            empty = missing.to(device)
        chunks.append(
            _Chunk(
                t0,
                t1,
                r_lo,
                r0,
                r1,
                lo,
                hi,
                mk,
                n_mask,
                (blk + base).flatten().to(device),
                mask_rows,
                empty,
            )
        )
    bias = torch.zeros(palette.shape, dtype=acc).masked_fill_(palette, float("-inf")).flatten(0, 1)
    return _Group(heads, units, kv_head.to(device), chunks, bias.to(device))


def _unit_groups(counts: torch.Tensor) -> list[slice]:
    """Contiguous unit ranges to process together: all units, or one at a time when padding every
    unit to the largest block count of its tile would waste more than UNIT_PAD of the work (MoA's
    spans). counts [U, nt] blocks per unit and tile."""
    n_units = int(counts.shape[0])
    needed = int(counts.sum())
    if n_units == 1 or n_units * int(counts.amax(dim=0).sum()) <= (1 + UNIT_PAD) * needed:
        return [slice(0, n_units)]
    return [slice(u, u + 1) for u in range(n_units)]


def _union_pays(layout: BlockLayout, b: int, hq: int, hkv: int) -> bool:
    """Whether a per-query-head layout runs cheaper as KV-head units over the union of the group's
    blocks (UNION_WASTE) than as one unit per query head."""
    nt = layout.geometry(b).num_tiles
    gq = hq // hkv
    idx = layout.kv_indices[b].cpu()[:, :nt].to(torch.int64)
    counts = layout.kv_counts[b].cpu()[:, :nt].to(torch.int64)
    used = torch.arange(idx.shape[-1]) < counts[..., None]
    nkb = layout.geometry(b).num_kv_blocks
    present = torch.zeros(hkv, nt, nkb + 1, dtype=torch.bool)
    col = torch.where(used, idx, nkb).view(hkv, gq, nt, -1).permute(0, 2, 1, 3).reshape(hkv, nt, -1)
    present.scatter_(2, col, True)
    union = int(present[..., :nkb].sum())
    return union * gq <= UNION_WASTE * int(counts.sum())


def _plan(
    layout: BlockLayout,
    b: int,
    hq: int,
    hkv: int,
    blocks_per_head: int,
    per_block_unit,
    acc: torch.dtype,
    device: torch.device,
) -> list[_Group]:
    """The row's groups of units with their chunk plans; per_block_unit(heads) is the scratch of one
    key block slot of one tile for one unit of ``heads`` query heads."""
    units = head_units(hq, hkv, layout.num_heads)
    gq = hq // hkv
    nt = layout.geometry(b).num_tiles
    if layout.num_heads == hq and gq > 1 and _union_pays(layout, b, hq, hkv):
        rows = torch.arange(hq).view(hkv, gq)
        kv_head, heads = torch.arange(hkv), gq
    else:
        rows, kv_head, heads = units.pattern_row[:, None], units.kv_head, units.group_size
    counts = layout.kv_counts[b].cpu()[rows.flatten(), :nt].view(*rows.shape, nt).amax(1)  # [U, nt]
    groups = []
    for g in _unit_groups(counts):
        n_units = g.stop - g.start
        groups.append(
            _plan_group(
                layout,
                b,
                rows[g],
                kv_head[g],
                heads,
                g,
                blocks_per_head,
                n_units * per_block_unit(heads),
                acc,
                device,
            )
        )
    return groups


def _row_attention(
    q_u: torch.Tensor,  # [U, G, Sq, D] one batch row, query heads grouped by unit
    k_blk: torch.Tensor,  # [Hkv * blocks, bk * D] the row's keys by block
    v_blk: torch.Tensor,  # [Hkv * blocks, bk * Dv]
    group: _Group,
    bq: int,
    bk: int,
    scale: float,
    acc: torch.dtype,
    out: torch.Tensor,  # [U, G, Sq, Dv] written in place
    lse_out: torch.Tensor | None,  # [U, G, Sq]
    grad: bool,
    finite: bool,  # q and k hold no inf or NaN
) -> None:
    n_units, gq, sq, d = q_u.shape
    dv = out.shape[-1]
    for c in group.chunks:
        n_t, rt = c.t1 - c.t0, c.hi - c.lo
        if c.slots == 0:
            out[:, :, c.r0 : c.r1] = 0
            continue
        m = c.slots * bk
        k_sel = k_blk.index_select(0, c.kv_block).view(n_units * n_t, m, d).to(acc)  # [U*T, M, D]
        v_sel = v_blk.index_select(0, c.kv_block).view(n_units * n_t, m, dv).to(acc)
        if n_t == 1:
            rows = q_u[:, None, :, c.r0 : c.r1]  # [U, 1, G, rt, D]
        elif c.r_lo >= 0 and c.r_lo + n_t * bq <= sq:
            rows = q_u[:, :, c.r_lo : c.r_lo + n_t * bq].view(n_units, gq, n_t, bq, d).transpose(1, 2)
        else:
            pad = (0, 0, c.r0 - c.r_lo, c.r_lo + n_t * bq - c.r1)
            rows = F.pad(q_u[:, :, c.r0 : c.r1], pad).view(n_units, gq, n_t, bq, d).transpose(1, 2)
        if grad:  # out= and in-place softmax have no autograd
            q_c = (rows.to(acc) * scale).contiguous()  # [U, T, G, rt, D]
        else:
            q_c = torch.empty(n_units, n_t, gq, rt, d, dtype=acc, device=q_u.device)  # [U, T, G, rt, D]
            torch.mul(rows.to(acc), scale, out=q_c)
        scores = torch.bmm(q_c.view(n_units * n_t, gq * rt, d), k_sel.transpose(1, 2))  # [U*T, G*rt, M]
        if c.mask_rows is not None:
            bias = group.palette.index_select(0, c.mask_rows).view(n_units, n_t, -1, rt, c.n_mask * bk)
            prefix = scores.view(n_units, n_t, gq, rt, m)[..., : c.n_mask * bk]
            if finite:
                # an additive -inf/0 mask laid out like the scores' prefix: several times faster
                # than masked_fill_ with a bool mask here
                prefix.add_(bias)
            else:  # a masked inf or NaN score must not survive (inf + -inf is NaN)
                prefix.masked_fill_(torch.isneginf(bias), float("-inf"))
        row_max = scores.amax(-1) if lse_out is not None else None  # [U*T, G*rt]
        probs = torch.softmax(scores, dim=-1) if grad else torch.softmax(scores, dim=-1, out=scores)
        o = torch.bmm(probs, v_sel).view(n_units, n_t, gq, rt, dv)
        if c.empty is not None:
            o.masked_fill_(c.empty[..., None], 0.0)
        dst = out[:, :, c.r0 : c.r1]
        base = c.r_lo + c.lo  # query row of the first computed slot
        if c.r0 == base and c.r1 - c.r0 == n_t * rt:
            dst.view(n_units, gq, n_t, rt, dv).copy_(o.transpose(1, 2))
        else:
            o = o.transpose(1, 2).reshape(n_units, gq, n_t * rt, dv)
            dst.copy_(o[:, :, c.r0 - base : c.r1 - base])
        if lse_out is not None:
            assert row_max is not None
            lse = row_max - torch.log(probs.amax(-1))
            lse = lse.view(n_units, n_t, gq, rt)
            if c.empty is not None:
                lse.masked_fill_(c.empty, float("-inf"))
            lse = lse.transpose(1, 2).reshape(n_units, gq, n_t * rt)
            lse_out[:, :, c.r0 : c.r1] = lse[:, :, c.r0 - base : c.r1 - base]


def _cached_plan(layout: BlockLayout, key: tuple, build):
    """The row plan for ``key``, built on first use and kept on the layout (plan once, run many)."""
    plans = layout.__dict__.get("_prefill_plans")
    if plans is None:
        plans = {}
        object.__setattr__(layout, "_prefill_plans", plans)
    if key not in plans:
        plans[key] = build()
    return plans[key]


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
    hkv, skv, dv = k.shape[1], k.shape[2], v.shape[-1]
    head_units(hq, hkv, layout.num_heads)  # raises on a head count that cannot drive these tensors
    acc = accum_dtype(q.dtype)
    bq, bk = layout.block_q, layout.block_k
    size = torch.finfo(acc).bits // 8
    out = torch.empty(b, hq, sq, dv, dtype=q.dtype, device=q.device)
    lse = (
        torch.full((b, hq, sq), float("-inf"), dtype=accum_dtype(q.dtype), device=q.device)
        if need_lse
        else None
    )
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    pad = -skv % bk
    n_blocks = (skv + pad) // bk

    def per_block_unit(heads: int) -> int:
        return bk * (heads * bq + d + dv) * size

    for row in range(b):
        q_len = layout.geometry(row).q_len
        out[row, :, q_len:] = 0
        if layout.geometry(row).num_tiles == 0:
            continue
        k_row, v_row = k[row], v[row]  # [Hkv, Skv, D]
        # A sum is finite only when every term is: one pass over q and k (O(N D), small next to the
        # attention, no temporary) picks the fast mask; an overflowing sum only costs the slow one.
        finite = bool(torch.isfinite(q[row].sum(dtype=acc))) and bool(torch.isfinite(k_row.sum(dtype=acc)))
        band = None
        if BAND_PREFILL and not grad:  # the band kernel has no autograd path
            band = _cached_plan(layout, ("band", row, hq, hkv), lambda row=row: band_plan(layout, row, hq, hkv))
        if band is not None:
            row_lse = None if lse is None else lse[row]
            band_attention_row(q[row], k_row, v_row, band, scale, acc, out[row], row_lse, finite)
            continue
        key = (row, hq, hkv, n_blocks, d, dv, size, str(q.device))
        groups = _cached_plan(
            layout,
            key,
            lambda row=row: _plan(layout, row, hq, hkv, n_blocks, per_block_unit, acc, q.device),
        )
        if pad:  # whole blocks only: the tail past kv_len is masked
            k_row, v_row = F.pad(k_row, (0, 0, 0, pad)), F.pad(v_row, (0, 0, 0, pad))
        k_blk = k_row.reshape(hkv * n_blocks, bk * d)
        v_blk = v_row.reshape(hkv * n_blocks, bk * dv)
        for group in groups:
            n_units = hq // group.heads
            q_u = q[row].reshape(n_units, group.heads, sq, d)[group.units]
            out_u = out[row].view(n_units, group.heads, sq, dv)[group.units]
            lse_u = None if lse is None else lse[row].view(n_units, group.heads, sq)[group.units]
            _row_attention(q_u, k_blk, v_blk, group, bq, bk, scale, acc, out_u, lse_u, grad, finite)
    return out, lse

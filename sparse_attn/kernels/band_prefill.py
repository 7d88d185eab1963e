"""Sink + sliding-window prefill in plain PyTorch, gathered by token rather than by key block.

A causal sink + window pattern (SinkLocal; MoA's spans where a KV head's query heads share one) is
translation invariant: a tile of
``block_q`` queries starting at position p0 sees the sinks [0, s) and the band (p0 - w, p0 + block_q),
``s + w + block_q - 1`` keys, and the mask over that band is the same for every tile away from the
start of the row. The block kernel gathers whole key blocks instead: the sink block for s < block_k
keys, a partly masked block at each end of the window, so it computes ~10% more scores at ~10%
density and masks three blocks per tile. Here each tile gathers exactly its keys (one row gather, a
small fraction of the matmuls' cost) and masks only the band's two triangles; the first tiles (where
the band meets the sinks or the row's start) and a last partial tile get their mask from the
predicate, per tile.

The result is the block kernel's (same predicate, same keys), so ``block_sparse_attention_torch``
runs this whenever the layout is exactly such a pattern (checked against the layout's blocks, plan
once per layout); a window intersected with another pattern (``Windowed``) is not, and stays on the
block kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..block_layout import BlockLayout
from ..methods.base import tile_bounds

# Upper bound on the scratch (scores + gathered K/V) of one chunk of tiles, in bytes.
CHUNK_BYTES = 8 * 2**20
# The band kernel runs a layout only when the block kernel would compute at least this factor of its
# key columns: a column costs more here (a row gather instead of a block gather, a second mask
# slice). SinkLocal at ~10% in the committed kernel runs: 13% fewer columns at 16k ran faster than
# the block kernel, 6% fewer at 32k slower (bench/results/README.md, "Band kernel vs block kernel").
MIN_SAVING = 1.1


@dataclass(frozen=True)
class _Unit:
    """Query heads ``heads`` (consecutive) of KV head ``kv_head`` sharing one sink and window."""

    kv_head: int
    heads: slice
    sink: int
    window: int


@dataclass(frozen=True)
class BandPlan:
    """A row's units and its tiles: interior tiles [first, last) take the constant band mask."""

    units: tuple[_Unit, ...]
    q_start: int
    q_len: int
    kv_len: int
    block: int


def band_plan(layout: BlockLayout, b: int, hq: int, hkv: int) -> BandPlan | None:
    """The band plan of row b, or None when the layout is not exactly a causal sink + window
    pattern with a window of at least one key (then the block kernel runs it)."""
    if not layout.causal or layout.block_q != layout.block_k:
        return None
    sink, window = layout.head_constraints(b)
    if sink is None or window is None or bool((window < 1).any()):
        return None
    geo = layout.geometry(b)
    nt, nkb = geo.num_tiles, geo.num_kv_blocks
    if nt == 0 or nkb == 0:
        return None
    h = layout.num_heads
    p0, p1 = geo.tile_rows()
    j0, j1 = geo.block_cols()
    s, w = sink.view(h, 1, 1), window.view(h, 1, 1)
    expected, _ = tile_bounds(p0[None, :, None], p1[None, :, None], j0[None, None, :], j1[None, None, :], True, s, w)
    counts = layout.kv_counts[b].cpu()[:, :nt].to(torch.int64)
    idx = layout.kv_indices[b].cpu()[:, :nt].to(torch.int64)
    used = torch.arange(idx.shape[-1]) < counts[..., None]
    listed = torch.zeros(h, nt, nkb + 1, dtype=torch.bool)
    listed.scatter_(2, torch.where(used, idx, nkb), True)
    if not torch.equal(listed[..., :nkb], expected.expand(h, nt, nkb)):
        return None
    # a window past the row's keys (a dense head's) keeps every earlier key: the row's length
    window = window.clamp(max=geo.kv_len)
    g = hq // hkv
    row_of = [0 if h == 1 else (q // g if h == hkv else q) for q in range(hq)]
    units: list[_Unit] = []
    for kv in range(hkv):
        start = kv * g
        for q in range(kv * g, (kv + 1) * g + 1):
            same = q < (kv + 1) * g and (
                int(sink[row_of[q]]) == int(sink[row_of[start]])
                and int(window[row_of[q]]) == int(window[row_of[start]])
            )
            if not same:
                r = row_of[start]
                units.append(_Unit(kv, slice(start, q), int(sink[r]), int(window[r])))
                start = q
    band_cols = sum((u.heads.stop - u.heads.start) * (min(u.sink, geo.kv_len) + u.window + layout.block_q - 1) for u in units)
    block_cols = int(counts.sum()) * layout.block_k * (hq // h)
    if block_cols < MIN_SAVING * band_cols * nt:
        return None
    if len(units) > hkv:
        # query heads of one KV head with different spans (MoA) would run one unit per span: matmuls
        # of a single head's tile rows instead of the block kernel's one matmul over the GQA union
        return None
    return BandPlan(tuple(units), geo.q_start, geo.q_len, geo.kv_len, layout.block_q)


def band_attention_row(
    q: torch.Tensor,  # [Hq, Sq, D] one batch row
    k: torch.Tensor,  # [Hkv, Skv, D]
    v: torch.Tensor,  # [Hkv, Skv, Dv]
    plan: BandPlan,
    scale: float,
    acc: torch.dtype,
    out: torch.Tensor,  # [Hq, Sq, Dv] written in place (rows [0, q_len))
    lse_out: torch.Tensor | None,  # [Hq, Sq]
    finite: bool,
) -> None:
    for unit in plan.units:
        _unit_attention(q, k, v, plan, unit, scale, acc, out, lse_out, finite)


def _unit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: BandPlan,
    unit: _Unit,
    scale: float,
    acc: torch.dtype,
    out: torch.Tensor,
    lse_out: torch.Tensor | None,
    finite: bool,
) -> None:
    bq, s, w = plan.block, min(unit.sink, plan.kv_len), unit.window
    g = unit.heads.stop - unit.heads.start
    d, dv = q.shape[-1], v.shape[-1]
    band = w + bq - 1
    m = s + band
    n_tiles = -(-plan.q_len // bq)
    dev = q.device
    k_rows, v_rows = k[unit.kv_head], v[unit.kv_head]  # [Skv, D]
    q_u = q[unit.heads]  # [G, Sq, D]
    # tile t covers query rows [t*bq, (t+1)*bq), positions q_start + rows; interior tiles: the band
    # starts at or past the sinks and every row is real
    first = min(max(-(-(s + w - 1 - plan.q_start) // bq), 0), n_tiles)
    last = max(plan.q_len // bq, first)
    size = torch.finfo(acc).bits // 8
    per_tile = (g * bq * m + m * (d + dv)) * size
    step = max(1, CHUNK_BYTES // per_tile)
    cols = torch.arange(m, device=dev)
    sink_pos = cols[:s]
    band_off = cols[: band] - (w - 1)  # band column c is position p0 + c - (w - 1)
    lo_bias = hi_bias = None
    if last > first:
        lo_bias, hi_bias = _band_bias(bq, w, acc, dev)
    spans = [(t0, min(t0 + step, first)) for t0 in range(0, first, step)]
    spans += [(t0, min(t0 + step, last)) for t0 in range(first, last, step)]
    spans += [(t0, min(t0 + step, n_tiles)) for t0 in range(last, n_tiles, step)]
    for t0, t1 in spans:
        interior = first <= t0 and t1 <= last
        n_t = t1 - t0
        p0 = plan.q_start + torch.arange(t0, t1, device=dev) * bq  # [T]
        pos = torch.cat((sink_pos.expand(n_t, s), p0[:, None] + band_off), dim=1)  # [T, M]
        gather = pos.clamp(0, max(plan.kv_len - 1, 0)).flatten()
        k_sel = k_rows.index_select(0, gather).view(n_t, m, d).to(acc)
        v_sel = v_rows.index_select(0, gather).view(n_t, m, dv).to(acc)
        r0, r1 = t0 * bq, min(t1 * bq, plan.q_len)
        rows = q_u[:, r0:r1]
        if r1 - r0 < n_t * bq:  # a last partial tile: padded rows are computed and dropped
            rows = torch.nn.functional.pad(rows, (0, 0, 0, n_t * bq - (r1 - r0)))
        q_c = torch.empty(n_t, g, bq, d, dtype=acc, device=dev)
        torch.mul(rows.view(g, n_t, bq, d).transpose(0, 1).to(acc), scale, out=q_c)
        scores = torch.bmm(q_c.view(n_t, g * bq, d), k_sel.transpose(1, 2))  # [T, G*bq, M]
        tiles = scores.view(n_t, g, bq, m)
        if interior:
            assert lo_bias is not None and hi_bias is not None
            _add_mask(tiles[..., s : s + lo_bias.shape[-1]], lo_bias, finite)
            _add_mask(tiles[..., m - hi_bias.shape[-1] :], hi_bias, finite)
        else:
            p = p0[:, None] + torch.arange(bq, device=dev)  # [T, bq] query positions
            pc = pos[:, None, :]  # [T, 1, M]
            in_band = cols >= s
            ok = (pc >= 0) & (pc <= p[..., None]) & (pc < plan.kv_len)
            ok = ok & torch.where(in_band, (pc > p[..., None] - w) & (pc >= s), pc < s)
            tiles.masked_fill_(~ok[:, None], float("-inf"))
        row_max = scores.amax(-1) if lse_out is not None else None
        probs = torch.softmax(scores, dim=-1, out=scores)
        o = torch.bmm(probs, v_sel).view(n_t, g, bq, dv)
        dst = out[unit.heads, r0:r1]
        dst.copy_(o.transpose(0, 1).reshape(g, n_t * bq, dv)[:, : r1 - r0])
        if lse_out is not None:
            assert row_max is not None
            lse = (row_max - torch.log(probs.amax(-1))).view(n_t, g, bq)
            lse_out[unit.heads, r0:r1] = lse.transpose(0, 1).reshape(g, n_t * bq)[:, : r1 - r0]


def _band_bias(bq: int, w: int, acc: torch.dtype, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The band's masks of an interior tile as additive biases: query row r sees band column c iff
    r <= c <= w - 1 + r. Only the first ``bq - 1`` columns (c < r masked) and the last ``bq - 1``
    (c > w - 1 + r masked) hold masked entries when w >= bq - 1; a narrower band gets one bias over
    all its columns (returned as the first, with an empty second)."""
    r = torch.arange(bq, device=dev)[:, None]
    band = w + bq - 1
    if w >= bq - 1:
        c_lo = torch.arange(bq - 1, device=dev)[None, :]
        c_hi = torch.arange(w, band, device=dev)[None, :]
        lo = torch.zeros(bq, bq - 1, dtype=acc, device=dev).masked_fill_(c_lo < r, float("-inf"))
        hi = torch.zeros(bq, bq - 1, dtype=acc, device=dev).masked_fill_(c_hi > w - 1 + r, float("-inf"))
        return lo, hi
    c = torch.arange(band, device=dev)[None, :]
    full = torch.zeros(bq, band, dtype=acc, device=dev).masked_fill_((c < r) | (c > w - 1 + r), float("-inf"))
    return full, full[:, :0]


def _add_mask(scores: torch.Tensor, bias: torch.Tensor, finite: bool) -> None:
    """scores [..., bq, c] += bias [bq, c] (-inf / 0); with non-finite scores a masked inf or NaN
    must not survive (inf + -inf is NaN), so it is written instead."""
    if bias.shape[-1] == 0:
        return
    if finite:
        scores.add_(bias)
    else:
        scores.masked_fill_(torch.isneginf(bias), float("-inf"))

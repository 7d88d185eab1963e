"""Brute-force mask builders: the tests' oracle for the static patterns.

Written straight from the formulas in the pinned API (.spec/API.md) and issue 2, one element at a
time, with plain Python loops and no import of sparse_attn. They are meant to be obviously correct,
not fast: keep the shapes small.

Every builder returns torch.bool [num_heads, q_len, kv_len] (True = attend). Alignment is
bottom-right: query i sits at the absolute position p = kv_len - q_len + i, key j at position j.
Blocks are absolute too: query block qb = p // block_size, key block kb = j // block_size.
"""

from __future__ import annotations

import math

import torch


def _stack(rows, num_heads, q_len, kv_len):
    """Nested Python lists [H][Sq][Skv] of bool -> torch.bool [H, Sq, Skv]."""
    return torch.tensor(rows, dtype=torch.bool).reshape(num_heads, q_len, kv_len)


def _kv_heads(num_heads, num_kv_heads):
    if num_kv_heads is None:
        num_kv_heads = num_heads
    assert num_heads % num_kv_heads == 0
    return num_kv_heads, num_heads // num_kv_heads


def allowed_count(q_len, kv_len, causal):
    """Number of (query, key) pairs a dense attention may use in one head of one row."""
    count = 0
    for i in range(q_len):
        p = kv_len - q_len + i
        for j in range(kv_len):
            if not causal or j <= p:
                count += 1
    return count


def dense_mask(q_len, kv_len, num_heads, causal=True):
    """Every key (causal: every key at or before the query's absolute position)."""
    rows = []
    for _h in range(num_heads):
        head = []
        for i in range(q_len):
            p = kv_len - q_len + i
            row = []
            for j in range(kv_len):
                row.append((j <= p) if causal else True)
            head.append(row)
        rows.append(head)
    return _stack(rows, num_heads, q_len, kv_len)


def s2_mask(
    q_len,
    kv_len,
    num_heads,
    num_kv_heads,
    block_size,
    local_blocks,
    vert_stride,
    head_offset=0,
    homo_head=False,
    num_dense_heads=0,
    causal=True,
):
    """S2-Attention.

    KV head h of a query head (h = q_head // group), s = max(1, vert_stride // num_kv_heads):
    causal: visible iff j <= p and (0 <= qb - kb < local_blocks or (kb + h*s + head_offset) % vert_stride == 0);
    non-causal: |qb - kb| < local_blocks or the same vertical condition.
    homo_head: h = 0 in the vertical condition for every head.
    The last num_dense_heads KV heads (h >= num_kv_heads - num_dense_heads) are dense.
    """
    num_kv_heads, group = _kv_heads(num_heads, num_kv_heads)
    s = max(1, vert_stride // num_kv_heads)
    rows = []
    for q_head in range(num_heads):
        kv_head = q_head // group
        is_dense = kv_head >= num_kv_heads - num_dense_heads
        h = 0 if homo_head else kv_head
        head = []
        for i in range(q_len):
            p = kv_len - q_len + i
            qb = p // block_size
            row = []
            for j in range(kv_len):
                kb = j // block_size
                if causal and j > p:
                    row.append(False)
                    continue
                if is_dense:
                    row.append(True)
                    continue
                if causal:
                    local = 0 <= qb - kb < local_blocks
                else:
                    local = abs(qb - kb) < local_blocks
                vertical = (kb + h * s + head_offset) % vert_stride == 0
                row.append(local or vertical)
            head.append(row)
        rows.append(head)
    return _stack(rows, num_heads, q_len, kv_len)


def s2_residues(num_kv_heads, vert_stride, head_offset=0, homo_head=False, num_dense_heads=0):
    """Residues (h*s + head_offset) % vert_stride hit by the sparse KV heads (h = 0 only if homo_head)."""
    s = max(1, vert_stride // num_kv_heads)
    residues = set()
    for h in range(num_kv_heads):
        if h >= num_kv_heads - num_dense_heads:
            continue  # a dense head, not a sparse one
        if homo_head and h != 0:
            continue
        residues.add((h * s + head_offset) % vert_stride)
    return residues


def s2_covers(num_kv_heads, vert_stride, head_offset=0, homo_head=False, num_dense_heads=0):
    """S2's union over heads is the full context iff a dense head exists or every residue is hit."""
    if num_dense_heads > 0:
        return True
    residues = s2_residues(num_kv_heads, vert_stride, head_offset, homo_head, num_dense_heads)
    for r in range(vert_stride):
        if r not in residues:
            return False
    return True


def s2_uncovered(num_kv_heads, vert_stride, head_offset=0, homo_head=False):
    """Key-block residues r (mod vert_stride) that no sparse head's vertical shard reaches:
    no head h with (r + h*s + head_offset) % vert_stride == 0 (h = 0 only if homo_head)."""
    s = max(1, vert_stride // num_kv_heads)
    uncovered = []
    for r in range(vert_stride):
        seen = False
        for h in range(num_kv_heads):
            if homo_head and h != 0:
                continue
            if (r + h * s + head_offset) % vert_stride == 0:
                seen = True
        if not seen:
            uncovered.append(r)
    return tuple(uncovered)


def _window_head(q_len, kv_len, sink_tokens, window_tokens, causal):
    head = []
    for i in range(q_len):
        p = kv_len - q_len + i
        row = []
        for j in range(kv_len):
            if causal:
                row.append(j <= p and (j < sink_tokens or j > p - window_tokens))
            else:
                row.append(j < sink_tokens or abs(p - j) < window_tokens)
        head.append(row)
    return head


def sink_local_mask(q_len, kv_len, num_heads, sink_tokens, window_tokens, causal=True):
    """SinkLocal: causal: j <= p and (j < sink_tokens or j > p - window_tokens);
    non-causal: j < sink_tokens or |p - j| < window_tokens. Token-exact, block size plays no part."""
    rows = []
    for _h in range(num_heads):
        rows.append(_window_head(q_len, kv_len, sink_tokens, window_tokens, causal))
    return _stack(rows, num_heads, q_len, kv_len)


def moa_span(alpha, beta, n, min_span):
    """span = min(N, max(min_span, floor(alpha + beta * N)))."""
    return min(n, max(min_span, math.floor(alpha + beta * n)))


def moa_mask(q_len, kv_len, alphas, betas, sink_tokens, min_span, causal=True):
    """MoA for one layer: alphas/betas hold one value per query head; N = kv_len.
    Head h is SinkLocal with window_tokens = span_h."""
    assert len(alphas) == len(betas)
    num_heads = len(alphas)
    rows = []
    for h in range(num_heads):
        span = moa_span(alphas[h], betas[h], kv_len, min_span)
        rows.append(_window_head(q_len, kv_len, sink_tokens, span, causal))
    return _stack(rows, num_heads, q_len, kv_len)


def block_sparse_mask(
    q_len,
    kv_len,
    num_heads,
    num_kv_heads,
    block_size,
    layout=None,
    mask_fn=None,
    sink_blocks=0,
    local_blocks=0,
    causal=True,
    batch_idx=0,
):
    """BlockSparse: block (qb, kb) is visible iff any of
    layout[h', qb, kb] (2-D layout: shared by all heads; 3-D: h' = query head if it has num_heads
    rows, else the KV head), mask_fn(b, h, qb, kb) (h = query head), kb < sink_blocks,
    local (causal: 0 <= qb - kb < local_blocks; non-causal: |qb - kb| < local_blocks);
    then element causality j <= p on top."""
    num_kv_heads, group = _kv_heads(num_heads, num_kv_heads)
    n_blocks = (kv_len + block_size - 1) // block_size
    if layout is not None and isinstance(layout, torch.Tensor):
        layout = layout.tolist()
    rows = []
    for q_head in range(num_heads):
        # block-level visibility first, one block pair at a time
        visible = []
        for qb in range(n_blocks):
            vis_row = []
            for kb in range(n_blocks):
                vis = False
                if layout is not None:
                    if not isinstance(layout[0][0], list):  # 2-D [nqb, nkb]
                        vis = vis or bool(layout[qb][kb])
                    elif len(layout) == num_heads:
                        vis = vis or bool(layout[q_head][qb][kb])
                    else:
                        assert len(layout) == num_kv_heads
                        vis = vis or bool(layout[q_head // group][qb][kb])
                if mask_fn is not None:
                    got = mask_fn(
                        torch.tensor(batch_idx),
                        torch.tensor(q_head),
                        torch.tensor(qb),
                        torch.tensor(kb),
                    )
                    vis = vis or bool(got)
                if kb < sink_blocks:
                    vis = True
                if causal:
                    if 0 <= qb - kb < local_blocks:
                        vis = True
                else:
                    if abs(qb - kb) < local_blocks:
                        vis = True
                vis_row.append(vis)
            visible.append(vis_row)
        head = []
        for i in range(q_len):
            p = kv_len - q_len + i
            qb = p // block_size
            row = []
            for j in range(kv_len):
                kb = j // block_size
                if causal and j > p:
                    row.append(False)
                else:
                    row.append(visible[qb][kb])
            head.append(row)
        rows.append(head)
    return _stack(rows, num_heads, q_len, kv_len)


# --- helpers for checking a compiled BlockLayout against the brute-force masks -------------------


def heads_of(layout_head, layout_heads, num_heads, num_kv_heads):
    """Query heads that a layout head stands for (a layout has 1, num_kv_heads or num_heads heads)."""
    num_kv_heads, group = _kv_heads(num_heads, num_kv_heads)
    if layout_heads == num_heads:
        return [layout_head]
    if layout_heads == num_kv_heads:
        return list(range(layout_head * group, (layout_head + 1) * group))
    assert layout_heads == 1, f"layout has {layout_heads} heads; expected 1, {num_kv_heads} or {num_heads}"
    return list(range(num_heads))


def expand_heads(mask, num_heads, num_kv_heads):
    """[B, H, Sq, Skv] with H in (1, num_kv_heads, num_heads) -> [B, num_heads, Sq, Skv]."""
    layout_heads = mask.shape[1]
    index = []
    for q_head in range(num_heads):
        for hh in range(layout_heads):
            if q_head in heads_of(hh, layout_heads, num_heads, num_kv_heads):
                index.append(hh)
                break
    return mask[:, index]


def check_layout_blocks(layout, expected_rows, num_heads, num_kv_heads):
    """Decode the kernel-facing fields of a BlockLayout (not to_dense_mask) and check them:
    kv_indices ascending and in range within kv_counts; every attended element lies in a listed
    block; a block flagged `full` has every in-bounds (causal) element attended.
    expected_rows[b]: brute-force torch.bool [num_heads, q_lens[b], kv_lens[b]]."""
    idx = layout.kv_indices
    counts = layout.kv_counts
    full = layout.full
    bq, bk = int(layout.block_q), int(layout.block_k)
    q_lens = [int(x) for x in layout.q_lens]
    kv_lens = [int(x) for x in layout.kv_lens]
    batch, layout_heads, n_tiles, max_k = idx.shape
    n_kv_blocks = (max(kv_lens) + bk - 1) // bk
    for b in range(batch):
        q_len, kv_len = q_lens[b], kv_lens[b]
        q_start = kv_len - q_len
        for hh in range(layout_heads):
            exp = expected_rows[b][heads_of(hh, layout_heads, num_heads, num_kv_heads)]
            for t in range(n_tiles):
                qb = q_start // bq + t
                lo, hi = max(qb * bq, q_start), min((qb + 1) * bq, kv_len)
                if lo >= hi:
                    continue  # tile past this row's queries
                n = int(counts[b, hh, t])
                assert 0 <= n <= max_k, (b, hh, t, n)
                listed = [int(x) for x in idx[b, hh, t, :n]]
                assert listed == sorted(set(listed)), f"kv_indices not strictly ascending: {listed}"
                assert all(0 <= k < n_kv_blocks for k in listed), f"kv_indices out of range: {listed}"
                flags = [bool(x) for x in full[b, hh, t, :n]]
                rows = exp[:, lo - q_start : hi - q_start]
                for kb in range((kv_len + bk - 1) // bk):
                    blk = rows[:, :, kb * bk : min((kb + 1) * bk, kv_len)]
                    if kb not in listed:
                        assert not blk.any(), (
                            f"row {b} head {hh} tile {t}: attended key block {kb} not listed"
                        )
                        continue
                    if flags[listed.index(kb)]:
                        pos = torch.arange(lo, hi).view(-1, 1)
                        key = torch.arange(kb * bk, min((kb + 1) * bk, kv_len)).view(1, -1)
                        valid = (key <= pos) if layout.causal else torch.ones_like(key <= pos)
                        assert blk[:, valid].all(), (
                            f"row {b} head {hh} tile {t}: key block {kb} flagged full but has masked elements"
                        )

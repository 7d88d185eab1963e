"""Brute-force selections of the dynamic methods, the tests' oracle: float64, plain loops, written
from the formulas in the methods' docstrings (DESIGN.md §3b) with no import of sparse_attn.

Conventions: q [B, Hq, Sq, D], k [B, Hkv, Skv, D], right padding; query i of row b at position
kv_lens[b] - q_lens[b] + i. Query head h reads KV head h // (Hq // Hkv). Every function returns, per
(row, KV head), the set of selected key positions.
"""

from __future__ import annotations

import math


def budget(kv_len: int, density: float | None, tokens: int | None) -> int:
    want = tokens if tokens is not None else math.ceil(kv_len * density)
    return min(want, kv_len)


def _group_rows(q, b, h, group, q_len, kv_len, causal):
    """(query vector float64, absolute position) of every valid query of KV head h's group."""
    rows = []
    for g in range(group):
        for i in range(q_len):
            rows.append((q[b, h * group + g, i].double(), kv_len - q_len + i))
    return rows


def _log_group_mass(row_logits):
    """log sum over rows of softmax(row) per key; rows are {key: logit} dicts (allowed keys only)."""
    mass: dict[int, float] = {}
    for logits in row_logits:
        if not logits:
            continue
        m = max(logits.values())
        z = sum(math.exp(x - m) for x in logits.values())
        for j, x in logits.items():
            mass[j] = mass.get(j, 0.0) + math.exp(x - m) / z
    return mass


def _pick(score: dict[int, float], forced: set[int], count: int) -> set[int]:
    """forced plus the best others (ties: lower index) up to count entries in all."""
    others = sorted((j for j in score if j not in forced), key=lambda j: (-score[j], j))
    return forced | set(others[: max(count - len(forced), 0)])


def topk_decode(q, k, q_lens, kv_lens, scale, causal, density, tokens, sink, local):
    B, Hq = q.shape[0], q.shape[1]
    Hkv = k.shape[1]
    group = Hq // Hkv
    out = []
    for b in range(B):
        kl, ql = int(kv_lens[b]), int(q_lens[b])
        per_head = []
        for h in range(Hkv):
            row_logits = []
            for qv, p in _group_rows(q, b, h, group, ql, kl, causal):
                row_logits.append(
                    {j: float(qv @ k[b, h, j].double()) * scale for j in range(kl) if (not causal or j <= p)}
                )
            mass = _log_group_mass(row_logits)
            forced = {j for j in range(kl) if j < sink or j >= kl - local}
            per_head.append(_pick(mass, forced, budget(kl, density, tokens)))
        out.append(per_head)
    return out


def quest_bounds(q, k, b, h, group, q_len, kv_len, block, scale):
    """{row index: {block: scaled upper bound}} and the per-block (min, max) of KV head h of row b."""
    nb = math.ceil(kv_len / block)
    lo_hi = []
    for blk in range(nb):
        keys = k[b, h, blk * block : min((blk + 1) * block, kv_len)].double()
        lo_hi.append((keys.min(0).values, keys.max(0).values))
    rows = []
    for qv, _ in _group_rows(q, b, h, group, q_len, kv_len, True):
        bounds = {}
        for blk, (lo, hi) in enumerate(lo_hi):
            bounds[blk] = float(sum(max(qv[d] * lo[d], qv[d] * hi[d]) for d in range(len(qv)))) * scale
        rows.append(bounds)
    return rows, lo_hi


def quest_decode(q, k, q_lens, kv_lens, scale, density, tokens, sink, local, block):
    B, Hq = q.shape[0], q.shape[1]
    Hkv = k.shape[1]
    group = Hq // Hkv
    out = []
    for b in range(B):
        kl, ql = int(kv_lens[b]), int(q_lens[b])
        per_head = []
        for h in range(Hkv):
            rows, _ = quest_bounds(q, k, b, h, group, ql, kl, block, scale)
            mass = _log_group_mass(rows)
            last = (kl - 1) // block
            forced = {j for j in range(kl) if j < sink or j >= kl - local or j // block == last}
            n_budget = budget(kl, density, tokens)
            if n_budget >= kl:
                per_head.append(set(range(kl)))
                continue
            n_blocks = max(n_budget - len(forced), 0) // block
            candidates = {
                blk: s
                for blk, s in mass.items()
                if not all(j in forced for j in range(blk * block, min((blk + 1) * block, kl)))
            }
            chosen = _pick(candidates, set(), n_blocks)
            keys = set(forced)
            for blk in chosen:
                keys |= set(range(blk * block, min((blk + 1) * block, kl)))
            per_head.append(keys)
        out.append(per_head)
    return out


def topk_prefill_blocks(q, k, q_len, kv_len, b, scale, causal, density, tokens, sink, local, block):
    """{(KV head, tile): set of key blocks} of the TopK block oracle for row b (absolute tiles)."""
    Hq, Hkv = q.shape[1], k.shape[1]
    group = Hq // Hkv
    q_start = kv_len - q_len
    nkb = math.ceil(kv_len / block)
    first_tile = q_start // block
    out = {}
    for t in range(first_tile, (kv_len - 1) // block + 1):
        p0, p1 = max(t * block, q_start), min((t + 1) * block, kv_len) - 1
        for h in range(Hkv):
            score = {}
            for kb in range(nkb):
                j0, j1 = kb * block, min((kb + 1) * block, kv_len) - 1
                if causal and j0 > p1:
                    continue
                best = -math.inf
                for g in range(group):
                    for p in range(p0, p1 + 1):
                        qv = q[b, h * group + g, p - q_start].double()
                        for j in range(j0, j1 + 1):
                            if not causal or j <= p:
                                best = max(best, float(qv @ k[b, h, j].double()) * scale)
                score[kb] = best
            lo, hi = min(p0 - local + 1, p0), p1 if causal else max(p1 + local - 1, p1)
            forced = {
                kb
                for kb in score
                if kb * block < sink or (min((kb + 1) * block, kv_len) - 1 >= lo and kb * block <= hi)
            }
            visible = p1 + 1 if causal else kv_len
            n_blocks = math.ceil(budget(visible, density, tokens) / block)
            out[(h, t - first_tile)] = _pick(score, forced, n_blocks)
    return out


def loki_decode(q, k, basis, ranks, q_lens, kv_lens, scale, causal, density, tokens, sink, local):
    """Loki: TopK's selection over the projected vectors q P_h and k P_h, P_h the first ranks[h]
    columns of basis[h] [D, D] (zero columns past a head's rank add nothing to a dot product)."""
    Hkv = k.shape[1]
    group = q.shape[1] // Hkv
    width = max(ranks)
    p = basis.new_zeros(Hkv, basis.shape[1], width).double()
    for h in range(Hkv):
        p[h, :, : ranks[h]] = basis[h][:, : ranks[h]].double()
    kp = k.double() @ p  # [B, Hkv, Skv, width]
    qp = q.double() @ p.repeat_interleave(group, dim=0)  # [B, Hq, Sq, width]
    return topk_decode(qp, kp, q_lens, kv_lens, scale, causal, density, tokens, sink, local)

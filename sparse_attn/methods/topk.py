"""TopK: exact top-k attention, the accuracy ceiling every content-based method is measured against.

Decode: exact scores ``q.k * scale`` over every key; the GQA group shares one selection, ranked by
the group's attention mass per key (softmax per query head, summed over the group's heads and
queries: ``dynamic.group_log_mass`` says why); the top ``budget`` keys per KV head, the first
``sink_tokens`` and last ``local_tokens`` keys always among them. Ties go to the earlier key.

Prefill: a block oracle. For every (query tile, key block) of ``block_size`` the max of ``q.k`` over
the tile's queries (all heads of the GQA group) and the block's keys, causally allowed pairs only;
per tile the sink blocks, the blocks of the local window and the diagonal are always kept, and the
best-scoring others fill ``ceil(budget / block_size)`` blocks, where the budget is that of the
tile's last query. The score matrix is built one chunk of tiles at a time (never N x N at once).

No side data: TopK reads the keys. This module is also the pure-torch reference of the Triton
scoring kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..block_layout import BlockLayout, TileGeometry
from ..token_selection import TokenSelection
from ..validation import check_positive_int
from .base import StaticMethod, _RowPlan, _stack_rows
from .dynamic import (
    DynamicMethod,
    check_decode_inputs,
    top_by_score,
    top_tokens_by_scores,
)

# Score elements computed at once by the prefill oracle (bounds its temporaries at ~64 MiB fp32).
ORACLE_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class TopK(DynamicMethod):
    """Exact top-k selection. ``density`` or ``tokens`` (default density 0.05) counts every selected
    key; ``block_size`` tiles the prefill oracle's BlockLayout."""

    name: ClassVar[str] = "topk"
    default_density: ClassVar[float | None] = 0.05
    needs_keys: ClassVar[bool] = True
    density: float | None = None
    tokens: int | None = None
    sink_tokens: int = 4
    local_tokens: int = 16
    block_size: int = 64
    prefill: StaticMethod | None = None

    def __post_init__(self) -> None:
        self._check_budget()
        check_positive_int(self.block_size, "block_size")

    # decode ------------------------------------------------------------------------------------------
    def select_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        side: torch.Tensor | None,
        kv_lens: torch.Tensor,
        q_lens: torch.Tensor,
        scale: float,
        causal: bool,
        backend: str = "torch",
    ) -> TokenSelection:
        assert k is not None, "TopK reads the keys"
        scores = exact_scores(q, k, kv_lens, q_lens, scale, causal, backend)  # [B, Hkv, G*Sq, N]
        return top_tokens_by_scores(scores, kv_lens, q_lens, self.budget, self.sink_tokens, self.local_tokens)

    # prefill -----------------------------------------------------------------------------------------
    def select_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_lens: torch.Tensor,
        kv_lens: torch.Tensor,
        scale: float,
        causal: bool,
        backend: str = "torch",
    ) -> BlockLayout:
        b, hkv, _ = check_decode_inputs(q, k, "k")
        ql, kvl = q_lens.to("cpu", torch.int64), kv_lens.to("cpu", torch.int64)
        rows = [self._plan_row(q[i], k[i], int(ql[i]), int(kvl[i]), scale, causal) for i in range(b)]
        return _stack_rows(rows, hkv, self.block_size, ql, kvl, causal)

    def _plan_row(
        self, q: torch.Tensor, k: torch.Tensor, q_len: int, kv_len: int, scale: float, causal: bool
    ) -> _RowPlan:
        hkv = k.shape[0]
        bs = self.block_size
        geo = TileGeometry(q_len, kv_len, bs, bs)
        nt, nkb = geo.num_tiles, geo.num_kv_blocks
        if nt == 0 or nkb == 0:
            vis = torch.zeros(hkv, nt, nkb, dtype=torch.bool)
            return _RowPlan.from_masks(vis, vis, None, None, hkv)
        score = block_max_scores(q, k, q_len, kv_len, bs, scale, causal).cpu()  # [Hkv, nt, nkb]
        p0, p1 = geo.tile_rows()
        j0, j1 = geo.block_cols()
        allowed = (j0[None, :] <= p1[:, None]) if causal else torch.ones(nt, nkb, dtype=torch.bool)
        # local window of the tile's queries (and the diagonal, also when local_tokens is 0)
        lo = torch.minimum(p0 - self.local_tokens + 1, p0)
        hi = p1 if causal else torch.maximum(p1 + self.local_tokens - 1, p1)
        forced = (j0[None, :] < self.sink_tokens) | ((j1[None, :] >= lo[:, None]) & (j0[None, :] <= hi[:, None]))
        forced = forced & allowed
        visible = (p1 + 1) if causal else torch.full_like(p1, kv_len)
        budget = self.budget(visible.clamp(max=kv_len))  # [nt] keys of the tile's last query
        n_blocks = -(-budget // bs)
        score = torch.where(allowed[None], score, torch.full_like(score, float("-inf")))
        vis = top_by_score(score.transpose(0, 1), forced[:, None].expand(nt, hkv, nkb), n_blocks[:, None])
        vis = vis.transpose(0, 1) & allowed[None]  # [Hkv, nt, nkb]
        full = (j1[None, :] <= p0[:, None]) if causal else torch.ones(nt, nkb, dtype=torch.bool)
        return _RowPlan.from_masks(vis, vis & full[None], None, None, hkv)


def exact_scores(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D]
    kv_lens: torch.Tensor,
    q_lens: torch.Tensor,
    scale: float,
    causal: bool,
    backend: str = "torch",
) -> torch.Tensor:
    """Scaled logits of every (group query row, key): [B, Hkv, G*Sq, Skv], -inf where not allowed
    (key past the row's length, padding query, or a key after the query when causal). ``backend``
    "triton" computes them with the Triton scoring kernel (same values up to fp32 rounding)."""
    b, hkv, g = check_decode_inputs(q, k, "k")
    if backend == "triton":
        from ..api import _triton

        return _triton("dynamic_scores").topk_scores(q, k, q_lens, kv_lens, causal=causal, scale=scale)
    sq, d, n = q.shape[2], q.shape[3], k.shape[2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.reshape(b, hkv, g * sq, d).to(acc)
    scores = torch.matmul(qg * scale, k.to(acc).transpose(-1, -2))
    if sq == 1 and _all_equal(q_lens, 1) and _all_equal(kv_lens, n):
        return scores  # a decode step over full rows: every key is allowed
    dev = q.device
    kvl = kv_lens.to(dev)[:, None, None, None]
    qll = q_lens.to(dev)[:, None, None, None]
    i = torch.arange(sq, device=dev).repeat(g)[None, None, :, None]  # query index of each group row
    j = torch.arange(n, device=dev)[None, None, None, :]
    ok = (j < kvl) & (i < qll)
    if causal:
        ok = ok & (j <= kvl - qll + i)
    return scores.masked_fill_(~ok, float("-inf"))


def _all_equal(lengths: torch.Tensor, value: int) -> bool:
    return all(x == value for x in lengths.tolist())


def block_max_scores(
    q: torch.Tensor,  # [Hq, Sq, D] one row
    k: torch.Tensor,  # [Hkv, Skv, D]
    q_len: int,
    kv_len: int,
    block: int,
    scale: float,
    causal: bool,
) -> torch.Tensor:
    """max of ``q.k * scale`` per (KV head, query tile, key block) over the group's heads, the tile's
    queries and the block's keys (allowed pairs only; -inf where none): [Hkv, num_tiles, num_kv_blocks].
    Tiles follow the absolute tiling of BlockLayout (bottom-right aligned)."""
    hq, d = q.shape[0], q.shape[-1]
    hkv = k.shape[0]
    g = hq // hkv
    geo = TileGeometry(q_len, kv_len, block, block)
    nt, nkb = geo.num_tiles, geo.num_kv_blocks
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dev = q.device
    padded = nkb * block
    keys = torch.zeros(hkv, padded, d, dtype=acc, device=dev)
    keys[:, :kv_len] = k[:, :kv_len].to(acc)
    pos = geo.tile_positions().to(dev)  # [nt, block] absolute query position of each tile slot
    row_ok = (pos >= geo.q_start) & (pos < kv_len)
    qi = (pos - geo.q_start).clamp(0, max(q_len - 1, 0))
    j = torch.arange(padded, device=dev)
    out = torch.empty(hkv, nt, nkb, dtype=acc, device=dev)
    per_tile = g * block * padded
    step = max(1, ORACLE_CHUNK_ELEMENTS // max(per_tile, 1))
    qh = q.reshape(hkv, g, q.shape[1], d)
    for t0 in range(0, nt, step):
        t1 = min(nt, t0 + step)
        qt = qh[:, :, qi[t0:t1].flatten()].to(acc)  # [Hkv, G, tiles*block, D]
        s = torch.matmul(qt, keys.transpose(-1, -2)[:, None]) * scale  # [Hkv, G, tiles*block, padded]
        ok = row_ok[t0:t1].flatten()[:, None] & (j[None, :] < kv_len)
        if causal:
            ok = ok & (j[None, :] <= pos[t0:t1].flatten()[:, None])
        s = s.masked_fill_(~ok, float("-inf"))
        s = s.amax(dim=1).view(hkv, t1 - t0, block, nkb, block)
        out[:, t0:t1] = s.amax(dim=(2, 4))
    return out

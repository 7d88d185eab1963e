"""What every static pattern shares: the element mask for inspection and the compiler to BlockLayout.

A static method describes itself by two hooks, both over ABSOLUTE blocks / positions:
- ``block_visibility``: a block-level candidate set (bool [H, n_q_blocks, n_kv_blocks]) or None (all);
- ``element_window``: per-head (sink, window) token constraints, or None.
The element mask is ``candidate(block of p, block of j) and element_allowed(p, j)``; planning turns the
same description into a BlockLayout with exact full/partial flags, computed from tile bounds (no
element-level work), so a plan costs O(H x n_q_blocks x n_kv_blocks).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..block_layout import NO_WINDOW, BlockLayout, TileGeometry, element_allowed
from ..errors import ShapeError
from ..validation import as_lengths, check_positive_int


def check_heads(num_heads: object, num_kv_heads: object) -> tuple[int, int]:
    hq = check_positive_int(num_heads, "num_heads")
    hkv = hq if num_kv_heads is None else check_positive_int(num_kv_heads, "num_kv_heads")
    if hq % hkv:
        raise ShapeError(f"num_heads ({hq}) must be a multiple of num_kv_heads ({hkv})")
    return hq, hkv


def expand_heads(t: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Map a per-pattern-head tensor [H, ...] (H in 1, Hkv, Hq) to one row per query head."""
    h = t.shape[0]
    if h == num_heads:
        return t
    if h == num_kv_heads:
        return t.repeat_interleave(num_heads // num_kv_heads, dim=0)
    if h == 1:
        return t.expand(num_heads, *t.shape[1:])
    raise ShapeError(f"pattern has {h} heads; expected 1, {num_kv_heads} or {num_heads}")


def tile_bounds(
    p0: torch.Tensor,
    p1: torch.Tensor,
    j0: torch.Tensor,
    j1: torch.Tensor,
    causal: bool,
    sink: torch.Tensor | None,
    window: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whether the element predicate holds for ANY / ALL pairs of the rectangle [p0,p1] x [j0,j1].

    All arguments broadcast; the rectangles are the valid rows and columns of (tile, key block).
    """
    true = torch.ones((), dtype=torch.bool)
    any_ok = j0 <= p1 if causal else true
    all_ok = j1 <= p0 if causal else true
    if window is None:
        return any_ok, all_ok
    assert sink is not None
    if causal:
        in_window = (torch.maximum(p0, j0) <= torch.minimum(p1, j1 + window - 1)) & (window >= 1)
        any_ok = any_ok & (in_window | (j0 < sink))
        outside = torch.maximum(j0, sink) <= torch.minimum(j1, p1 - window)
    else:
        gap = torch.clamp(torch.maximum(j0 - p1, p0 - j1), min=0)
        any_ok = (gap < window) | (j0 < sink)
        j0s = torch.maximum(j0, sink)
        outside = (j0s <= j1) & (torch.maximum(j1 - p0, p1 - j0s) >= window)
    return any_ok, all_ok & ~outside


class StaticMethod:
    """Base of the static patterns (frozen dataclasses with a ``block_size`` field)."""

    name: ClassVar[str]
    block_size: int

    # hooks -----------------------------------------------------------------------------------------
    def pattern_heads(self, num_heads: int, num_kv_heads: int) -> int:
        return 1

    def block_visibility(
        self,
        q_blocks: torch.Tensor,  # [nq] absolute query block indices
        kv_blocks: torch.Tensor,  # [nk]
        *,
        num_heads: int,
        num_kv_heads: int,
        kv_len: int,
        causal: bool,
        batch_index: int,
    ) -> torch.Tensor | None:
        return None

    def element_window(
        self, *, num_heads: int, num_kv_heads: int, kv_len: int
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def for_layer(self, layer_idx: int) -> StaticMethod:
        return self

    def check_fits(self, num_heads: int, num_kv_heads: int) -> None:
        """Raise ConfigError when the method cannot serve a layer with these head counts."""

    # serialisation -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        params = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]
        return {"method": self.name, **params}

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> StaticMethod:
        return cls(**params)

    # public API ----------------------------------------------------------------------------------------
    def mask(
        self, q_len: int, kv_len: int, num_heads: int, num_kv_heads: int | None = None, *, causal: bool = True
    ) -> torch.Tensor:
        """bool [num_heads, q_len, kv_len]: True where query i (at position kv_len - q_len + i) attends key j."""
        hq, hkv = check_heads(num_heads, num_kv_heads)
        q_len = _check_len(q_len, "q_len")
        kv_len = _check_len(kv_len, "kv_len")
        if causal and q_len > kv_len:
            raise ShapeError(f"causal masks need q_len <= kv_len, got q_len={q_len}, kv_len={kv_len}")
        self.check_fits(hq, hkv)
        geo = TileGeometry(q_len, kv_len, self.block_size, self.block_size)
        p = torch.arange(q_len, dtype=torch.int64) + geo.q_start
        j = torch.arange(kv_len, dtype=torch.int64)
        sink, window = self._window(hq, hkv, kv_len)
        allowed = element_allowed(p[:, None], j[None, :], kv_len, causal, sink, window)  # [H|1, Sq, Skv]
        if allowed.dim() == 2:
            allowed = allowed[None]
        allowed = allowed.expand(allowed.shape[0], q_len, kv_len)
        if q_len and kv_len:
            qb = p // self.block_size
            kb = torch.arange(geo.num_kv_blocks, dtype=torch.int64)
            qb_all = torch.arange(int(qb.min()), int(qb.max()) + 1, dtype=torch.int64)
            cand = self.block_visibility(
                qb_all, kb, num_heads=hq, num_kv_heads=hkv, kv_len=kv_len, causal=causal, batch_index=0
            )
            if cand is not None:
                cand = cand[:, qb - qb_all[0]][:, :, j // self.block_size]
                allowed = expand_heads(cand, hq, hkv) & expand_heads(allowed, hq, hkv)
        return expand_heads(allowed, hq, hkv).contiguous()

    def plan(
        self,
        q_lens: int | Any,
        kv_lens: int | Any,
        num_heads: int,
        num_kv_heads: int | None = None,
        *,
        causal: bool = True,
    ) -> BlockLayout:
        """Compile the pattern for these per-row lengths into a BlockLayout (reusable across calls)."""
        hq, hkv = check_heads(num_heads, num_kv_heads)
        self.check_fits(hq, hkv)
        batch = _batch_of(q_lens, kv_lens)
        big = 2**62
        kvl = as_lengths(kv_lens, "kv_lens", batch, 0, big)
        ql = as_lengths(q_lens, "q_lens", batch, 0, big)
        if causal and bool((ql > kvl).any()):
            raise ShapeError(f"causal plans need q_lens <= kv_lens, got {ql.tolist()} and {kvl.tolist()}")
        rows: dict[tuple[int, int, int], _RowPlan] = {}
        plans = []
        for b in range(batch):
            key = (int(ql[b]), int(kvl[b]), b if self._batch_dependent() else 0)
            if key not in rows:
                rows[key] = self._plan_row(key[0], key[1], hq, hkv, causal, b)
            plans.append(rows[key])
        return _stack_rows(plans, self.pattern_heads(hq, hkv), self.block_size, ql, kvl, causal)

    # internals -----------------------------------------------------------------------------------------
    def _batch_dependent(self) -> bool:
        return False

    def _window(self, hq: int, hkv: int, kv_len: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        cons = self.element_window(num_heads=hq, num_kv_heads=hkv, kv_len=kv_len)
        if cons is None:
            return None, None
        sink, window = cons
        return sink[:, None, None].to(torch.int64), window[:, None, None].to(torch.int64)

    def _plan_row(self, q_len: int, kv_len: int, hq: int, hkv: int, causal: bool, b: int) -> _RowPlan:
        h = self.pattern_heads(hq, hkv)
        geo = TileGeometry(q_len, kv_len, self.block_size, self.block_size)
        nt, nkb = geo.num_tiles, geo.num_kv_blocks
        sink, window = self._window(hq, hkv, kv_len)
        if nt == 0 or nkb == 0:
            vis = torch.zeros(h, nt, nkb, dtype=torch.bool)
            return _RowPlan.from_masks(vis, vis, sink, window, h)
        p0, p1 = geo.tile_rows()
        j0, j1 = geo.block_cols()
        any_ok, all_ok = tile_bounds(p0[:, None], p1[:, None], j0[None, :], j1[None, :], causal, sink, window)
        qb = torch.arange(nt, dtype=torch.int64) + geo.first_q_block
        kb = torch.arange(nkb, dtype=torch.int64)
        cand = self.block_visibility(
            qb, kb, num_heads=hq, num_kv_heads=hkv, kv_len=kv_len, causal=causal, batch_index=b
        )
        vis = any_ok if cand is None else any_ok & cand
        full = all_ok if cand is None else all_ok & cand
        shape = (h, nt, nkb)
        return _RowPlan.from_masks(vis.expand(shape), full.expand(shape), sink, window, h)


@dataclasses.dataclass(frozen=True)
class _RowPlan:
    indices: torch.Tensor  # [H, nt, mk]
    counts: torch.Tensor  # [H, nt]
    full: torch.Tensor  # [H, nt, mk]
    sink: torch.Tensor | None  # [H]
    window: torch.Tensor | None  # [H]

    @staticmethod
    def from_masks(
        vis: torch.Tensor, full: torch.Tensor, sink: torch.Tensor | None, window: torch.Tensor | None, h: int
    ) -> _RowPlan:
        counts = vis.sum(-1)
        mk = int(counts.max()) if counts.numel() else 0
        slot = torch.cumsum(vis, dim=-1) - 1  # target slot of every visible block
        slot = torch.where(vis, slot, torch.full_like(slot, mk))  # invisible ones go to a spare slot
        kb = torch.arange(vis.shape[-1], dtype=torch.int64).expand_as(slot)
        indices = torch.zeros(*vis.shape[:-1], mk + 1, dtype=torch.int64).scatter_(-1, slot, kb)
        flags = torch.zeros(*vis.shape[:-1], mk + 1, dtype=torch.bool).scatter_(-1, slot, full & vis)
        if sink is not None:
            sink = sink.reshape(-1).expand(h)
            window = window.reshape(-1).expand(h)  # type: ignore[union-attr]
        return _RowPlan(indices[..., :mk], counts, flags[..., :mk], sink, window)


def _stack_rows(
    rows: list[_RowPlan], h: int, block: int, ql: torch.Tensor, kvl: torch.Tensor, causal: bool
) -> BlockLayout:
    batch = len(rows)
    nt = max((r.counts.shape[-1] for r in rows), default=0)
    mk = max((r.indices.shape[-1] for r in rows), default=0)
    indices = torch.zeros(batch, h, nt, mk, dtype=torch.int32)
    counts = torch.zeros(batch, h, nt, dtype=torch.int32)
    full = torch.zeros(batch, h, nt, mk, dtype=torch.bool)
    windowed = any(r.window is not None for r in rows)
    sink = torch.zeros(batch, h, dtype=torch.int64) if windowed else None
    window = torch.full((batch, h), NO_WINDOW, dtype=torch.int64) if windowed else None
    for b, r in enumerate(rows):
        t, k = r.indices.shape[1], r.indices.shape[2]
        indices[b, :, :t, :k] = r.indices
        counts[b, :, :t] = r.counts
        full[b, :, :t, :k] = r.full
        if r.window is not None:
            sink[b] = r.sink  # type: ignore[index]
            window[b] = r.window  # type: ignore[index]
    return BlockLayout(indices, counts, full, block, block, ql, kvl, causal, sink, window)


def _check_len(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ShapeError(f"{name} must be a non-negative int, got {value!r}")
    return value


def _batch_of(q_lens: object, kv_lens: object) -> int:
    for v in (kv_lens, q_lens):
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            return int(v.shape[0])
        if isinstance(v, (list, tuple)):
            return len(v)
    return 1


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value

"""BlockLayout: the block-sparse format every static pattern compiles to (prefill and block decode).

For each (batch row, layout head, query tile) the layout lists the key blocks to visit, ascending, and
flags which of them are *full* (every valid element attended, no element mask) and which are
*partial* (the element predicate below decides inside the block), as FlexAttention's BlockMask and
flash-attn's ``full_block_idx`` do.

Query tiles are ABSOLUTE blocks: with ``q_start = kv_len - q_len`` (bottom-right alignment), tile
``t`` of row ``b`` covers absolute positions ``[(q_start // block_q + t) * block_q, ... + block_q)``
clipped to the row's queries. Block-level patterns are therefore exact for chunked prefill too.

Element predicate inside partial blocks (``p`` query position, ``j`` key position)::

    j < kv_len  and  (not causal or j <= p)  and  (window is None or |p - j| < window or j < sink)

The layout's head axis H is 1 (shared), Hkv (a GQA group shares its KV head's row) or Hq.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .errors import LayoutError, ShapeError
from .token_selection import TokenSelection

NO_WINDOW = 2**60  # a window longer than any sequence: "no window" for a head in a mixed layout


def element_allowed(
    p: torch.Tensor,
    j: torch.Tensor,
    kv_len: int | torch.Tensor,
    causal: bool,
    sink: torch.Tensor | None,
    window: torch.Tensor | None,
) -> torch.Tensor:
    """The element predicate (broadcasting); ``sink``/``window`` must already broadcast against p and j."""
    ok = (j >= 0) & (j < kv_len)
    if causal:
        ok = ok & (j <= p)
    if window is not None:
        assert sink is not None
        ok = ok & (((j > p - window) & (j < p + window)) | (j < sink))
    return ok


@dataclass(frozen=True)
class TileGeometry:
    """Absolute geometry of one batch row: which query tiles and key blocks exist and their bounds."""

    q_len: int
    kv_len: int
    block_q: int
    block_k: int

    @property
    def q_start(self) -> int:
        return self.kv_len - self.q_len

    @property
    def first_q_block(self) -> int:
        return self.q_start // self.block_q

    @property
    def num_tiles(self) -> int:
        if self.q_len <= 0:
            return 0
        return (self.kv_len - 1) // self.block_q - self.first_q_block + 1

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.block_k) if self.kv_len > 0 else 0

    def tile_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last valid absolute query position of each tile, [num_tiles] each."""
        qb = torch.arange(self.num_tiles, dtype=torch.int64) + self.first_q_block
        p0 = torch.clamp(qb * self.block_q, min=self.q_start)
        p1 = torch.clamp((qb + 1) * self.block_q, max=self.kv_len) - 1
        return p0, p1

    def block_cols(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First and last valid key position of each key block, [num_kv_blocks] each."""
        kb = torch.arange(self.num_kv_blocks, dtype=torch.int64)
        return kb * self.block_k, torch.clamp((kb + 1) * self.block_k, max=self.kv_len) - 1

    def tile_positions(self) -> torch.Tensor:
        """Absolute query position of every row slot of every tile, [num_tiles, block_q]."""
        qb = torch.arange(self.num_tiles, dtype=torch.int64) + self.first_q_block
        return qb[:, None] * self.block_q + torch.arange(self.block_q, dtype=torch.int64)


def _as_int_tensor(t: torch.Tensor, name: str, dim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise LayoutError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise LayoutError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != dim:
        raise LayoutError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Block-sparse layout. Shapes: kv_indices/full [B, H, n_q_blocks, max_k], kv_counts [B, H, n_q_blocks]."""

    kv_indices: torch.Tensor
    kv_counts: torch.Tensor
    full: torch.Tensor
    block_q: int
    block_k: int
    q_lens: torch.Tensor
    kv_lens: torch.Tensor
    causal: bool = True
    sink_tokens: torch.Tensor | None = None
    window_tokens: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return int(self.kv_indices.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.kv_indices.shape[1])

    @property
    def num_q_blocks(self) -> int:
        return int(self.kv_indices.shape[2])

    @property
    def max_k(self) -> int:
        return int(self.kv_indices.shape[3])

    def to(self, device: torch.device | str) -> BlockLayout:
        """The same layout with every tensor on ``device`` (move once, run many)."""

        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            kv_indices=self.kv_indices.to(device),
            kv_counts=self.kv_counts.to(device),
            full=self.full.to(device),
            q_lens=self.q_lens.to(device),
            kv_lens=self.kv_lens.to(device),
            sink_tokens=move(self.sink_tokens),
            window_tokens=move(self.window_tokens),
        )

    def geometry(self, b: int) -> TileGeometry:
        return TileGeometry(int(self.q_lens[b]), int(self.kv_lens[b]), self.block_q, self.block_k)

    def head_constraints(self, b: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(sink [H], window [H]) of row b, or (None, None) when the layout has no window."""
        if self.window_tokens is None:
            return None, None
        assert self.sink_tokens is not None
        return self.sink_tokens[b].to("cpu", torch.int64), self.window_tokens[b].to("cpu", torch.int64)

    def validate(self) -> BlockLayout:
        """Raise LayoutError unless the layout is well formed; returns self for chaining.

        A layout that passed is remembered as valid (plan once, run many: the run step does not
        re-check it); its tensors must not be modified in place afterwards."""
        if self.__dict__.get("_validated"):
            return self
        self._check()
        object.__setattr__(self, "_validated", True)
        return self

    def _check(self) -> None:
        _as_int_tensor(self.kv_indices, "kv_indices", 4)
        _as_int_tensor(self.kv_counts, "kv_counts", 3)
        _as_int_tensor(self.q_lens, "q_lens", 1)
        _as_int_tensor(self.kv_lens, "kv_lens", 1)
        for name, bs in (("block_q", self.block_q), ("block_k", self.block_k)):
            if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0:
                raise LayoutError(f"{name} must be a positive int, got {bs!r}")
        b, h, nq, mk = self.kv_indices.shape
        if tuple(self.kv_counts.shape) != (b, h, nq):
            raise LayoutError(f"kv_counts must have shape {(b, h, nq)}, got {tuple(self.kv_counts.shape)}")
        if not isinstance(self.full, torch.Tensor) or self.full.dtype != torch.bool:
            raise LayoutError("full must be a bool tensor")
        if tuple(self.full.shape) != (b, h, nq, mk):
            raise LayoutError(f"full must have shape {(b, h, nq, mk)}, got {tuple(self.full.shape)}")
        if tuple(self.q_lens.shape) != (b,) or tuple(self.kv_lens.shape) != (b,):
            raise LayoutError(f"q_lens and kv_lens must have shape ({b},)")
        if bool((self.q_lens < 0).any()) or bool((self.kv_lens < 0).any()):
            raise LayoutError("q_lens and kv_lens must be non-negative")
        if self.causal and bool((self.q_lens > self.kv_lens).any()):
            raise LayoutError("a causal layout needs q_lens <= kv_lens in every row")
        for name, t in (("sink_tokens", self.sink_tokens), ("window_tokens", self.window_tokens)):
            if t is not None:
                _as_int_tensor(t, name, 2)
                if tuple(t.shape) != (b, h):
                    raise LayoutError(f"{name} must have shape {(b, h)}, got {tuple(t.shape)}")
                if bool((t < 0).any()):
                    raise LayoutError(f"{name} must be non-negative")
        if (self.sink_tokens is None) != (self.window_tokens is None):
            raise LayoutError("sink_tokens and window_tokens must be given together")
        counts = self.kv_counts.to("cpu", torch.int64)
        if bool((counts < 0).any()) or bool((counts > mk).any()):
            raise LayoutError(f"kv_counts must lie in [0, max_k={mk}]")
        idx = self.kv_indices.to("cpu", torch.int64)
        slot = torch.arange(mk)
        used = slot < counts[..., None]  # [B, H, nq, mk]
        for row in range(b):
            geo = self.geometry(row)
            if geo.num_tiles > nq:
                raise LayoutError(
                    f"row {row} needs {geo.num_tiles} query tiles for q_len={geo.q_len}, kv_len={geo.kv_len} "
                    f"and block_q={self.block_q}, but kv_indices has {nq}"
                )
            if bool((counts[row, :, geo.num_tiles :] > 0).any()):
                raise LayoutError(
                    f"row {row} lists key blocks for query tiles beyond its {geo.num_tiles} tiles"
                )
            u = used[row]
            ix = idx[row]
            if bool(((ix < 0) | (ix >= geo.num_kv_blocks))[u].any()):
                raise LayoutError(
                    f"kv_indices of row {row} must lie in [0, {geo.num_kv_blocks}) for kv_len={geo.kv_len}"
                )
            if mk > 1:
                inc = ix[..., 1:] > ix[..., :-1]
                if bool((~inc & u[..., 1:]).any()):
                    raise LayoutError(f"kv_indices of row {row} must be strictly increasing within kv_counts")

    def _row_block_masks(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Visible and full flags per (head, tile, key block) of row b: bool [H, num_tiles, num_kv_blocks]."""
        geo = self.geometry(b)
        nt, nkb = geo.num_tiles, geo.num_kv_blocks
        h = self.num_heads
        vis = torch.zeros(h, nt, nkb + 1, dtype=torch.bool)
        full = torch.zeros(h, nt, nkb + 1, dtype=torch.bool)
        if nt == 0 or nkb == 0:
            return vis[..., :nkb], full[..., :nkb]
        idx = self.kv_indices[b, :, :nt].to("cpu", torch.int64)
        used = torch.arange(self.max_k) < self.kv_counts[b, :, :nt].to("cpu", torch.int64)[..., None]
        col = torch.where(used, idx.clamp(0, nkb - 1), torch.full_like(idx, nkb))
        vis.scatter_(2, col, used)
        full.scatter_(2, col, used & self.full[b, :, :nt].cpu())
        return vis[..., :nkb], full[..., :nkb]

    def to_dense_mask(self, q_len: int | None = None, kv_len: int | None = None) -> torch.Tensor:
        """The exact element mask, bool [B, H, q_len, kv_len] (defaults: the longest row's lengths)."""
        sq = int(self.q_lens.max()) if q_len is None else q_len
        skv = int(self.kv_lens.max()) if kv_len is None else kv_len
        out = torch.zeros(self.batch_size, self.num_heads, sq, skv, dtype=torch.bool)
        for b in range(self.batch_size):
            geo = self.geometry(b)
            if geo.q_len == 0 or geo.kv_len == 0:
                continue
            vis, full = self._row_block_masks(b)
            p = torch.arange(geo.q_len, dtype=torch.int64) + geo.q_start
            j = torch.arange(geo.kv_len, dtype=torch.int64)
            t = p // self.block_q - geo.first_q_block
            kb = j // self.block_k
            vis_e = vis[:, t][:, :, kb]  # [H, q_len, kv_len]
            full_e = full[:, t][:, :, kb]
            sink, window = self.head_constraints(b)
            pred = element_allowed(
                p[:, None],
                j[None, :],
                geo.kv_len,
                self.causal,
                None if sink is None else sink[:, None, None],
                None if window is None else window[:, None, None],
            )
            out[b, :, : geo.q_len, : geo.kv_len] = vis_e & (full_e | pred)
        return out

    def decode_selection(self) -> TokenSelection:
        """The same attention as a TokenSelection, for layouts whose rows have at most one query
        (decode): the keys of the row's listed blocks that the element predicate keeps, ascending.

        Built once per layout and kept (plan once, run many: every layer of a decode step runs the
        step's layout, and each reuses this)."""
        cached = self.__dict__.get("_decode_selection")
        if cached is None:
            cached = self._build_decode_selection().built_for(self.kv_lens)
            object.__setattr__(self, "_decode_selection", cached)
        return cached

    def is_decode(self) -> bool:
        """Whether every row has at most one query (a decode step's layout)."""
        flag = self.__dict__.get("_is_decode")
        if flag is None:
            flag = not self.batch_size or int(self.q_lens.max()) <= 1
            object.__setattr__(self, "_is_decode", flag)
        return flag

    def _build_decode_selection(self) -> TokenSelection:
        if self.batch_size and int(self.q_lens.max()) > 1:
            raise LayoutError(f"decode_selection needs q_lens <= 1, got {self.q_lens.tolist()}")
        b, h, bk = self.batch_size, self.num_heads, self.block_k
        dev = self.kv_indices.device
        if self.num_q_blocks == 0 or b == 0:
            empty = torch.zeros(b, h, 0, dtype=torch.int64, device=dev)
            return TokenSelection(empty, torch.zeros(b, h, dtype=torch.int64, device=dev))
        blocks = self.kv_indices[:, :, 0].to(torch.int64)  # [B, H, MK]
        slot_used = torch.arange(self.max_k, device=dev) < self.kv_counts[:, :, 0, None].to(torch.int64)
        keys = (blocks[..., None] * bk + torch.arange(bk, device=dev)).flatten(2)  # [B, H, MK*bk]
        kv_len = self.kv_lens.to(dev, torch.int64)[:, None, None]
        q_len = self.q_lens.to(dev, torch.int64)[:, None, None]
        sink = None if self.sink_tokens is None else self.sink_tokens.to(dev)[:, :, None]
        window = None if self.window_tokens is None else self.window_tokens.to(dev)[:, :, None]
        pred = element_allowed(kv_len - 1, keys, kv_len, self.causal, sink, window)
        full = self.full[:, :, 0].to(dev).repeat_interleave(bk, dim=-1)
        used = slot_used.repeat_interleave(bk, dim=-1)
        ok = used & (full | pred) & (keys < kv_len) & (q_len > 0)
        counts = ok.sum(-1)
        k_max = int(counts.max())
        ordered = torch.sort(torch.where(ok, keys, torch.full_like(keys, 2**62)), dim=-1).values[..., :k_max]
        indices = torch.where(torch.arange(k_max, device=dev) < counts[..., None], ordered, 0)
        return TokenSelection(indices, counts)

    def attended_pairs(self) -> int:
        """Number of (row, head, query, key) pairs attended, computed block by block (no dense mask)."""
        total = 0
        for b in range(self.batch_size):
            geo = self.geometry(b)
            if geo.num_tiles == 0 or geo.num_kv_blocks == 0:
                continue
            vis, full = self._row_block_masks(b)
            p0, p1 = geo.tile_rows()
            j0, j1 = geo.block_cols()
            sizes = (p1 - p0 + 1)[:, None] * (j1 - j0 + 1)[None, :]  # [nt, nkb]
            total += int((sizes[None] * full).sum())
            partial = (vis & ~full).nonzero()  # [n, 3] (head, tile, kb)
            if partial.numel() == 0:
                continue
            sink, window = self.head_constraints(b)
            for chunk in partial.split(4096):
                hh, tt, kk = chunk.unbind(1)
                p = (tt + geo.first_q_block)[:, None, None] * self.block_q + torch.arange(self.block_q)[
                    :, None
                ]
                j = kk[:, None, None] * self.block_k + torch.arange(self.block_k)[None, :]
                rows_ok = (p >= geo.q_start) & (p < geo.kv_len)
                pred = element_allowed(
                    p,
                    j,
                    geo.kv_len,
                    self.causal,
                    None if sink is None else sink[hh][:, None, None],
                    None if window is None else window[hh][:, None, None],
                )
                total += int((pred & rows_ok).sum())
        return total

    def allowed_pairs(self) -> int:
        """Pairs a dense attention with the same causality and lengths would attend."""
        total = 0
        for b in range(self.batch_size):
            geo = self.geometry(b)
            if geo.q_len == 0 or geo.kv_len == 0:
                continue
            if self.causal:
                p = torch.arange(geo.q_start, geo.kv_len, dtype=torch.int64)
                per_head = int((p + 1).clamp(max=geo.kv_len).sum())
            else:
                per_head = geo.q_len * geo.kv_len
            total += per_head * self.num_heads
        return total

    def density(self) -> float:
        """Fraction of the allowed (in-bounds, causal when causal) pairs that the layout attends."""
        allowed = self.allowed_pairs()
        return self.attended_pairs() / allowed if allowed else 0.0

    def check_fits(self, batch: int, q_len: int, kv_len: int, num_heads: int, num_kv_heads: int) -> None:
        """Raise unless this layout can drive attention over tensors of these sizes."""
        if self.batch_size != batch:
            raise ShapeError(f"layout has batch {self.batch_size}, tensors have {batch}")
        if self.num_heads not in (1, num_kv_heads, num_heads):
            raise ShapeError(
                f"layout has {self.num_heads} heads; expected 1, num_kv_heads={num_kv_heads} or num_heads={num_heads}"
            )
        if int(self.q_lens.max()) > q_len or int(self.kv_lens.max()) > kv_len:
            raise ShapeError(
                f"layout lengths (q_lens={self.q_lens.tolist()}, kv_lens={self.kv_lens.tolist()}) exceed the "
                f"tensors' q_len={q_len}, kv_len={kv_len}"
            )

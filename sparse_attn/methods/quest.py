"""Quest: query-aware block selection from per-block key bounds (Tang et al., 2024).

Side data, per block of ``block_size`` keys (a power of two, default 16) and KV head: the elementwise
min and max of the block's keys, ``[2, D]`` in the keys' dtype. For a query ``q`` the block's score is
the upper bound ``sum_d max(q_d * min_d, q_d * max_d) >= max_{j in block} q.k_j``. The GQA group
shares one selection: each query head's bounds (scaled) go through a softmax over blocks and the
group sums them (in the log domain), as TopK aggregates exact scores.

Decode keeps the first ``sink_tokens`` keys, the last ``local_tokens`` keys and the current (last,
partly filled) block, then the best-scoring other blocks, whole, as many as fit in what is left of
the budget (``floor(left / block_size)``); a budget that covers the row keeps every key. Quest has no
prefill selector: prefill runs ``prefill`` (a static method, or dense when None), by design.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from ..token_selection import TokenSelection
from .base import StaticMethod
from .dynamic import (
    DynamicMethod,
    SideSpec,
    check_decode_inputs,
    mask_to_selection,
    top_by_score,
)


@dataclass(frozen=True)
class Quest(DynamicMethod):
    """Quest block selection. ``density`` or ``tokens`` (default 1024 tokens, the paper's common budget)
    counts every selected key; ``block_size`` is Quest's page of keys (16)."""

    name: ClassVar[str] = "quest"
    default_tokens: ClassVar[int | None] = 1024
    density: float | None = None
    tokens: int | None = None
    sink_tokens: int = 4
    local_tokens: int = 16
    block_size: int = 16
    prefill: StaticMethod | None = None

    def __post_init__(self) -> None:
        self._check_budget()
        bs = self.block_size
        if isinstance(bs, bool) or not isinstance(bs, int) or bs <= 0 or bs & (bs - 1):
            raise ConfigError(f"block_size must be a positive power of two (Quest's key block), got {bs!r}")

    def side_spec(self, head_dim: int) -> SideSpec:
        return SideSpec("block", self.block_size, (2, head_dim))

    def compute_side(self, keys: torch.Tensor, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
        return block_min_max(keys, self.block_size, kv_lens)

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
        assert side is not None, "Quest selects from its block side data"
        b, hkv, _ = check_decode_inputs(q, side, "side")
        kvl = kv_lens.to("cpu", torch.int64)
        kv = kvl.tolist()
        bs = self.block_size
        nb = -(-max(kv, default=0) // bs)
        rows = [self._row_plan(n) for n in kv]
        # A decode step costs a few dozen small ops: the per-row arithmetic stays in Python, and the
        # work on tensors is O(blocks + budget), never a mask over all N keys.
        if all(r.count == 0 for r in rows):
            chosen = torch.zeros(b, hkv, 0, dtype=torch.int64, device=q.device)
        else:
            # [B, Hkv, G*Sq, nb]
            bounds, masked = self._bounds(q, side[:, :, :nb], kv, q_lens, scale, backend)
            chosen = _top_blocks(_group_mass(bounds, masked, log_domain=False), rows, linear=True)
            if chosen is None:  # a mass at the cut underflowed: rank in the log domain
                chosen = _top_blocks(_group_mass(bounds, masked, log_domain=True), rows, linear=False)
                assert chosen is not None
        return _selected_tokens(chosen, rows, bs).built_for(kvl)

    def _row_plan(self, kv_len: int) -> _RowPlan:
        bs = self.block_size
        s = min(kv_len, self.sink_tokens)
        # the local window and the current (last, partly filled) block: keys [t, kv_len)
        t = max(min(kv_len - self.local_tokens, max(kv_len - 1, 0) // bs * bs), 0)
        if self.tokens is not None:
            budget = min(self.tokens, kv_len)
        else:
            assert self.density is not None
            budget = min(math.ceil(kv_len * self.density), kv_len)
        if t <= s or budget >= kv_len:  # every key is kept
            return _RowPlan(kv_len, kv_len, kv_len, 0, 0, kv_len)
        n_blocks = max(budget - s - (kv_len - t), 0) // bs
        # candidates: blocks not wholly kept already, [first, stop)
        first, stop = s // bs, -(-t // bs)
        return _RowPlan(s, t, kv_len, first, min(n_blocks, stop - first), stop)

    def _bounds(
        self,
        q: torch.Tensor,
        side: torch.Tensor,
        kv: list[int],
        q_lens: torch.Tensor,
        scale: float,
        backend: str,
    ) -> tuple[torch.Tensor, bool]:
        """Each query row's scaled bounds per block [B, Hkv, G*Sq, nb], and whether some are -inf
        (blocks past a row's keys, padded query rows)."""
        bs = self.block_size
        nb, sq, dev = side.shape[2], q.shape[2], q.device
        bounds = block_bounds(q, side, scale, backend)  # [B, Hkv, G*Sq, nb]
        ragged_blocks = any(n <= (nb - 1) * bs for n in kv)
        ragged_rows = any(n < sq for n in q_lens.tolist())
        if ragged_blocks or ragged_rows:
            block_ok = torch.arange(nb, device=dev)[None, :] * bs < torch.tensor(kv, device=dev)[:, None]
            rows = torch.arange(sq, device=dev).repeat(bounds.shape[2] // max(sq, 1))
            row_ok = rows[None, :] < q_lens.to(dev)[:, None]
            ok = block_ok[:, None, None, :] & row_ok[:, None, :, None]
            bounds = bounds.masked_fill(~ok, float("-inf"))
        return bounds, ragged_blocks or ragged_rows


def _group_mass(bounds: torch.Tensor, masked: bool, log_domain: bool) -> torch.Tensor:
    """The GQA group's attention mass per block from the bounds [B, Hkv, G*Sq, nb] (``masked``: some
    are -inf): each query row's softmax over blocks, summed over the rows -> [B, Hkv, nb]; a row
    with no block adds nothing.

    The linear domain costs a few ops (on a CPU the log domain's logsumexp over the group costs more
    than the bounds' matmul); a far-off block's mass may underflow to 0 there, so ranking falls back
    to the log domain when a 0 is taken (``_top_blocks``)."""
    if log_domain:
        mass = torch.log_softmax(bounds, dim=-1)
        if masked:
            mass = mass.nan_to_num(nan=float("-inf"))
        return mass[:, :, 0] if mass.shape[2] == 1 else torch.logsumexp(mass, dim=2)
    mass = torch.softmax(bounds, dim=-1)
    if masked:
        mass = mass.nan_to_num(nan=0.0)
    return mass[:, :, 0] if mass.shape[2] == 1 else mass.sum(2)


@dataclass(frozen=True)
class _RowPlan:
    """One row's decode plan: keys [0, sink) and [local, kv_len) are always kept; ``count`` whole
    blocks are chosen among blocks [first, stop)."""

    sink: int
    local: int
    kv_len: int
    first: int
    count: int
    stop: int


def _top_blocks(score: torch.Tensor, rows: list[_RowPlan], linear: bool) -> torch.Tensor | None:
    """The chosen blocks of every (row, KV head): int64 [B, Hkv, C], ascending, padded with a block
    id past the scores (``score.shape[-1]``). Best scores first; ties go to the lower block. None
    when ``linear`` (the scores are masses) and a score of 0 (an underflowed mass) is taken."""
    b, hkv, nb = score.shape
    dev = score.device
    spans = {(r.first, r.count, r.stop) for r in rows}
    if len(spans) == 1:  # every row alike (always at batch 1): the candidates are one slice
        first, count, stop = spans.pop()
        if count == stop - first:
            return torch.arange(first, stop, device=dev).expand(b, hkv, count)
        ids = _top_ids(score[:, :, first:stop], count, None, linear)
        return None if ids is None else ids + first
    j = torch.arange(nb, device=dev)
    first = torch.tensor([r.first for r in rows], device=dev)[:, None, None]
    stop = torch.tensor([r.stop for r in rows], device=dev)[:, None, None]
    score = score.masked_fill((j < first) | (j >= stop), float("-inf"))
    counts = torch.tensor([r.count for r in rows], device=dev)
    return _top_ids(score, max(r.count for r in rows), counts, linear)


def _top_ids(score: torch.Tensor, k: int, counts: torch.Tensor | None, linear: bool) -> torch.Tensor | None:
    """Ascending ids of the ``k`` best scores per row [B, H, n] (``counts`` [B]: fewer for some rows,
    the rest padded with n); ties at the cut go to the lower index, as a stable sort would. None when
    ``linear`` (the scores are masses) and a score of 0 (an underflowed mass) is taken."""
    b, h, n = score.shape
    if k == 0:
        return torch.zeros(b, h, 0, dtype=torch.int64, device=score.device)
    kk = min(k + 1, n)
    top = torch.topk(score, kk, dim=-1, sorted=True)  # one past the cut, to see ties there
    want = None if counts is None else counts[:, None, None].expand(b, h, 1)
    if want is None:
        # the last score taken and the next one, read once: [B * H, 1 or 2]
        pairs = top.values[..., k - 1 : k + 1].flatten(0, 1).tolist()
        if linear and any(pair[0] <= 0 for pair in pairs):
            return None
        tie = any(pair[0] == pair[-1] for pair in pairs) if k < n else False
    else:
        last = top.values.gather(-1, (want - 1).clamp(min=0))
        if linear and bool(((last <= 0) & (want > 0)).any()):
            return None
        after = top.values.gather(-1, want.clamp(max=kk - 1))
        tie = bool(((last == after) & (want > 0) & (want < kk)).any())
    if tie:
        # topk's order among equal scores is unspecified: when a score ties the last one taken (rare),
        # choose by the stable rule on the whole row instead
        cap = torch.full((b, h), k, device=score.device) if want is None else want[..., 0]
        mask = top_by_score(score, torch.zeros_like(score, dtype=torch.bool), cap)
        ids = mask_to_selection(mask)
        return torch.where(ids.used(), ids.indices, n)
    ids = top.indices[..., :k]
    if want is not None:
        ids = torch.where(torch.arange(k, device=score.device) < want, ids, n)
    return ids.sort(dim=-1).values


def _selected_tokens(chosen: torch.Tensor, rows: list[_RowPlan], bs: int) -> TokenSelection:
    """The selected keys: each row's always-kept ranges [0, sink) and [local, kv_len) plus every other
    key of its chosen blocks (int64 [B, Hkv, C], ascending, padded with ids past the row)."""
    b, hkv, c = chosen.shape
    dev = chosen.device
    if c and len(set(rows)) == 1:
        alike = _alike_rows_tokens(chosen, rows[0], bs)
        if alike is not None:
            return alike
    s: int | torch.Tensor
    t: int | torch.Tensor
    n: int | torch.Tensor
    if len({(r.sink, r.local, r.kv_len) for r in rows}) == 1:
        s, t, n = rows[0].sink, rows[0].local, rows[0].kv_len
    else:
        s, t, n = (
            torch.tensor(x, device=dev)[:, None, None]
            for x in zip(*[(r.sink, r.local, r.kv_len) for r in rows])
        )
    p = torch.arange(max(r.kv_len for r in rows) if rows else 0, device=dev)  # output slots
    if c == 0:
        counts = torch.zeros(b, hkv, 1, dtype=torch.int64, device=dev) + (s + n - t)
        idx = torch.where(p < s, p, p + (t - s))
    else:
        tok = (chosen[..., None] * bs + torch.arange(bs, device=dev)).flatten(-2)  # [B, Hkv, C*bs] ascending
        # tok's keys that are not kept already are one run [lo, lo + mid): a chosen block may overlap
        # the kept ranges (the block of the last sink, the one where the window starts)
        lo = (tok < s).sum(-1, keepdim=True)
        mid = (tok < t).sum(-1, keepdim=True) - lo  # [B, Hkv, 1]
        counts = mid + (s + n - t)
        p = p[: int(counts.max())]
        from_tok = tok.gather(-1, (p - s + lo).clamp(0, tok.shape[-1] - 1))
        idx = torch.where(p < s, p, torch.where(p < s + mid, from_tok, p - mid + (t - s)))
    width = int(counts.max()) if counts.numel() else 0
    idx = idx[..., :width].expand(b, hkv, width)
    idx = idx.masked_fill(p[:width] >= counts, 0)
    return TokenSelection(idx, counts[..., 0])


def _alike_rows_tokens(chosen: torch.Tensor, row: _RowPlan, bs: int) -> TokenSelection | None:
    """``_selected_tokens`` when every row has one plan (a decode step at batch 1, or of rows alike)
    and every (row, KV head) drops as many keys of its chosen blocks: the selection is one
    concatenation. Only the first candidate block can hold sinks and only the last one keys of the
    local window, so the chosen keys left are one slice of them. None otherwise."""
    b, hkv, c = chosen.shape
    s, t, n = row.sink, row.local, row.kv_len
    below, above = s - row.first * bs, row.stop * bs - t  # keys of the end blocks already kept
    ends = chosen[..., :: max(c - 1, 1)].flatten(0, 1).tolist()  # first and last chosen block
    cuts = {
        (below if e[0] == row.first else 0, above if e[-1] == row.stop - 1 else 0) for e in ends
    }
    if len(cuts) != 1:
        return None
    lo, hi = cuts.pop()
    dev = chosen.device
    tok = (chosen[..., None] * bs + torch.arange(bs, device=dev)).flatten(-2)  # [B, Hkv, C*bs] ascending
    idx = torch.cat(
        (
            torch.arange(s, device=dev).expand(b, hkv, s),
            tok[..., lo : c * bs - hi],
            torch.arange(t, n, device=dev).expand(b, hkv, n - t),
        ),
        dim=-1,
    )
    return TokenSelection(idx, torch.full((b, hkv), idx.shape[-1], dtype=torch.int64, device=dev))


def block_min_max(keys: torch.Tensor, block: int, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise min and max of each block of keys: keys [..., n, D] -> [..., ceil(n / block), 2, D]
    (index 0 min, 1 max) in the keys' dtype. Without ``kv_lens`` a last partial block holds the keys
    left over; with it (broadcast against the leading dims; n a multiple of ``block``) keys at or past
    it are left out, and a block with no key gets zeros."""
    *lead, n, d = keys.shape
    if kv_lens is None:
        whole = n // block * block
        parts = []
        if whole:
            blocks = keys[..., :whole, :].reshape(*lead, whole // block, block, d)
            parts.append(torch.stack((blocks.amin(-2), blocks.amax(-2)), dim=-2))
        if whole < n:  # a decode step's current block: its keys so far, no padding
            tail = keys[..., whole:, :]
            parts.append(torch.stack((tail.amin(-2), tail.amax(-2)), dim=-2).unsqueeze(-3))
        if not parts:
            return keys.new_zeros(*lead, 0, 2, d)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-3)
    if n % block:
        raise ConfigError(f"keys cover {n} positions, not a whole number of {block}-key blocks")
    blocks = keys.reshape(*lead, n // block, block, d)
    j = torch.arange(n, device=keys.device).view(n // block, block)
    present = j < kv_lens.to(keys.device).reshape(*kv_lens.shape, 1, 1)  # [..., nb, block]
    present = present.reshape(*present.shape, 1)
    big = torch.finfo(keys.dtype).max
    lo = torch.where(present, blocks, torch.full_like(blocks, big)).amin(-2)
    hi = torch.where(present, blocks, torch.full_like(blocks, -big)).amax(-2)
    empty = ~present.any(-2)  # [..., nb, 1]
    lo = lo.masked_fill(empty, 0)
    hi = hi.masked_fill(empty, 0)
    return torch.stack((lo, hi), dim=-2)


def block_bounds(q: torch.Tensor, side: torch.Tensor, scale: float, backend: str = "torch") -> torch.Tensor:
    """Quest's upper bounds, scaled: q [B, Hq, Sq, D], side [B, Hkv, nb, 2, D] ->
    [B, Hkv, G*Sq, nb] with ``sum_d max(q_d min_d, q_d max_d) * scale`` (per query head and query).
    ``backend`` "triton" computes them with the Triton bound kernel (same values up to fp32 rounding)."""
    if backend == "triton":
        from ..api import _triton

        return _triton("dynamic_scores").quest_bounds(q, side, scale)
    b, hq, sq, d = q.shape
    hkv = side.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.reshape(b, hkv, (hq // hkv) * sq, d).to(acc)
    # max(q*lo, q*hi) = q*lo where q < 0, q*hi where q >= 0 (lo <= hi): one matmul of [min(q, 0), max(q, 0)]
    # against each block's (min, max) row as stored, [B, Hkv, nb, 2D], without copying the side data
    q2 = torch.cat((qg.clamp(max=0), qg.clamp(min=0)), dim=-1)  # [B, Hkv, G*Sq, 2D]
    # blocks as the rows of the product: it reads the side data row by row (twice as fast on CPU);
    # the result is made contiguous again, so the softmax over blocks that follows runs on rows
    bound = torch.matmul(side.flatten(-2).to(acc), q2.transpose(-1, -2)).transpose(-1, -2).contiguous()
    return bound * scale

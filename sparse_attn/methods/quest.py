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
    group_log_mass,
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
        b, _, _ = check_decode_inputs(q, side, "side")
        bs = self.block_size
        kvl = kv_lens.to("cpu", torch.int64)
        n = int(kvl.max()) if b else 0
        nb = -(-n // bs)
        dev = q.device
        bounds = block_bounds(q, side[:, :, :nb], scale, backend)  # [B, Hkv, G*Sq, nb]
        blk = torch.arange(nb, device=dev)
        sq = q.shape[2]
        if bool((kvl > (nb - 1) * bs).all()) and bool((q_lens.to("cpu") >= sq).all()):
            score = group_log_mass(bounds)  # [B, Hkv, nb]: every block and query row is real
        else:
            block_ok = blk[None, :] * bs < kvl.to(dev)[:, None]  # [B, nb]
            rows = torch.arange(sq, device=dev).repeat(bounds.shape[2] // max(sq, 1))
            row_ok = rows[None, :] < q_lens.to(dev)[:, None]
            ok = block_ok[:, None, None, :] & row_ok[:, None, :, None]
            score = group_log_mass(bounds.masked_fill(~ok, float("-inf")))

        # The always-kept keys are two ranges per row: [0, s) (sinks) and [t, kv_len) (the local window
        # and the current block). Everything below works on blocks and on the selected keys only
        # (O(blocks + budget)), never on a mask over all N keys.
        kvl_d = kvl.to(dev)
        s = kvl.clamp(max=self.sink_tokens)
        t = torch.minimum(kvl - self.local_tokens, (kvl - 1).clamp(min=0) // bs * bs).clamp(min=0)
        t = torch.where(t <= s, torch.zeros_like(t), t)  # the ranges meet: every key is kept
        s = torch.where(t == 0, kvl, s)
        kept_count = s + (kvl - t).clamp(min=0) * (t > 0)
        budget = self.budget(kvl)
        n_blocks = (budget - kept_count).clamp(min=0) // bs
        everything = budget >= kvl
        n_blocks = torch.where(everything, torch.full_like(n_blocks, nb), n_blocks)
        s_d, t_d = s.to(dev)[:, None], torch.where(t > 0, t, kvl).to(dev)[:, None]  # kept: j < s or j >= t
        start = blk[None, :] * bs  # [1, nb]
        stop = torch.minimum(start + bs, kvl_d[:, None])  # [B, nb] end of each block within the row
        # blocks entirely kept already (or past the row) are no candidates
        covered = (stop <= s_d) | (start >= t_d)
        score = score.masked_fill(covered[:, None, :], float("-inf"))
        chosen = top_by_score(score, torch.zeros_like(score, dtype=torch.bool), n_blocks.to(dev)[:, None])
        touches_kept = ((start < s_d) | (stop > t_d)) & (start < kvl_d[:, None])  # [B, nb]
        visit = mask_to_selection(chosen | touches_kept[:, None])  # blocks holding selected keys
        blocks = visit.indices  # [B, Hkv, m], ascending
        m = blocks.shape[-1]
        tok = (blocks[..., None] * bs + torch.arange(bs, device=dev)).reshape(b, -1, m * bs)
        slot_ok = torch.arange(m, device=dev) < visit.counts.to(dev)[..., None]  # [B, Hkv, m]
        slot_ok = slot_ok.repeat_interleave(bs, dim=-1)
        whole = chosen.gather(-1, blocks).repeat_interleave(bs, dim=-1)
        kvl3, s3, t3 = kvl_d[:, None, None], s_d[:, :, None], t_d[:, :, None]
        keep = slot_ok & (tok < kvl3) & (whole | (tok < s3) | (tok >= t3))
        packed = mask_to_selection(keep)
        counts = packed.counts
        width = packed.indices.shape[-1]
        indices = tok.gather(-1, packed.indices)
        indices = torch.where(torch.arange(width, device=dev) < counts[..., None], indices, 0)
        return TokenSelection(indices, counts).built_for(kvl)


def block_min_max(keys: torch.Tensor, block: int, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise min and max of each block of keys: keys [..., n, D] (n a multiple of ``block``) ->
    [..., n / block, 2, D] (index 0 min, 1 max) in the keys' dtype. Keys at or past ``kv_lens``
    (broadcast against the leading dims) are left out; a block with no key gets zeros."""
    *lead, n, d = keys.shape
    if n % block:
        raise ConfigError(f"keys cover {n} positions, not a whole number of {block}-key blocks")
    blocks = keys.reshape(*lead, n // block, block, d)
    if kv_lens is None:
        return torch.stack((blocks.amin(-2), blocks.amax(-2)), dim=-2)
    j = torch.arange(n, device=keys.device).view(n // block, block)
    present = (j < kv_lens.to(keys.device).reshape(*kv_lens.shape, 1, 1))  # [..., nb, block]
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

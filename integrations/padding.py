"""Per-row token spans read from a Hugging Face 4D attention mask, and the moves between HF's padded
tensors and the right-padded rows the kernels take.

HF hands the attention function one mask ``[B, 1 | H, Sq, Skv]`` (bool, True = attend; or additive
float, 0 = attend) that folds padding, causality and a sliding window together. The sparse kernels
instead take per-row lengths over right-padded rows, with query i of row b at key position
``kv_len[b] - q_len[b] + i``. ``read_mask`` recovers, per row, where the real keys start and end and
which query rows are real; it then rebuilds the mask those spans imply and compares it with HF's, so
any mask that is not exactly "padding + causal (+ window)" (packed sequences, custom masks, biases)
is reported as unsupported instead of being silently misread.

Everything here is plain torch; nothing imports transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

CHUNK_ELEMENTS = 1 << 24  # mask elements examined at a time (bounds the temporaries at ~100 MiB)


@dataclass(frozen=True)
class RowSpans:
    """Where each row's real tokens sit in the padded tensors (int64 CPU tensors [B]).

    Row b's keys are ``k[b, :, key_start[b] : key_start[b] + kv_lens[b]]`` and its real queries are
    ``q[b, :, q_start[b] : q_start[b] + q_lens[b]]``, bottom-right aligned against those keys.
    """

    key_start: torch.Tensor
    q_start: torch.Tensor
    q_lens: torch.Tensor
    kv_lens: torch.Tensor

    @cached_property
    def shifted(self) -> bool:
        """Whether some row's tokens do not start at index 0 (left padding): a gather is needed."""
        return bool(self.key_start.any()) or bool(self.q_start.any())

    @cached_property
    def lengths_key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(q_lens, kv_lens) as Python tuples: a cache key (spans are read once per forward and shared
        by its layers, so this is computed once too)."""
        return tuple(self.q_lens.tolist()), tuple(self.kv_lens.tolist())

    @cached_property
    def max_kv_len(self) -> int:
        return max(self.lengths_key[1], default=0)

    def to_right_padded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] with every row's tokens moved to the front.

        Without left padding the tensors are returned as they are (no copy)."""
        if not self.shifted:
            return q, k, v
        sq = max(int(self.q_lens.max()), 1)
        skv = max(int(self.kv_lens.max()), 1)
        qn = q.new_zeros(q.shape[0], q.shape[1], sq, q.shape[3])
        kn = k.new_zeros(k.shape[0], k.shape[1], skv, k.shape[3])
        vn = v.new_zeros(v.shape[0], v.shape[1], skv, v.shape[3])
        for b, (ks, qs, ql, kl) in enumerate(self._rows()):
            qn[b, :, :ql] = q[b, :, qs : qs + ql]
            kn[b, :, :kl] = k[b, :, ks : ks + kl]
            vn[b, :, :kl] = v[b, :, ks : ks + kl]
        return qn, kn, vn

    def from_right_padded(self, out: torch.Tensor, q_len: int) -> torch.Tensor:
        """Put the kernel's right-padded output [B, H, Sq', Dv] back at the rows' query positions
        in [B, H, q_len, Dv]; rows of padding queries are zero."""
        if not self.shifted and out.shape[2] == q_len:
            return out
        full = out.new_zeros(out.shape[0], out.shape[1], q_len, out.shape[3])
        for b, (_, qs, ql, _) in enumerate(self._rows()):
            full[b, :, qs : qs + ql] = out[b, :, :ql]
        return full

    def _rows(self) -> list[tuple[int, int, int, int]]:
        return list(
            zip(self.key_start.tolist(), self.q_start.tolist(), self.q_lens.tolist(), self.kv_lens.tolist())
        )


def plain_spans(batch: int, q_len: int, kv_len: int, causal: bool) -> RowSpans:
    """No padding: every row holds all q_len queries and kv_len keys (what a None mask means)."""
    zeros = torch.zeros(batch, dtype=torch.int64)
    ql = torch.full((batch,), min(q_len, kv_len) if causal else q_len, dtype=torch.int64)
    return RowSpans(zeros, zeros.clone(), ql, torch.full((batch,), kv_len, dtype=torch.int64))


def allowed_from_mask(mask: torch.Tensor) -> torch.Tensor | str:
    """bool [B, Sq, Skv] from a 4D HF mask, or the reason it is not a plain visibility mask."""
    if mask.dim() != 4:
        return "mask_rank"
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.dtype.is_floating_point:
        # An additive mask is a visibility mask only if it holds 0 (attend) and "minus infinity"
        # (HF uses finfo.min); any other value is a bias the sparse kernels would drop.
        allowed = mask == 0
        blocked = torch.isneginf(mask) | (mask <= torch.finfo(mask.dtype).min / 2)
        if not bool((allowed | blocked).all()):
            return "attention_bias"
    else:
        return "mask_dtype"
    if allowed.shape[1] != 1 and not bool((allowed == allowed[:, :1]).all()):
        return "per_head_mask"
    return allowed[:, 0]


def read_mask(
    mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    kv_len: int,
    *,
    causal: bool,
    window: int | None = None,
    position_ids: torch.Tensor | None = None,
) -> RowSpans | str:
    """The row spans that HF's ``mask`` encodes, or a short reason why it encodes something else.

    ``causal``: the module is causal (query i sits at key index c0 + i for one offset c0 shared by
    the batch, as with every HF cache); ``window``: the model's sliding window (keys with
    ``p - j >= window`` are masked), used to tell a window from left padding; ``position_ids``
    [1|B, Sq] break the tie when the window hides where a row's padding ends.
    """
    if mask is None:
        if causal and q_len > kv_len:
            return "more_queries_than_keys"
        if causal and 1 < q_len < kv_len:
            # HF skips the mask only where SDPA's is_causal (top-left aligned) is exact: a static
            # cache's first prefill, whose keys past the prompt are empty slots. Query i sees keys 0..i.
            return plain_spans(batch, q_len, q_len, causal)
        return plain_spans(batch, q_len, kv_len, causal)
    if mask.shape[0] != batch or mask.shape[-2] != q_len or mask.shape[-1] != kv_len:
        return "mask_shape"
    allowed = allowed_from_mask(mask)
    if isinstance(allowed, str):
        return allowed
    if not causal and q_len != kv_len:
        return "non_causal_cross_lengths"
    last, seen_lo, seen_hi = _scan(allowed)
    kv_end = seen_hi + 1  # [B] one past the last key any query sees (0 for an all-masked row)
    if causal:
        rows = torch.arange(q_len, dtype=torch.int64)
        has = last >= 0
        c0 = int((last - rows)[has].max()) if bool(has.any()) else kv_len - q_len
        if c0 < 0 or c0 + q_len > kv_len:
            return "unsupported_mask"
        key_start = seen_lo.clone()
        if window is not None and c0 > 0:
            # A sliding window can hide where a row's padding ends, and HF's sliding-window caches
            # drop keys that left the window (key index 0 is then no longer position 0). Position ids
            # tell both apart.
            starts = _starts_from_positions(position_ids, seen_lo, c0)
            if starts is None:
                return "no_position_ids"
            starts = torch.where(kv_end > 0, starts, torch.zeros_like(starts))
            if bool((starts < 0).any()):
                return "cropped_cache"
            hidden = (seen_lo > 0) & (seen_lo <= c0) & (seen_lo == max(c0 - window + 1, 0))
            if not bool((starts <= seen_lo)[hidden].all()):
                return "ambiguous_padding"
            key_start = torch.where(hidden, starts, key_start)
        key_start = torch.where(kv_end > 0, key_start, torch.zeros_like(key_start))
        q_first = torch.clamp(key_start - c0, min=0)
        q_lens = torch.clamp(kv_end - torch.clamp(key_start, min=c0), min=0)
        spans = RowSpans(key_start, q_first, q_lens, torch.clamp(kv_end - key_start, min=0))
    else:
        c0 = 0
        key_start = torch.where(kv_end > 0, seen_lo, torch.zeros_like(seen_lo))
        lens = torch.clamp(kv_end - key_start, min=0)
        spans = RowSpans(key_start, key_start.clone(), lens, lens.clone())
    if not _matches(allowed, spans, c0, causal, window):
        return "unsupported_mask"
    return spans


def _scan(allowed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query row the last visible key ([B, Sq], -1 when none) and per batch row the first / last
    key visible to any query ([B]; kv_len / -1 when none)."""
    b, sq, skv = allowed.shape
    idx = torch.arange(skv, device=allowed.device)
    first = torch.empty(b, sq, dtype=torch.int64)
    last = torch.empty(b, sq, dtype=torch.int64)
    step = max(1, CHUNK_ELEMENTS // max(1, b * skv))
    for s in range(0, sq, step):
        a = allowed[:, s : s + step]
        first[:, s : s + step] = torch.where(a, idx, skv).amin(-1).cpu() if skv else 0
        last[:, s : s + step] = torch.where(a, idx, -1).amax(-1).cpu() if skv else -1
    seen_lo = first.amin(-1) if sq else torch.full((b,), skv, dtype=torch.int64)
    seen_hi = last.amax(-1) if sq else torch.full((b,), -1, dtype=torch.int64)
    return last, seen_lo, seen_hi


def _starts_from_positions(
    position_ids: torch.Tensor | None, seen_lo: torch.Tensor, c0: int
) -> torch.Tensor | None:
    """Per row, the key index of position 0 implied by the position ids of its first real query
    (row max(0, seen_lo - c0), at key index c0 + that row); None without usable position ids."""
    if position_ids is None or position_ids.dim() != 2:
        return None
    batch = seen_lo.shape[0]
    if position_ids.shape[0] not in (1, batch):
        return None
    if position_ids.shape[1] == 0:
        return None
    rows = torch.clamp(seen_lo - c0, min=0, max=position_ids.shape[1] - 1)
    pos = position_ids.to("cpu", torch.int64).expand(batch, -1)
    return c0 + rows - pos.gather(1, rows[:, None])[:, 0]


def _matches(allowed: torch.Tensor, spans: RowSpans, c0: int, causal: bool, window: int | None) -> bool:
    """Whether the mask is exactly what the spans (plus causality and the window) imply."""
    b, sq, skv = allowed.shape
    dev = allowed.device
    lo = spans.key_start.to(dev)[:, None, None]
    hi = (spans.key_start + spans.kv_lens).to(dev)[:, None, None]
    j = torch.arange(skv, device=dev)[None, None, :]
    step = max(1, CHUNK_ELEMENTS // max(1, b * skv))
    for s in range(0, sq, step):
        p = torch.arange(s, min(s + step, sq), device=dev)[None, :, None] + c0
        expect = (j >= lo) & (j < hi)
        if causal:
            expect = expect & (j <= p)
        if window is not None:
            expect = expect & (p - j < window) & (j - p < window)
        if not bool((allowed[:, s : s + step] == expect).all()):
            return False
    return True

"""integrations/padding.py: reading per-row spans from HF-style 4D masks, and the padding moves.

Masks are built element by element from the spans (the brute-force side); read_mask must recover the
spans exactly, and must refuse any mask that is not "padding + causal (+ window)".
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sparse_attn.integrations.padding import RowSpans, read_mask


def build_mask(starts, ends, q_len, kv_len, c0, causal, window):
    """bool [B, 1, Sq, Skv]: row b's query i (at key index c0 + i) sees key j iff starts[b] <= j <
    ends[b], j <= its index when causal, and |index - j| < window."""
    rows = []
    for s, e in zip(starts, ends):
        row = []
        for i in range(q_len):
            p = c0 + i
            row.append(
                [
                    s <= j < e and (not causal or j <= p) and (window is None or abs(p - j) < window)
                    for j in range(kv_len)
                ]
            )
        rows.append([row])
    return torch.tensor(rows, dtype=torch.bool).reshape(len(starts), 1, q_len, kv_len)


@st.composite
def causal_cases(draw):
    batch = draw(st.integers(1, 3))
    q_len = draw(st.integers(1, 12))
    c0 = draw(st.integers(0, 12))
    kv_len = c0 + q_len + draw(st.integers(0, 3))  # > c0 + q_len: a static cache's unused tail
    window = draw(st.one_of(st.none(), st.integers(1, 20)))
    starts, ends = [], []
    for _ in range(batch):
        s = draw(st.integers(0, c0 + q_len - 1))  # left padding (may cover some query rows)
        e = draw(st.integers(max(s + 1, c0 + 1), c0 + q_len))  # right padding of the queries
        starts.append(s)
        ends.append(e)
    return batch, q_len, kv_len, c0, window, starts, ends


@given(causal_cases())
def test_causal_spans_are_recovered(case) -> None:
    batch, q_len, kv_len, c0, window, starts, ends = case
    mask = build_mask(starts, ends, q_len, kv_len, c0, True, window)
    # position ids as generate() makes them: position 0 at the row's first real key
    pos = torch.tensor([[max(c0 + i - s, 0) for i in range(q_len)] for s in starts])
    spans = read_mask(mask, batch, q_len, kv_len, causal=True, window=window, position_ids=pos)
    assert isinstance(spans, RowSpans), spans
    for b, (s, e) in enumerate(zip(starts, ends)):
        assert int(spans.key_start[b]) == s
        assert int(spans.kv_lens[b]) == e - s
        assert int(spans.q_start[b]) == max(0, s - c0)
        assert int(spans.q_lens[b]) == e - max(c0, s)


@given(causal_cases(), st.data())
def test_a_hole_in_the_mask_is_unsupported(case, data) -> None:
    batch, q_len, kv_len, c0, window, starts, ends = case
    mask = build_mask(starts, ends, q_len, kv_len, c0, True, window)
    holes = [
        (b, i, j)
        for b in range(batch)
        for i in range(q_len)
        for j in range(kv_len)
        if mask[b, 0, i, j] and (j - 1 >= 0 and mask[b, 0, i, j - 1]) and (j + 1 < kv_len and mask[b, 0, i, j + 1])
    ]
    if not holes:
        holes = [(0, q_len - 1, kv_len - 1)]  # no interior key: flip a masked corner instead
    b, i, j = data.draw(st.sampled_from(holes))
    mask[b, 0, i, j] = ~mask[b, 0, i, j]
    pos = torch.tensor([[max(c0 + i - s, 0) for i in range(q_len)] for s in starts])
    out = read_mask(mask, batch, q_len, kv_len, causal=True, window=window, position_ids=pos)
    if isinstance(out, RowSpans):
        # the only way a flip can stay valid is by being another exact span mask (possibly with the
        # queries at another offset): some offset must rebuild it exactly
        starts_, ends_ = out.key_start.tolist(), (out.key_start + out.kv_lens).tolist()
        assert any(
            torch.equal(build_mask(starts_, ends_, q_len, kv_len, c, True, window), mask)
            for c in range(kv_len - q_len + 1)
        )
    else:
        assert out in ("unsupported_mask", "ambiguous_padding", "cropped_cache")


@pytest.mark.parametrize("pads", [[0], [0, 3], [5, 0, 1]])
def test_non_causal_right_padding(pads) -> None:
    n = 9
    starts = [0] * len(pads)
    ends = [n - p for p in pads]
    mask = build_mask(starts, ends, n, n, 0, False, None)
    spans = read_mask(mask, len(pads), n, n, causal=False)
    assert isinstance(spans, RowSpans)
    assert spans.kv_lens.tolist() == ends and spans.q_lens.tolist() == ends
    assert not spans.shifted


def test_none_mask_means_what_sdpa_does_without_one() -> None:
    # one query: every key (HF calls SDPA with is_causal=False)
    spans = read_mask(None, 2, 1, 10, causal=True)
    assert isinstance(spans, RowSpans)
    assert spans.q_lens.tolist() == [1, 1] and spans.kv_lens.tolist() == [10, 10] and not spans.shifted
    # several queries: SDPA's is_causal is top-left, so keys past the last query are unused (a static
    # cache's empty slots): query i sees keys 0..i
    spans = read_mask(None, 2, 3, 10, causal=True)
    assert isinstance(spans, RowSpans)
    assert spans.q_lens.tolist() == [3, 3] and spans.kv_lens.tolist() == [3, 3] and not spans.shifted
    spans = read_mask(None, 1, 4, 6, causal=False)
    assert isinstance(spans, RowSpans) and spans.kv_lens.tolist() == [6]
    assert read_mask(None, 1, 5, 3, causal=True) == "more_queries_than_keys"


def test_float_masks_and_biases() -> None:
    mask = build_mask([2], [8], 8, 8, 0, True, None)
    additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    spans = read_mask(additive, 1, 8, 8, causal=True)
    assert isinstance(spans, RowSpans) and spans.key_start.tolist() == [2]
    biased = additive.clone()
    biased[0, 0, 5, 3] = -0.5  # an ALiBi-like bias is not a visibility mask
    assert read_mask(biased, 1, 8, 8, causal=True) == "attention_bias"
    assert read_mask(mask.int(), 1, 8, 8, causal=True) == "mask_dtype"
    per_head = mask.expand(1, 2, 8, 8).clone()
    per_head[0, 1, 7, 2] = False
    assert read_mask(per_head, 1, 8, 8, causal=True) == "per_head_mask"


def test_window_hidden_padding_needs_position_ids_and_cropping_is_detected() -> None:
    # decode at key index 20 with window 5: keys 16..20 visible, the row really starts at key 3
    mask = build_mask([3], [21], 1, 21, 20, True, 5)
    assert read_mask(mask, 1, 1, 21, causal=True, window=5) == "no_position_ids"
    spans = read_mask(mask, 1, 1, 21, causal=True, window=5, position_ids=torch.tensor([[17]]))
    assert isinstance(spans, RowSpans) and spans.key_start.tolist() == [3] and spans.kv_lens.tolist() == [18]
    # a cache that dropped keys: key index 20 holds position 40
    assert read_mask(mask, 1, 1, 21, causal=True, window=5, position_ids=torch.tensor([[40]])) == "cropped_cache"


@given(
    st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=3),
    st.integers(1, 5),
    st.integers(0, 4),
)
def test_right_padding_moves_round_trip(rows, q_extra, kv_extra) -> None:
    """to_right_padded puts each row's tokens first; from_right_padded puts outputs back."""
    key_start = torch.tensor([r[0] for r in rows])
    q_start = torch.tensor([r[1] for r in rows])
    q_lens = torch.full((len(rows),), q_extra)
    kv_lens = torch.full((len(rows),), q_extra + kv_extra)
    sq = int((q_start + q_lens).max())
    skv = int((key_start + kv_lens).max())
    spans = RowSpans(key_start, q_start, q_lens, kv_lens)
    q = torch.randn(len(rows), 2, sq, 3)
    k = torch.randn(len(rows), 1, skv, 3)
    qn, kn, vn = spans.to_right_padded(q, k, k + 1)
    for b, (ks, qs) in enumerate(rows):
        assert torch.equal(qn[b, :, :q_extra], q[b, :, qs : qs + q_extra])
        assert torch.equal(kn[b, :, : q_extra + kv_extra], k[b, :, ks : ks + q_extra + kv_extra])
        assert torch.equal(vn[b, :, : q_extra + kv_extra], kn[b, :, : q_extra + kv_extra] + 1)
    back = spans.from_right_padded(qn, sq)
    for b, (_, qs) in enumerate(rows):
        assert torch.equal(back[b, :, qs : qs + q_extra], q[b, :, qs : qs + q_extra])
        assert not back[b, :, :qs].any() and not back[b, :, qs + q_extra :].any()

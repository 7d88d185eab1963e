"""Windowed(method, window): a pattern narrowed by a model's own sliding window, against brute force."""

from __future__ import annotations

import pytest
import torch
from bruteforce import dense_mask, s2_mask, sink_local_mask
from hypothesis import given
from hypothesis import strategies as st

from sparse_attn import S2, Dense, SinkLocal
from sparse_attn.errors import ConfigError, LayoutError
from sparse_attn.methods.windowed import SinkOutsideWindowError, Windowed
from sparse_attn.planning import plan_heads


def band(q_len: int, kv_len: int, window: int) -> torch.Tensor:
    rows = [[abs((kv_len - q_len + i) - j) < window for j in range(kv_len)] for i in range(q_len)]
    return torch.tensor(rows, dtype=torch.bool)


def layout_mask(layout, q_len: int, kv_len: int, num_heads: int) -> torch.Tensor:
    m = layout.to_dense_mask()[0]
    return m.repeat_interleave(num_heads // m.shape[0], dim=0)


lengths = st.tuples(st.integers(1, 70), st.integers(0, 40)).map(lambda t: (t[0], t[0] + t[1]))


@given(lengths, st.integers(1, 50), st.booleans(), st.sampled_from([4, 8]))
def test_s2_and_dense_narrowed_by_a_window(lens, window, causal, block) -> None:
    q_len, kv_len = lens
    if not causal:
        q_len = kv_len
    s2 = S2(block_size=block, local_blocks=1, vert_stride=2)
    cases = [
        (s2, s2_mask(q_len, kv_len, 4, 2, block, 1, 2, causal=causal)),
        (Dense(block_size=block), dense_mask(q_len, kv_len, 4, causal=causal)),
    ]
    for inner, expected in cases:
        w = Windowed(inner, window)
        want = expected & band(q_len, kv_len, window)
        assert torch.equal(w.mask(q_len, kv_len, 4, 2, causal=causal), want)
        lay = w.plan(q_len, kv_len, 4, 2, causal=causal).validate()
        assert torch.equal(layout_mask(lay, q_len, kv_len, 4), want)


@given(lengths, st.integers(1, 50), st.integers(0, 30))
def test_sink_local_narrowed_by_a_window(lens, window, local) -> None:
    q_len, kv_len = lens
    no_sinks = Windowed(SinkLocal(sink_tokens=0, window_tokens=local, block_size=8), window)
    want = sink_local_mask(q_len, kv_len, 2, 0, local, causal=True) & band(q_len, kv_len, window)
    assert torch.equal(layout_mask(no_sinks.plan(q_len, kv_len, 2, 2), q_len, kv_len, 2), want)
    with_sinks = Windowed(SinkLocal(sink_tokens=3, window_tokens=local, block_size=8), window)
    if kv_len <= window:  # the window cannot cut: the sinks stay
        want = sink_local_mask(q_len, kv_len, 2, 3, local, causal=True)
        assert torch.equal(layout_mask(with_sinks.plan(q_len, kv_len, 2, 2), q_len, kv_len, 2), want)
    else:
        with pytest.raises(SinkOutsideWindowError, match="sink tokens"):
            with_sinks.plan(q_len, kv_len, 2, 2)


def test_mixed_heads_with_equal_but_distinct_method_objects() -> None:
    """plan_heads groups heads by equal methods, not by object identity."""
    s2 = S2(block_size=8, local_blocks=1, vert_stride=2)
    methods = [Windowed(Dense(block_size=8), 24)] + [Windowed(S2(**vars(s2)), 24) for _ in range(3)]
    lay = plan_heads(methods, torch.tensor([40]), torch.tensor([40]), 2, True)
    assert lay is not None
    want = torch.cat([dense_mask(40, 40, 1), s2_mask(40, 40, 4, 2, 8, 1, 2)[1:]]) & band(40, 40, 24)
    assert torch.equal(lay.to_dense_mask()[0], want)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="window"):
        Windowed(Dense(), 0)
    with pytest.raises(LayoutError, match="inner"):
        Windowed("dense", 4)  # type: ignore[arg-type]

"""Planning for a whole layer: resolve a method or a SparseAttentionConfig to one BlockLayout.

Heads of one layer may use different methods; their plans are stitched into a single per-query-head
layout so the layer still runs as one kernel call.
"""

from __future__ import annotations

import torch

from .block_layout import NO_WINDOW, BlockLayout
from .config import SparseAttentionConfig
from .errors import ConfigError
from .methods import Dense, DynamicMethod, Method, StaticMethod
from .methods.base import expand_heads


def resolve_layer(method: object, layer_idx: int, num_heads: int) -> list[Method | None]:
    """Per-query-head methods of one layer (None = dense)."""
    if isinstance(method, SparseAttentionConfig):
        return method.methods_for_layer(layer_idx, num_heads)
    if isinstance(method, (StaticMethod, DynamicMethod)):
        return [method.for_layer(layer_idx)] * num_heads
    if method is None:
        return [None] * num_heads
    raise ConfigError(
        f"method must be a method config (S2, SinkLocal, MoA, BlockSparse, Dense, TopK, Quest), a "
        f"SparseAttentionConfig or None, got {type(method).__name__}"
    )


def dynamic_of(methods: list[Method | None] | tuple[Method | None, ...]) -> DynamicMethod | None:
    """The layer's dynamic method (it serves every head: SparseAttentionConfig ensures it), or None."""
    first = methods[0] if methods else None
    return first if isinstance(first, DynamicMethod) else None


def plan_heads(
    methods: list[StaticMethod | None],
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    num_kv_heads: int,
    causal: bool,
) -> BlockLayout | None:
    """One layout for a layer whose query heads use ``methods``; None when every head is dense."""
    num_heads = len(methods)
    if all(m is None for m in methods):
        return None
    dynamic = [m for m in methods if isinstance(m, DynamicMethod)]
    if dynamic:
        raise ConfigError(
            f"{type(dynamic[0]).__name__} is a dynamic method: it selects keys from the queries and keys, so "
            "it has no plan from lengths alone; run it with sparse_attention(q, k, v, method) or "
            "sparse_attn.select(method, q, k, ...)"
        )
    distinct = list(dict.fromkeys(m for m in methods if m is not None))
    if len(distinct) == 1 and None not in methods:
        return distinct[0].plan(q_lens, kv_lens, num_heads, num_kv_heads, causal=causal)
    sizes = {m.block_size for m in distinct}
    if len(sizes) != 1:
        raise ConfigError(f"methods mixed within one layer must share a block_size, got {sorted(sizes)}")
    dense = Dense(block_size=sizes.pop())
    resolved = [dense if m is None else m for m in methods]
    plans = {
        m: m.plan(q_lens, kv_lens, num_heads, num_kv_heads, causal=causal) for m in dict.fromkeys(resolved)
    }
    return _stitch(resolved, plans, num_heads, num_kv_heads)


def _stitch(
    methods: list[StaticMethod], plans: dict[StaticMethod, BlockLayout], num_heads: int, num_kv_heads: int
) -> BlockLayout:
    first = next(iter(plans.values()))
    batch, nt = first.batch_size, first.num_q_blocks
    mk = max(p.max_k for p in plans.values())
    indices = torch.zeros(batch, num_heads, nt, mk, dtype=torch.int32)
    counts = torch.zeros(batch, num_heads, nt, dtype=torch.int32)
    full = torch.zeros(batch, num_heads, nt, mk, dtype=torch.bool)
    windowed = any(p.window_tokens is not None for p in plans.values())
    sink = torch.zeros(batch, num_heads, dtype=torch.int64) if windowed else None
    window = torch.full((batch, num_heads), NO_WINDOW, dtype=torch.int64) if windowed else None
    for m, p in plans.items():
        heads = torch.tensor([h for h, mh in enumerate(methods) if mh == m])

        def per_head(t: torch.Tensor, heads: torch.Tensor = heads) -> torch.Tensor:
            return expand_heads(t.transpose(0, 1), num_heads, num_kv_heads)[heads].transpose(0, 1)

        k = p.max_k
        indices[:, heads, :, :k] = per_head(p.kv_indices)
        counts[:, heads] = per_head(p.kv_counts)
        full[:, heads, :, :k] = per_head(p.full)
        if p.window_tokens is not None:
            sink[:, heads] = per_head(p.sink_tokens)  # type: ignore[index,arg-type]
            window[:, heads] = per_head(p.window_tokens)  # type: ignore[index]
    return BlockLayout(
        indices,
        counts,
        full,
        first.block_q,
        first.block_k,
        first.q_lens,
        first.kv_lens,
        first.causal,
        sink,
        window,
    )

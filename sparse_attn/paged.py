"""The run step over a paged KV cache (vLLM V1's layout): block-sparse prefill and token-sparse decode.

``key_cache``/``value_cache`` are ``[num_pages, page_size, Hkv, D]`` (any strides with a contiguous
last dim); key ``j`` of row ``b`` sits at page ``block_table[b, j // page_size]``, slot
``j % page_size``. On GPU the Triton kernels read the pages directly. The torch backend gathers: the
prefill path copies each row's first ``max(kv_lens)`` keys into contiguous K/V, the decode path only
the selected keys.
"""

from __future__ import annotations

import torch

from .api import run_layout, select_backend
from .block_layout import BlockLayout
from .errors import LayoutError, ShapeError
from .kernels.token_decode import paged_token_sparse_attention_torch
from .token_selection import TokenSelection
from .validation import check_scale


def _check_paged(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_table: torch.Tensor
) -> tuple[int, int]:
    for name, t in (("q", q), ("key_cache", key_cache), ("value_cache", value_cache)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ShapeError(f"{name} must be a 4-dim tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if tuple(value_cache.shape[:3]) != tuple(key_cache.shape[:3]):
        raise ShapeError(
            f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} must share "
            "[num_pages, page_size, Hkv]"
        )
    hq, hkv = q.shape[1], key_cache.shape[2]
    if hq % hkv or q.shape[-1] != key_cache.shape[-1]:
        raise ShapeError(
            f"q [B, Hq={hq}, Sq, D={q.shape[-1]}] does not fit key_cache [.., Hkv={hkv}, D={key_cache.shape[-1]}]"
        )
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != q.shape[0]:
        raise ShapeError(
            f"block_table must be [B={q.shape[0]}, max_pages], got {getattr(block_table, 'shape', None)}"
        )
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ShapeError(f"block_table must be int32 or int64, got {block_table.dtype}")
    return int(key_cache.shape[1]), int(block_table.shape[1]) * int(key_cache.shape[1])


def gather_rows(cache: torch.Tensor, block_table: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
    """Every row's keys, contiguous and right-padded with zeros: [B, Hkv, max(kv_lens), D]. (Slots a
    row does not own may hold anything, NaN included; zeros keep masked products finite.)"""
    num_pages, page_size = cache.shape[0], cache.shape[1]
    kv_len = int(kv_lens.max()) if kv_lens.numel() else 0
    used = -(-kv_len // page_size)
    pages = block_table[:, :used].to(cache.device, torch.int64).clamp(0, num_pages - 1)  # [B, used]
    rows = cache[pages]  # [B, used, page_size, Hkv, D]
    rows = rows.reshape(rows.shape[0], used * page_size, *cache.shape[2:])[:, :kv_len]
    inside = torch.arange(kv_len, device=cache.device) < kv_lens.to(cache.device)[:, None]  # [B, S]
    rows = rows.masked_fill(~inside[:, :, None, None], 0)
    return rows.permute(0, 2, 1, 3).contiguous()


def paged_block_sparse_attention(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    value_cache: torch.Tensor,  # [num_pages, page_size, Hkv, Dv]
    block_table: torch.Tensor,  # [B, max_pages]
    layout: BlockLayout,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``block_sparse_attention`` with K/V in a paged cache. Returns out [B, Hq, Sq, Dv]."""
    page_size, capacity = _check_paged(q, key_cache, value_cache, block_table)
    if not isinstance(layout, BlockLayout):
        raise LayoutError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    layout.validate()
    kv_max = int(layout.kv_lens.max()) if layout.batch_size else 0
    if kv_max > capacity:
        raise ShapeError(f"layout kv_lens reach {kv_max}, beyond the block_table's {capacity} slots")
    layout.check_fits(q.shape[0], q.shape[2], kv_max, q.shape[1], key_cache.shape[2])
    sc = check_scale(scale, q.shape[-1])
    chosen = select_backend(backend, q.device, q.dtype)
    if chosen == "triton":
        return run_layout(q, key_cache, value_cache, layout, sc, False, chosen, block_table, page_size)
    k = gather_rows(key_cache, block_table, layout.kv_lens)
    v = gather_rows(value_cache, block_table, layout.kv_lens)
    return run_layout(q, k, v, layout, sc, False, chosen)


def paged_token_sparse_attention(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [B, max_pages]
    selection: TokenSelection,
    *,
    kv_lens: torch.Tensor,  # [B]
    q_lens: torch.Tensor | None = None,  # [B], default 1 (decode)
    causal: bool = True,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``token_sparse_attention`` with K/V in a paged cache; only selected keys are read.
    Returns out [B, Hq, Sq, Dv]."""
    page_size, capacity = _check_paged(q, key_cache, value_cache, block_table)
    b = q.shape[0]
    kvl = torch.as_tensor(kv_lens, dtype=torch.int64).reshape(-1).cpu()
    ql = torch.ones(b, dtype=torch.int64) if q_lens is None else torch.as_tensor(q_lens).reshape(-1).cpu()
    if kvl.numel() != b or ql.numel() != b:
        raise ShapeError(f"kv_lens and q_lens need {b} entries, got {kvl.numel()} and {ql.numel()}")
    if b and int(kvl.max()) > capacity:
        raise ShapeError(f"kv_lens reach {int(kvl.max())}, beyond the block_table's {capacity} slots")
    if not isinstance(selection, TokenSelection):
        raise LayoutError(f"selection must be a TokenSelection, got {type(selection).__name__}")
    if selection.batch_size != b:
        raise ShapeError(f"selection has batch {selection.batch_size}, q has {b}")
    selection.validate(kvl)
    sc = check_scale(scale, q.shape[-1])
    if select_backend(backend, q.device, q.dtype) == "triton":
        from .api import _triton

        lw = selection.log_weights
        out, _ = _triton("sparse_decode").token_decode(
            q,
            key_cache,
            value_cache,
            selection.indices.to(q.device),
            selection.counts.to(q.device),
            None if lw is None else lw.to(q.device, torch.float32),
            ql.to(q.device),
            kvl.to(q.device),
            causal=causal,
            scale=sc,
            block_table=block_table,
            page_size=page_size,
            return_lse=True,
        )
        return out
    out, _ = paged_token_sparse_attention_torch(
        q, key_cache, value_cache, block_table, selection, sc, causal, ql, kvl, need_lse=False
    )
    return out

"""vLLM's paged KV cache as plain tensors: the key/value views and the cache write (pure torch).

vLLM V1 hands an attention layer its cache as the logical view ``[num_pages, Hkv, page_size, 2 * D]``
(keys in the first D channels, values in the last D), whatever the physical layout. The kernels read
keys as ``[num_pages, page_size, Hkv, D]`` strided views of it (no copy); key ``j`` of request ``r``
is at page ``block_table[r, j // page_size]``, slot ``j % page_size``.
"""

from __future__ import annotations

import torch


def cache_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache), each [num_pages, page_size, Hkv, D], views of ``kv_cache``."""
    if kv_cache.dim() != 4 or kv_cache.shape[-1] != 2 * head_size:
        raise ValueError(
            f"kv_cache must be [num_pages, num_kv_heads, page_size, 2 * head_size={2 * head_size}], "
            f"got {tuple(kv_cache.shape)}"
        )
    key_cache, value_cache = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return key_cache, value_cache


def write_kv(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T'] slot = page * page_size + offset; negative = padding token
) -> None:
    """Store each token's key and value at its slot (tokens with a negative slot are skipped)."""
    n = min(int(slot_mapping.shape[0]), int(key.shape[0]))
    slots = slot_mapping[:n].to(torch.int64)
    keep = slots >= 0
    if not bool(keep.all()):
        slots, key, value = slots[keep], key[:n][keep], value[:n][keep]
    else:
        key, value = key[:n], value[:n]
    page_size = key_cache.shape[1]
    pages, offsets = slots // page_size, slots % page_size
    key_cache[pages, offsets] = key.to(key_cache.dtype)
    value_cache[pages, offsets] = value.to(value_cache.dtype)

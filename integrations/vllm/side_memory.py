"""Allocating a layer's paged side data next to the KV cache vLLM sized, and saying what it costs.

vLLM sizes the KV cache to what ``gpu_memory_utilization`` leaves after weights and activations (on
CPU: ``VLLM_CPU_KVCACHE_SPACE``) and knows nothing of side data, which the plugin allocates from
memory outside that budget. The size is a fixed fraction of the KV cache (Quest with blocks of 16:
1/16), so the first allocation of the process logs it with the ``gpu_memory_utilization`` that
keeps KV cache plus side data inside the original budget (``paged_side.utilization_with_side``).
vLLM-free: the impl passes the numbers it read from vLLM's config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...methods import DynamicMethod
from ...paged_side import PagedSideStore, utilization_with_side

logger = logging.getLogger("sparse_attn.vllm")
_logged = False


@dataclass(frozen=True)
class MemoryBudget:
    """What vLLM sized the KV cache with: ``gpu_memory_utilization`` and the attention layers that
    each hold a cache like this one."""

    gpu_memory_utilization: float
    num_layers: int


def side_report(
    store: PagedSideStore, kv_cache: torch.Tensor, budget: MemoryBudget, total_bytes: int | None
) -> str:
    """The side data's bytes and share of the layer's KV cache; with ``total_bytes`` (the GPU's
    memory) also the utilization that makes room for the side data of every layer."""
    kv_bytes = kv_cache.numel() * kv_cache.element_size()
    ratio = store.nbytes / kv_bytes if kv_bytes else 0.0
    text = (
        f"{store.nbytes / 2**20:.2f} MiB per layer, {ratio:.2%} of the layer's KV cache "
        f"({kv_bytes / 2**20:.1f} MiB)"
    )
    if total_bytes is None:
        return text
    util = budget.gpu_memory_utilization
    lowered = utilization_with_side(util, kv_bytes * budget.num_layers, total_bytes, ratio)
    return (
        f"{text}; vLLM sized the KV cache to gpu_memory_utilization={util:.3f} without it: to keep KV "
        f"cache and side data of all {budget.num_layers} layers within that, pass "
        f"gpu_memory_utilization={lowered:.3f}"
    )


def allocate_side_store(
    method: DynamicMethod, key_cache: torch.Tensor, kv_cache: torch.Tensor, budget: MemoryBudget
) -> PagedSideStore | None:
    """``method``'s side store for this layer's cache (None: it keeps no side data); logs its size
    once per process. Running out of memory raises a ConfigError that names gpu_memory_utilization."""
    global _logged
    try:
        store = PagedSideStore.for_cache(method, key_cache)
    except torch.OutOfMemoryError as exc:
        raise ConfigError(
            f"no memory left for {method.name}'s side data next to the KV cache: lower "
            f"gpu_memory_utilization={budget.gpu_memory_utilization} by the side data's share of the KV "
            "cache (README, vLLM section; sparse_attn.paged_side.utilization_with_side)"
        ) from exc
    if store is not None and not _logged:
        _logged = True
        cuda = kv_cache.device.type == "cuda"
        total = torch.cuda.get_device_properties(kv_cache.device).total_memory if cuda else None
        logger.info("sparse_attn: %s side data: %s", method.name, side_report(store, kv_cache, budget, total))
    return store

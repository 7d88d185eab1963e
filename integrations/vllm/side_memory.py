"""Allocating a layer's paged side data next to the KV cache vLLM sized, and saying what it costs.

vLLM sizes the KV cache to what ``gpu_memory_utilization`` leaves after weights and activations (on
CPU: ``VLLM_CPU_KVCACHE_SPACE``) and knows nothing of side data, which the plugin allocates from
memory outside that budget. The size is a fixed fraction of the KV cache (Quest with blocks of 16:
1/16), so the first allocation of the process logs it with the ``gpu_memory_utilization`` that
keeps KV cache plus side data inside the original budget (``paged_side.utilization_with_side``).
"""

from __future__ import annotations

import logging

import torch

from ...errors import ConfigError
from ...methods import DynamicMethod
from ...paged_side import PagedSideStore, utilization_with_side

logger = logging.getLogger("sparse_attn.vllm")
_logged = False


def _advice(store: PagedSideStore, kv_cache: torch.Tensor) -> str:
    """The side data's share of the KV cache, and on a GPU the utilization that makes room for it."""
    kv_bytes = kv_cache.numel() * kv_cache.element_size()
    ratio = store.nbytes / kv_bytes if kv_bytes else 0.0
    text = f"{store.nbytes / 2**20:.2f} MiB per layer, {ratio:.2%} of the layer's KV cache ({kv_bytes / 2**20:.1f} MiB)"
    if kv_cache.device.type != "cuda":
        return text
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    util = config.cache_config.gpu_memory_utilization
    layers = config.model_config.get_num_layers(config.parallel_config)
    total = torch.cuda.get_device_properties(kv_cache.device).total_memory
    lowered = utilization_with_side(util, kv_bytes * layers, total, ratio)
    return (
        f"{text}; vLLM sized the KV cache to gpu_memory_utilization={util:.3f} without it: to keep KV "
        f"cache and side data of all {layers} layers within that, pass gpu_memory_utilization={lowered:.3f}"
    )


def allocate_side_store(
    method: DynamicMethod, key_cache: torch.Tensor, kv_cache: torch.Tensor
) -> PagedSideStore | None:
    """``method``'s side store for this layer's cache (None: it keeps no side data); logs its size
    once per process. An out-of-memory error names ``gpu_memory_utilization`` and the value to use."""
    global _logged
    try:
        store = PagedSideStore.for_cache(method, key_cache)
    except torch.OutOfMemoryError as exc:
        probe = PagedSideStore(method, 1, *key_cache.shape[1:], key_cache.dtype, "meta")
        ratio = probe.nbytes / (kv_cache[:1].numel() * kv_cache.element_size())
        raise ConfigError(
            f"no memory left for {method.name}'s side data ({ratio:.2%} of the KV cache): lower "
            "gpu_memory_utilization by that share of the KV cache (see the README, vLLM section)"
        ) from exc
    if store is not None and not _logged:
        _logged = True
        logger.info("sparse_attn: %s side data: %s", method.name, _advice(store, kv_cache))
    return store

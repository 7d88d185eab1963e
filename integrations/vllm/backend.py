"""The vLLM V1 attention backend: backend class, metadata builder and impl over the paged KV cache.

vLLM imports this module (through the path ``register()`` gave it), never the package on its own.
The builder turns vLLM's per-step batch into a ``PagedStep`` (host lengths, block table) once per
step; every layer's ``forward`` then plans through it (plans are shared by layers with the same
methods) and runs the sparse kernels on the paged cache: Triton on GPU, torch on CPU.

A layer with a dynamic method (TopK, Quest) also keeps its side data in a ``PagedSideStore``
indexed like its KV cache. vLLM has no hook that binds a cache to an impl, so the store is
allocated when ``do_kv_cache_update`` first sees the layer's cache tensor (and again if vLLM ever
hands it another one); its size is logged once per process and counted in ``stats()``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)

from ...artifact import ModelShape
from ...config import SparseAttentionConfig
from ...fallback import FallbackCounter
from ...methods import DynamicMethod
from ...paged_side import PagedSideStore
from ...planning import dynamic_of
from .cache import cache_views, write_kv
from .dynamic_step import DynamicStats, check_shard
from .settings import sparse_config
from .side_memory import MemoryBudget, allocate_side_store
from .step import HeadMethods, HeadShard, PagedStep, attend

logger = logging.getLogger("sparse_attn.vllm")

# The Triton kernels pad the head dim to a power of two up to this (torch handles any).
MAX_HEAD_DIM = 256

FALLBACKS = FallbackCounter()
DYNAMIC = DynamicStats()
_calls: Counter[str] = Counter()
_calls_lock = threading.Lock()
_logged: set[str] = set()


_batches: Counter[str] = Counter()


def stats() -> dict[str, Any]:
    """This process's layer calls (sparse / dense layers), the kinds of batches its steps held
    (``mixed``: decodes and prefills together; ``chunked_prefill``: a prefill chunk after cached
    context; ``prompt_tokens``: prompt tokens computed, prefix-cache hits excluded), dense-fallback
    counts per reason and what dynamic layers did (``dynamic``: decode selections, their measured
    density, prefill rows by how they ran, side-data bytes)."""
    with _calls_lock:
        calls, batches = dict(_calls), dict(_batches)
    return {"calls": calls, "batches": batches, "fallbacks": FALLBACKS.counts(), "dynamic": DYNAMIC.as_dict()}


def reset_stats() -> None:
    with _calls_lock:
        _calls.clear()
        _batches.clear()
    FALLBACKS.reset()
    DYNAMIC.reset()


def _count_batch(step: PagedStep) -> None:
    q_lens, kv_lens = step.q_lens, step.seq_lens
    prefill = q_lens > 1
    kinds = {
        "steps": True,
        "mixed": bool(prefill.any()) and bool((q_lens == 1).any()),
        "chunked_prefill": bool((prefill & (q_lens < kv_lens)).any()),
    }
    # prompt tokens computed (prefix-cache hits are not): how much prefix caching saved
    prompt_tokens = sum(int(g.q_lens.sum()) for g in step.groups() if not g.decode)
    with _calls_lock:
        _batches.update(k for k, hit in kinds.items() if hit)
        _batches["prompt_tokens"] += prompt_tokens


class SparseAttentionBackend(AttentionBackend):
    """Sparse attention (sparse_attn) over vLLM's paged KV cache, selected as ``CUSTOM``."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[Any]] = ["auto"]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec: Any = None) -> list[int | MultipleOf]:
        # The Triton kernels need key blocks (64) and pages to nest: pages of 16 * 2**k tokens.
        return [MultipleOf(16)]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type[SparseAttentionImpl]:
        return SparseAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[SparseAttentionMetadataBuilder]:
        return SparseAttentionMetadataBuilder

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return 0 < head_size <= MAX_HEAD_DIM

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


class SparseCPUAttentionBackend(SparseAttentionBackend):
    """The same backend under the name vLLM's CPU platform always selects."""

    @staticmethod
    def get_name() -> str:
        return "CPU_ATTN"


@dataclass
class SparseAttentionMetadata:
    num_actual_tokens: int
    step: PagedStep


class SparseAttentionMetadataBuilder(AttentionMetadataBuilder[SparseAttentionMetadata]):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        config = sparse_config(vllm_config)
        self.min_seq_len = 0 if config is None else config.min_seq_len
        if config is not None and (config.dense_above is not None or config.dense_below):
            # vLLM's dense rows of a step are chosen by length for every layer at once; the per-layer
            # crossover of the HF patch has no counterpart here yet
            logger.info(
                "sparse_attn: dense_above=%s and dense_below=%s are applied by the Hugging Face patch "
                "only; the vLLM plugin runs the configured methods at every density and length "
                "(min_seq_len still applies)",
                config.dense_above,
                config.dense_below,
            )

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> SparseAttentionMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        # Plans are made on the host: one device-to-host copy of the lengths per step, for all layers.
        prefilling = getattr(m, "is_prefilling", None)
        step = PagedStep(
            query_start=m.query_start_loc_cpu[: n + 1].to(torch.int64),
            seq_lens=m.seq_lens[:n].to("cpu", torch.int64),
            block_table=m.block_table_tensor[:n],
            min_seq_len=self.min_seq_len,
            prefilling=None if prefilling is None else prefilling[:n].to("cpu", torch.bool),
        )
        _count_batch(step)
        return SparseAttentionMetadata(num_actual_tokens=m.num_actual_tokens, step=step)


def _tensor_parallel() -> tuple[int, int]:
    from vllm.distributed.parallel_state import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        model_parallel_is_initialized,
    )

    if not model_parallel_is_initialized():
        return 0, 1
    return get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()


class SparseAttentionImpl(AttentionImpl[SparseAttentionMetadata]):
    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int | None = None,
        alibi_slopes: list[float] | None = None,
        sliding_window: int | None = None,
        kv_cache_dtype: str = "auto",
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        **extra: Any,
    ) -> None:
        unsupported = {
            "alibi_slopes": alibi_slopes is not None,
            "sliding_window": sliding_window is not None,
            "logits_soft_cap": bool(logits_soft_cap),
            f"attn_type={attn_type!r}": attn_type != AttentionType.DECODER,
            f"kv_cache_dtype={kv_cache_dtype!r}": kv_cache_dtype != "auto",
            **{name: value is not None for name, value in extra.items()},
        }
        bad = [name for name, hit in unsupported.items() if hit]
        if bad:
            raise NotImplementedError(
                f"the sparse_attn backend does not support {', '.join(bad)}; run this model with "
                "vLLM's own attention backend"
            )
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        vllm_config = get_current_vllm_config()
        config = sparse_config(vllm_config)
        if config is None:
            logger.warning(
                "sparse_attn backend selected without a sparse config (--additional-config "
                "'{\"sparse_attn\": ...}' or SPARSE_ATTN_CONFIG): every layer runs dense"
            )
            config = SparseAttentionConfig()
        self.config = config
        rank, world = _tensor_parallel()
        total_kv = vllm_config.model_config.get_total_num_kv_heads()
        self._model_shape = ModelShape.from_hf_config(vllm_config.model_config.hf_config)
        self.shard = HeadShard(num_heads * world, total_kv, rank, world)
        self._methods: HeadMethods | None = None
        self._side: PagedSideStore | None = None
        self._side_key: tuple[Any, ...] | None = None
        self._budget = MemoryBudget(
            vllm_config.cache_config.gpu_memory_utilization,
            vllm_config.model_config.get_num_layers(vllm_config.parallel_config),
        )

    def _layer_methods(self, layer: Any) -> HeadMethods:
        if self._methods is None:
            layer_idx = extract_layer_index(layer.layer_name)
            methods = tuple(self.config.methods_for_layer(layer_idx, self.shard.num_heads))
            dynamic = dynamic_of(methods)
            if dynamic is not None:
                check_shard(dynamic, self.shard)
                dynamic.check_model(self._model_shape)
                kv = self.shard.kv_slice()
                if kv.stop - kv.start != self.shard.num_kv_heads:  # this rank's part of the heads
                    dynamic = dynamic.for_kv_heads(kv.start, kv.stop - kv.start)
                    methods = (dynamic,) * len(methods)
                dynamic.check_fits(self.num_heads, self.num_kv_heads)
                if self.kv_sharing_target_layer_name is not None:
                    raise NotImplementedError(
                        f"the sparse_attn backend does not support {dynamic.name} on a layer that shares "
                        f"another layer's KV cache ({self.kv_sharing_target_layer_name}): it writes no side data"
                    )
            self._methods = methods
        return self._methods

    def _side_store(
        self, method: DynamicMethod, kv_cache: torch.Tensor, key_cache: torch.Tensor
    ) -> PagedSideStore | None:
        """The layer's side store for this cache tensor, allocated on first sight of it."""
        key = (kv_cache.data_ptr(), tuple(kv_cache.shape), kv_cache.device)
        if self._side_key != key:
            old = 0 if self._side is None else self._side.nbytes
            self._side = allocate_side_store(method, key_cache, kv_cache, self._budget)
            self._side_key = key
            DYNAMIC.add_side_bytes((0 if self._side is None else self._side.nbytes) - old)
        return self._side

    def forward(
        self,
        layer: Any,
        query: torch.Tensor,  # [T, Hq, D]
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,  # [num_pages, Hkv, page_size, 2 * D]
        attn_metadata: SparseAttentionMetadata | None,
        output: torch.Tensor,  # [T, Hq, D]
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("the sparse_attn backend does not fuse output quantization")
        if attn_metadata is None:  # profiling run
            return output.fill_(0)
        methods = self._layer_methods(layer)
        step = attn_metadata.step
        fallback_rows = step.num_fallback_rows
        if fallback_rows:
            FALLBACKS.record("min_seq_len", strict=self.config.strict)
            if "min_seq_len" not in _logged:
                _logged.add("min_seq_len")
                logger.info(
                    "sparse_attn: requests shorter than min_seq_len=%d keys run dense (counted in stats())",
                    self.config.min_seq_len,
                )
        with _calls_lock:
            _calls["dense" if all(m is None for m in methods) else "sparse"] += 1
        n = attn_metadata.num_actual_tokens
        key_cache, value_cache = cache_views(kv_cache, self.head_size)
        attend(
            query[:n].view(n, self.num_heads, self.head_size),
            key_cache,
            value_cache,
            step,
            methods,
            self.shard,
            self.scale,
            output[:n].view(n, self.num_heads, -1),
            side=self._side,
            observe=DYNAMIC.observe,
        )
        return output

    def do_kv_cache_update(
        self,
        layer: Any,
        key: torch.Tensor,  # [T, Hkv, D]
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,  # [T]
    ) -> None:
        key_cache, value_cache = cache_views(kv_cache, self.head_size)
        write_kv(key, value, key_cache, value_cache, slot_mapping)
        dynamic = dynamic_of(self._layer_methods(layer))
        if dynamic is not None:
            store = self._side_store(dynamic, kv_cache, key_cache)
            if store is not None:
                # side data of the keys just stored (slots past the step's tokens are padding)
                store.write(key_cache, slot_mapping[: key.shape[0]])

"""Side data of dynamic methods next to a paged KV cache (vLLM's layout), in plain torch.

The paged twin of ``sparse_attn.side_data``: the same side data (``DynamicMethod.side_spec``, a pure
function of the keys), indexed by the same physical pages as the KV cache, so a page shared by
prefix caching carries valid side data for every request that maps it. One tensor per layer,
``[num_pages, Hkv, units_per_page, *shape]``: ``units_per_page`` is ``page_size`` for token data and
``page_size // block_size`` for block data (a block never straddles two pages).

Writes follow the cache writes through vLLM's ``slot_mapping`` (slot = page * page_size + offset):
token data is computed for the new keys at their slots; block data is *recomputed* for every block a
step wrote into, from the paged K cache, over the keys up to the last slot the step wrote in that
block. A step writes each request's keys contiguously up to its current length, so those are
exactly the block's keys: later slots of the block hold stale keys of an earlier owner (or nothing)
and are left out. That makes writes idempotent and right for chunked prefill, prefix caching and
rollback (the rewritten tail is recomputed). ``gather`` reads a group of requests' side data
through their block table into the contiguous form ``[G, Hkv, units, *shape]`` that
``DynamicMethod.select_decode`` takes.

Memory: ``side_bytes_per_page`` / ``kv_bytes_per_page`` give the side pool's size next to the KV
cache's, and ``utilization_with_side`` the ``gpu_memory_utilization`` that leaves room for it.
"""

from __future__ import annotations

import torch

from .errors import ConfigError, ShapeError
from .methods.dynamic import DynamicMethod, SideSpec


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _units_per_page(spec: SideSpec, page_size: int, name: str) -> int:
    if page_size % spec.block_size:
        raise ConfigError(
            f"page_size={page_size} must be a multiple of the side data's block_size={spec.block_size} "
            f"(a block's side data lives in one page); choose {name} or the method's block_size accordingly"
        )
    return page_size // spec.block_size


def side_bytes_per_page(
    method: DynamicMethod, page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> int:
    """Bytes of ``method``'s side data per KV-cache page and layer (0 when it keeps none)."""
    spec = method.side_spec(head_dim)
    if spec is None:
        return 0
    units = _units_per_page(spec, page_size, "page_size")
    return units * spec.bytes_per_unit(num_kv_heads, dtype)


def kv_bytes_per_page(page_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes of one KV-cache page and layer (keys and values)."""
    return 2 * page_size * num_kv_heads * head_dim * _element_size(dtype)


def utilization_with_side(
    gpu_memory_utilization: float, kv_cache_bytes: int, total_bytes: int, side_ratio: float
) -> float:
    """The ``gpu_memory_utilization`` to give vLLM so that its KV cache *plus* side data of
    ``side_ratio`` x the KV cache fit where ``gpu_memory_utilization`` put the KV cache alone.

    vLLM sizes the KV cache to what is left of ``utilization * total_bytes`` after weights and
    activations (``kv_cache_bytes`` at ``gpu_memory_utilization``). With ``u' = u - kv * r / ((1 + r) *
    total)`` the cache shrinks to ``kv / (1 + r)`` and its side data takes the ``kv * r / (1 + r)`` freed."""
    if not 0.0 < gpu_memory_utilization <= 1.0:
        raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}")
    if kv_cache_bytes < 0 or total_bytes <= 0 or side_ratio < 0:
        raise ConfigError(
            f"kv_cache_bytes, total_bytes and side_ratio must be non-negative (total positive), got "
            f"{kv_cache_bytes}, {total_bytes}, {side_ratio}"
        )
    return gpu_memory_utilization - kv_cache_bytes * side_ratio / ((1.0 + side_ratio) * total_bytes)


class PagedSideStore:
    """One layer's side data for a paged KV cache ``[num_pages, page_size, Hkv, D]`` (see module doc)."""

    def __init__(
        self,
        method: DynamicMethod,
        num_pages: int,
        page_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        spec = method.side_spec(head_dim)
        if spec is None:
            raise ConfigError(f"{method.name} keeps no side data (it reads the keys): no store to allocate")
        self.method = method
        self.spec = spec
        self.geometry = (num_pages, page_size, num_kv_heads, head_dim)
        self.units_per_page = _units_per_page(spec, page_size, "page_size")
        self.data = torch.zeros(
            num_pages,
            num_kv_heads,
            self.units_per_page,
            *spec.shape,
            dtype=spec.dtype_for(dtype),
            device=device,
        )

    @classmethod
    def for_cache(cls, method: DynamicMethod, key_cache: torch.Tensor) -> PagedSideStore | None:
        """A store shaped for ``key_cache`` [num_pages, page_size, Hkv, D], or None when ``method``
        keeps no side data."""
        if method.side_spec(key_cache.shape[-1]) is None:
            return None
        num_pages, page_size, hkv, d = key_cache.shape
        return cls(method, num_pages, page_size, hkv, d, key_cache.dtype, key_cache.device)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def check_cache(self, key_cache: torch.Tensor) -> None:
        """ShapeError unless ``key_cache`` is the [num_pages, page_size, Hkv, D] cache this store was
        sized for."""
        if not isinstance(key_cache, torch.Tensor) or tuple(key_cache.shape) != self.geometry:
            raise ShapeError(
                f"key_cache has shape {tuple(getattr(key_cache, 'shape', ()))}, but this side store was "
                f"allocated for [num_pages, page_size, Hkv, D] = {list(self.geometry)}"
            )
        if key_cache.device != self.data.device:
            raise ShapeError(f"key_cache is on {key_cache.device}, the side store on {self.data.device}")

    def write(self, key_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Update the side data of the slots a step wrote (after the K cache write; negative slots are
        padding and skipped)."""
        self.check_cache(key_cache)
        if not isinstance(slot_mapping, torch.Tensor) or slot_mapping.dim() != 1:
            raise ShapeError(
                f"slot_mapping must be a 1-dim tensor, got {getattr(slot_mapping, 'shape', None)}"
            )
        slots = slot_mapping.to(key_cache.device, torch.int64)
        slots = slots[slots >= 0]
        if slots.numel() == 0:
            return
        page_size = self.geometry[1]
        if int(slots.max()) >= self.geometry[0] * page_size:
            raise ShapeError(f"slot_mapping reaches slot {int(slots.max())}, beyond the cache's last slot")
        bs = self.spec.block_size
        if self.spec.level == "token":
            pages, offsets = slots // page_size, slots % page_size
            keys = key_cache[pages, offsets]  # [T, Hkv, D]
            side = self.method.compute_side(keys[:, :, None])  # [T, Hkv, 1, *shape]
            self.data[pages, :, offsets] = side[:, :, 0].to(self.data.dtype)
            return
        blocks, inverse = torch.unique(slots // bs, return_inverse=True)  # global block ids
        # keys present in each touched block: up to the last slot written in it
        fill = torch.zeros_like(blocks).scatter_reduce_(0, inverse, slots % bs + 1, reduce="amax")
        pages, unit = blocks // self.units_per_page, blocks % self.units_per_page
        offsets = unit[:, None] * bs + torch.arange(bs, device=slots.device)  # [nb, bs]
        keys = key_cache[pages[:, None], offsets].permute(0, 2, 1, 3)  # [nb, Hkv, bs, D]
        side = self.method.compute_side(keys, fill[:, None])  # [nb, Hkv, 1, *shape]
        self.data[pages, :, unit] = side[:, :, 0].to(self.data.dtype)

    def gather(self, block_table: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor:
        """Side data of each row's first ``kv_lens[i]`` keys through its block table rows:
        [G, Hkv, units, *shape] with ``units`` covering the longest row; entries past a row's own
        units are zeros (its pages there may belong to anyone)."""
        g = int(block_table.shape[0])
        kvl = kv_lens.to("cpu", torch.int64).reshape(-1)
        if kvl.numel() != g:
            raise ShapeError(f"kv_lens has {kvl.numel()} entries, block_table {g} rows")
        num_pages = self.geometry[0]
        units = self.spec.units(int(kvl.max())) if g else 0
        used = -(-units // self.units_per_page)
        if used > block_table.shape[1]:
            raise ShapeError(
                f"kv_lens reach {int(kvl.max())} keys, beyond block_table's {block_table.shape[1]} pages"
            )
        dev = self.data.device
        pages = block_table[:, :used].to(dev, torch.int64).clamp(0, num_pages - 1)
        rows = self.data[pages]  # [G, used, Hkv, upp, *shape]
        rows = rows.transpose(1, 2).reshape(g, self.geometry[2], used * self.units_per_page, *self.spec.shape)
        rows = rows[:, :, :units]
        own = torch.arange(units, device=dev)[None, :] < (-(-kvl // self.spec.block_size)).to(dev)[:, None]
        shape = (g, 1, units) + (1,) * len(self.spec.shape)
        return rows.masked_fill(~own.view(shape), 0)

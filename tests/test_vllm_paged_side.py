"""The paged side-data store (sparse_attn.paged_side): written through vLLM's slot mapping in chunks,
gathered through shuffled page tables, it equals the contiguous side data of sparse_attn.side_data,
also for pages shared by prefix caching and after a rollback; its bytes next to the KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from sparse_attn import ConfigError, MagicPIG, Quest, ShapeError, TopK
from sparse_attn.methods import DynamicMethod, SideSpec
from sparse_attn.paged_side import (
    PagedSideStore,
    kv_bytes_per_page,
    side_bytes_per_page,
    utilization_with_side,
)
from sparse_attn.side_data import compute_side_data


@dataclass(frozen=True)
class Sketch(DynamicMethod):
    """A token-level side data (as Loki's projections or MagicPIG's codes): 3 numbers per key."""

    name: ClassVar[str] = "sketch"
    density: float | None = 1.0
    tokens: int | None = None
    sink_tokens: int = 0
    local_tokens: int = 0
    prefill: None = None

    def side_spec(self, head_dim: int) -> SideSpec:
        return SideSpec("token", 1, (3,), torch.float32)

    def compute_side(self, keys: torch.Tensor, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
        return keys[..., :3].float() * 2 - keys[..., 3:6].float()


class PagedKeys:
    """Rows of keys in a NaN-poisoned paged cache [num_pages, page_size, Hkv, D] behind a shuffled page
    table (unused table entries point anywhere)."""

    def __init__(self, kv_lens, hkv, d, page_size, dtype=torch.float32, seed=0, spare_pages=4):
        self.gen = torch.Generator().manual_seed(seed)
        self.kv_lens, self.page_size = list(kv_lens), page_size
        need = [-(-n // page_size) for n in kv_lens]
        self.num_pages = sum(need) + spare_pages
        order = torch.randperm(self.num_pages, generator=self.gen)
        width = max(need) + 2
        self.table = torch.randint(0, self.num_pages, (len(kv_lens), width), generator=self.gen)
        start = 0
        for r, n in enumerate(need):
            self.table[r, :n] = order[start : start + n]
            start += n
        self.cache = torch.full((self.num_pages, page_size, hkv, d), float("nan"), dtype=dtype)
        self.keys = [torch.randn(hkv, n, d, generator=self.gen).to(dtype) for n in kv_lens]

    def slots(self, r: int, start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        return self.table[r, pos // self.page_size] * self.page_size + pos % self.page_size

    def write_keys(self, r: int, start: int, stop: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        slots = self.slots(r, start, stop)
        keys = self.keys[r][:, start:stop] if keys is None else keys
        self.cache[slots // self.page_size, slots % self.page_size] = keys.transpose(0, 1)
        return slots

    def fill(self, store: PagedSideStore) -> None:
        """Every row's keys in steps of random sizes, rows interleaved as in a vLLM batch."""
        done = [0] * len(self.kv_lens)
        while any(d < n for d, n in zip(done, self.kv_lens)):
            step = []
            for r, n in enumerate(self.kv_lens):
                if done[r] < n and torch.rand((), generator=self.gen) < 0.7:
                    stop = min(n, done[r] + int(torch.randint(1, 50, (1,), generator=self.gen)))
                    step.append(self.write_keys(r, done[r], stop))
                    done[r] = stop
            if step:
                store.write(self.cache, torch.cat([*step, torch.tensor([-1])]))

    def contiguous(self, method, rows=None) -> list[torch.Tensor]:
        rows = range(len(self.kv_lens)) if rows is None else rows
        return [
            compute_side_data(method, self.keys[r][None], torch.tensor([self.kv_lens[r]]))[0] for r in rows
        ]


def assert_side_equal(store: PagedSideStore, paged: PagedKeys, method) -> None:
    got = store.gather(paged.table, torch.tensor(paged.kv_lens))
    spec = store.spec
    for r, want in enumerate(paged.contiguous(method)):
        units = spec.units(paged.kv_lens[r])
        assert torch.equal(got[r, :, :units], want[:, :units]), f"row {r}"
        assert not got[r, :, units:].any(), f"row {r}: entries past its keys"


CASES = [
    (Quest(block_size=16), (77, 1, 200, 16, 33), 2, 16),
    (Quest(block_size=8), (95, 130, 7), 3, 32),
    (Quest(block_size=16), (300, 45), 1, 64),
    (Sketch(), (77, 1, 130), 2, 16),
    (MagicPIG(bits=5, tables=7), (77, 1, 130), 2, 16),
]


@pytest.mark.parametrize(("method", "kv_lens", "hkv", "page_size"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_paged_side_equals_contiguous_side(method, kv_lens, hkv, page_size, seed) -> None:
    paged = PagedKeys(kv_lens, hkv, 64, page_size, seed=seed)
    store = PagedSideStore.for_cache(method, paged.cache)
    paged.fill(store)
    assert_side_equal(store, paged, method)


def test_bfloat16_keys_keep_their_dtype() -> None:
    paged = PagedKeys((70, 19), 2, 64, 16, dtype=torch.bfloat16)
    store = PagedSideStore.for_cache(Quest(block_size=16), paged.cache)
    assert store.data.dtype == torch.bfloat16
    paged.fill(store)
    assert_side_equal(store, paged, Quest(block_size=16))
    # side data of its own dtype (MagicPIG's int16 codes) keeps it next to bf16 keys
    codes = PagedSideStore.for_cache(MagicPIG(bits=4, tables=5), paged.cache)
    assert codes.data.dtype == torch.int16
    paged.fill(codes)
    assert_side_equal(codes, paged, MagicPIG(bits=4, tables=5))


@pytest.mark.parametrize("method", [Quest(block_size=16), Sketch(), MagicPIG(bits=5, tables=7)])
def test_prefix_cached_pages_serve_every_request_that_shares_them(method) -> None:
    """B maps A's first three full pages (prefix caching) and writes only its own suffix: B's side
    data equals that of its whole key sequence, and A's is untouched."""
    paged = PagedKeys((77, 100), 2, 64, 16)
    shared = 48
    paged.keys[1][:, :shared] = paged.keys[0][:, :shared]
    paged.table[1, :3] = paged.table[0, :3]
    store = PagedSideStore.for_cache(method, paged.cache)
    store.write(paged.cache, paged.write_keys(0, 0, 77))
    store.write(paged.cache, paged.write_keys(1, shared, 70))  # a chunk
    store.write(paged.cache, paged.write_keys(1, 70, 100))
    assert_side_equal(store, paged, method)


def test_rewrites_and_rollback_are_idempotent() -> None:
    """Rewriting slots changes nothing; draft keys written past the final length (a rejected
    speculation) are dropped when the next step rewrites the first rejected slot."""
    method = Quest(block_size=16)
    paged = PagedKeys((41,), 2, 64, 16)
    store = PagedSideStore.for_cache(method, paged.cache)
    store.write(paged.cache, paged.write_keys(0, 0, 39))
    store.write(paged.cache, paged.write_keys(0, 0, 39))
    drafts = torch.randn(2, 5, 64, generator=paged.gen) * 100
    store.write(paged.cache, paged.write_keys(0, 39, 44, drafts))  # 39..43 drafted
    store.write(paged.cache, paged.write_keys(0, 39, 41))  # 39 accepted as 39's key, 40 replaced
    assert_side_equal(store, paged, method)


def test_keys_only_methods_keep_no_store() -> None:
    cache = torch.zeros(4, 16, 2, 64)
    assert PagedSideStore.for_cache(TopK(), cache) is None
    with pytest.raises(ConfigError, match="no side data"):
        PagedSideStore(TopK(), 4, 16, 2, 64, torch.float32)


def test_page_size_must_hold_whole_blocks() -> None:
    with pytest.raises(ConfigError, match="page_size=24 must be a multiple of the side data's block_size=16"):
        PagedSideStore.for_cache(Quest(block_size=16), torch.zeros(4, 24, 2, 64))
    with pytest.raises(ConfigError, match="page_size"):
        side_bytes_per_page(Quest(block_size=32), 16, 2, 64, torch.float16)


def test_a_cache_of_another_shape_is_refused() -> None:
    store = PagedSideStore.for_cache(Quest(block_size=16), torch.zeros(4, 16, 2, 64))
    for shape in [(5, 16, 2, 64), (4, 16, 3, 64), (4, 16, 2, 32)]:
        with pytest.raises(ShapeError, match="key_cache has shape"):
            store.write(torch.zeros(shape), torch.tensor([0]))
    with pytest.raises(ShapeError, match="slot_mapping reaches slot 64"):
        store.write(torch.zeros(4, 16, 2, 64), torch.tensor([64]))
    with pytest.raises(ShapeError, match="kv_lens"):
        store.gather(torch.zeros(2, 1, dtype=torch.int32), torch.tensor([16, 17]))


def test_bytes_next_to_the_kv_cache() -> None:
    """Quest keeps [2, D] per 16 keys and KV head: 1/16 of the KV cache's bytes, in the keys' dtype."""
    for page_size, dtype in [(16, torch.bfloat16), (128, torch.float32)]:
        side = side_bytes_per_page(Quest(block_size=16), page_size, 3, 64, dtype)
        kv = kv_bytes_per_page(page_size, 3, 64, dtype)
        size = torch.empty((), dtype=dtype).element_size()
        assert side == (page_size // 16) * 3 * 2 * 64 * size
        assert kv == 2 * page_size * 3 * 64 * size
        assert side * 16 == kv
        store = PagedSideStore(Quest(block_size=16), 10, page_size, 3, 64, dtype)
        assert store.nbytes == 10 * side
    assert side_bytes_per_page(TopK(), 16, 3, 64, torch.float16) == 0
    assert side_bytes_per_page(Sketch(), 16, 2, 64, torch.float16) == 16 * 2 * 3 * 4  # its own float32


@pytest.mark.parametrize(
    ("util", "total_gib", "other_gib", "ratio"), [(0.9, 141, 20, 1 / 16), (0.5, 80, 30, 0.2)]
)
def test_utilization_with_side_fits_kv_and_side_in_the_old_budget(util, total_gib, other_gib, ratio) -> None:
    """vLLM gives the KV cache ``util * total - other`` bytes; with the lowered utilization the
    cache shrinks so that it and its side data fill exactly that budget."""
    total, other = total_gib * 2**30, other_gib * 2**30
    kv = util * total - other
    lowered = utilization_with_side(util, int(kv), total, ratio)
    kv_after = lowered * total - other
    assert kv_after * (1 + ratio) == pytest.approx(kv, rel=1e-9)
    kv_page, side_page = kv_bytes_per_page(16, 3, 64, torch.bfloat16), 0
    side_page = int(kv_page * ratio)
    pages = int(kv_after // kv_page)
    assert pages * (kv_page + side_page) <= kv
    assert utilization_with_side(util, int(kv), total, 0.0) == util
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        utilization_with_side(1.5, 1, 1, 0.1)


def test_the_plugin_reports_side_bytes_and_the_utilization_to_use() -> None:
    from sparse_attn.integrations.vllm.side_memory import MemoryBudget, allocate_side_store, side_report

    kv_cache = torch.zeros(8, 2, 16, 2 * 64)  # vLLM's [num_pages, Hkv, page_size, 2 * D] view
    key_cache = kv_cache.transpose(1, 2)[..., :64]
    budget = MemoryBudget(gpu_memory_utilization=0.9, num_layers=30)
    assert allocate_side_store(TopK(), key_cache, kv_cache, budget) is None
    store = allocate_side_store(Quest(block_size=16), key_cache, kv_cache, budget)
    assert store.nbytes * 16 == kv_cache.numel() * 4
    assert "6.25% of the layer's KV cache" in side_report(store, kv_cache, budget, None)
    total = 2**30
    want = utilization_with_side(0.9, kv_cache.numel() * 4 * 30, total, 1 / 16)
    assert f"pass gpu_memory_utilization={want:.3f}" in side_report(store, kv_cache, budget, total)

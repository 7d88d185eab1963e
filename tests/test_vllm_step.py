"""The vLLM backend's step logic without vLLM: paged cache writes, row splitting, planning, TP head
shards and the attention call, against float64 dense attention with brute-force masks per request.

Each case is one vLLM step: requests in a random order mixing decodes (one new token), whole
prefills and chunked prefills (a chunk of queries after cached context), K/V written into a
shuffled page table through the slot mapping, unused cache slots poisoned with NaN.
"""

from __future__ import annotations

import math

import pytest
import torch

from sparse_attn import S2, BlockSparse, Dense, MoA, SinkLocal
from sparse_attn.integrations.vllm.cache import cache_views, write_kv
from sparse_attn.integrations.vllm.step import HeadShard, PagedStep, attend
from tests import bruteforce as bf
from tests.oracle import dense_attention

# (q_len, kv_len) per request: decodes, a whole prefill, chunked prefills, a 1-token prompt
REQUESTS = [(1, 77), (40, 40), (1, 1), (23, 130), (1, 200), (64, 95), (7, 7)]


def expected_mask(method, q_len: int, kv_len: int, hq: int, hkv: int) -> torch.Tensor:
    """bool [Hq, q_len, kv_len] from the brute-force builders (None = dense)."""
    if method is None or isinstance(method, Dense):
        return bf.dense_mask(q_len, kv_len, hq)
    if isinstance(method, SinkLocal):
        return bf.sink_local_mask(q_len, kv_len, hq, method.sink_tokens, method.window_tokens)
    if isinstance(method, S2):
        return bf.s2_mask(q_len, kv_len, hq, hkv, method.block_size, method.local_blocks, method.vert_stride)
    if isinstance(method, MoA):
        alphas, betas = method.alphas[0], method.betas[0]
        return bf.moa_mask(q_len, kv_len, alphas, betas, method.sink_tokens, method.min_span)
    if isinstance(method, BlockSparse):
        return bf.block_sparse_mask(
            q_len,
            kv_len,
            hq,
            hkv,
            method.block_size,
            sink_blocks=method.sink_blocks,
            local_blocks=method.local_blocks,
        )
    raise AssertionError(method)


def head_masks(methods, q_len, kv_len, hq, hkv) -> torch.Tensor:
    cache: dict = {}
    rows = []
    for h, m in enumerate(methods):
        if m not in cache:
            cache[m] = expected_mask(m, q_len, kv_len, hq, hkv)
        rows.append(cache[m][h])
    return torch.stack(rows)


class Scenario:
    """A step's requests with their true K/V, a paged cache holding them and the flat queries."""

    def __init__(self, requests, hq, hkv, d, page_size, dtype=torch.float32, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.requests, self.hq, self.hkv, self.d = requests, hq, hkv, d
        self.q_lens = torch.tensor([q for q, _ in requests], dtype=torch.int64)
        self.kv_lens = torch.tensor([k for _, k in requests], dtype=torch.int64)
        pages_per = [math.ceil(k / page_size) for _, k in requests]
        max_pages = max(pages_per) + 2
        num_pages = sum(pages_per) + 5
        order = torch.randperm(num_pages, generator=gen)
        self.block_table = torch.randint(0, num_pages, (len(requests), max_pages), generator=gen)
        start = 0
        for r, n in enumerate(pages_per):
            self.block_table[r, :n] = order[start : start + n]
            start += n
        self.block_table = self.block_table.to(torch.int32)
        # vLLM's logical per-layer cache view [num_pages, Hkv, page_size, 2 * D], NaN where unused
        self.kv_cache = torch.full((num_pages, hkv, page_size, 2 * d), float("nan"), dtype=dtype)
        self.k = [torch.randn(hkv, k, d, generator=gen).to(dtype) for _, k in requests]
        self.v = [torch.randn(hkv, k, d, generator=gen).to(dtype) for _, k in requests]
        key_cache, value_cache = cache_views(self.kv_cache, d)
        for r, (_, kv_len) in enumerate(requests):
            pos = torch.arange(kv_len)
            slots = self.block_table[r, pos // page_size].to(torch.int64) * page_size + pos % page_size
            # a padding token (slot -1) must be skipped
            slots = torch.cat([slots, torch.tensor([-1])])
            key = torch.cat([self.k[r].transpose(0, 1), torch.randn(1, hkv, d, generator=gen).to(dtype)])
            value = torch.cat([self.v[r].transpose(0, 1), torch.randn(1, hkv, d, generator=gen).to(dtype)])
            write_kv(key, value, key_cache, value_cache, slots)
        self.key_cache, self.value_cache = key_cache, value_cache
        self.query_start = torch.cat([torch.zeros(1, dtype=torch.int64), self.q_lens.cumsum(0)])
        self.query = torch.randn(int(self.q_lens.sum()), hq, d, generator=gen).to(dtype)

    def step(self, min_seq_len: int = 0) -> PagedStep:
        return PagedStep(self.query_start, self.kv_lens, self.block_table, min_seq_len=min_seq_len)

    def run(self, methods, shard=None, backend="torch", min_seq_len=0, step=None) -> torch.Tensor:
        shard = shard or HeadShard(self.hq, self.hkv)
        out = torch.full((self.query.shape[0], self.hq, self.d), float("nan"), dtype=self.query.dtype)
        attend(
            self.query,
            self.key_cache,
            self.value_cache,
            step or self.step(min_seq_len),
            tuple(methods),
            shard,
            self.d**-0.5,
            out,
            backend=backend,
        )
        return out

    def run_shard(self, methods, shard: HeadShard) -> torch.Tensor:
        """One tensor-parallel rank: its query heads, its KV heads' cache, its output heads."""
        qs, ks = shard.q_slice(), shard.kv_slice()
        out = torch.empty(self.query.shape[0], shard.local_heads, self.d)
        attend(
            self.query[:, qs],
            self.key_cache[:, :, ks],
            self.value_cache[:, :, ks],
            self.step(),
            tuple(methods),
            shard,
            self.d**-0.5,
            out,
            backend="torch",
        )
        return out

    def reference(self, methods, min_seq_len=0) -> torch.Tensor:
        outs = []
        for r, (q_len, kv_len) in enumerate(self.requests):
            q = self.query[self.query_start[r] : self.query_start[r + 1]].transpose(0, 1)[None]
            row_methods = methods if kv_len >= min_seq_len else [None] * len(methods)
            mask = head_masks(row_methods, q_len, kv_len, self.hq, self.hkv)[None]
            out, _ = dense_attention(q, self.k[r][None], self.v[r][None], mask)
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)


METHODS = {
    "sink_local": SinkLocal(sink_tokens=4, window_tokens=37, block_size=16),
    "s2": S2(block_size=16, local_blocks=2, vert_stride=3),
    "a_shape": BlockSparse(block_size=16, sink_blocks=1, local_blocks=2),
    "dense": Dense(block_size=16),
    # per-head elastic windows (span grows with the request's current length)
    "moa": MoA(
        alphas=((8.0, 20.0, 4.0, 30.0),),
        betas=((0.1, 0.3, 0.5, 0.05),),
        sink_tokens=2,
        min_span=8,
        block_size=16,
    ),
}


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"moa"}))
@pytest.mark.parametrize(("hq", "hkv"), [(4, 2), (3, 3), (8, 1)])
@pytest.mark.parametrize("page_size", [16, 32])
def test_step_matches_reference(name: str, hq: int, hkv: int, page_size: int) -> None:
    sc = Scenario(REQUESTS, hq, hkv, 64, page_size)
    methods = [METHODS[name]] * hq
    out = sc.run(methods)
    torch.testing.assert_close(out.double(), sc.reference(methods), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("world", [1, 2])
def test_moa_per_head_windows(world: int) -> None:
    sc = Scenario(REQUESTS, 4, 2, 64, 16)
    methods = [METHODS["moa"]] * 4
    ref = sc.reference(methods)
    for rank in range(world):
        shard = HeadShard(4, 2, rank, world)
        out = sc.run_shard(methods, shard)
        torch.testing.assert_close(out.double(), ref[:, shard.q_slice()], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("d", [64, 96, 128])
def test_head_dims_and_mixed_heads(d: int) -> None:
    hq, hkv = 6, 2
    methods = [METHODS["sink_local"]] * 2 + [None] * 2 + [METHODS["s2"]] * 2
    sc = Scenario(REQUESTS, hq, hkv, d, 16, seed=d)
    out = sc.run(methods)
    torch.testing.assert_close(out.double(), sc.reference(methods), atol=2e-5, rtol=2e-5)


def test_bfloat16_close_to_reference() -> None:
    sc = Scenario(REQUESTS, 4, 2, 64, 16, dtype=torch.bfloat16)
    methods = [METHODS["sink_local"]] * 4
    out = sc.run(methods)
    torch.testing.assert_close(out.double(), sc.reference(methods), atol=2e-2, rtol=2e-2)


def test_sparse_really_differs_from_dense() -> None:
    sc = Scenario(REQUESTS, 4, 2, 64, 16)
    sparse = sc.run([METHODS["sink_local"]] * 4)
    dense = sc.run([None] * 4)
    long_rows = sc.query_start[4]  # request 4 (a decode over 200 keys) sees far fewer keys
    assert not torch.allclose(sparse[long_rows], dense[long_rows], atol=1e-3)


def test_min_seq_len_rows_run_dense() -> None:
    sc = Scenario(REQUESTS, 4, 2, 64, 16)
    methods = [METHODS["sink_local"]] * 4
    step = sc.step(min_seq_len=96)
    out = sc.run(methods, step=step)
    assert step.num_fallback_rows == sum(k < 96 for _, k in REQUESTS)
    torch.testing.assert_close(out.double(), sc.reference(methods, min_seq_len=96), atol=2e-5, rtol=2e-5)


def test_plans_are_shared_across_layers() -> None:
    sc = Scenario(REQUESTS, 4, 2, 64, 16)
    step = sc.step()
    methods = (METHODS["s2"],) * 4
    shard = HeadShard(4, 2)
    first = [step.plan(gi, methods, shard) for gi in range(len(step.groups()))]
    again = [step.plan(gi, methods, shard) for gi in range(len(step.groups()))]
    assert all(a is b for a, b in zip(first, again))
    kinds = {(g.decode, g.dense) for g in step.groups()}
    assert kinds == {(True, False), (False, False)}


@pytest.mark.parametrize(("hq", "hkv", "world"), [(8, 4, 2), (8, 2, 4), (6, 3, 3)])
def test_tensor_parallel_shards_equal_the_whole_layer(hq: int, hkv: int, world: int) -> None:
    """Each rank's output, from its own heads and KV cache, equals its slice of the unsharded layer;
    S2's per-KV-head offsets follow the model-wide head index."""
    sc = Scenario(REQUESTS, hq, hkv, 64, 16)
    methods = [METHODS["s2"]] * (hq // 2) + [METHODS["sink_local"]] * (hq - hq // 2)
    whole = sc.run(methods)
    torch.testing.assert_close(whole.double(), sc.reference(methods), atol=2e-5, rtol=2e-5)
    for rank in range(world):
        shard = HeadShard(hq, hkv, rank, world)
        out = sc.run_shard(methods, shard)
        torch.testing.assert_close(out, whole[:, shard.q_slice()], atol=1e-6, rtol=1e-6)


def test_head_shard_rejects_uneven_splits() -> None:
    with pytest.raises(ValueError, match="world_size"):
        HeadShard(6, 2, 0, 4)
    with pytest.raises(ValueError, match="num_kv_heads"):
        HeadShard(12, 3, 0, 2)


@pytest.mark.parametrize("name", ["sink_local", "s2"])
def test_triton_paged_path_matches_reference(name: str) -> None:
    """The GPU path (Triton kernels reading the page table) in Triton's interpreter."""
    requests = [(1, 50), (17, 40), (1, 1), (9, 33)]
    sc = Scenario(requests, 4, 2, 64, 16)
    methods = [METHODS[name]] * 4
    out = sc.run(methods, backend="triton")
    torch.testing.assert_close(out.double(), sc.reference(methods), atol=1e-4, rtol=1e-4)


def test_cache_views_reject_a_wrong_shape() -> None:
    with pytest.raises(ValueError, match="2 \\* head_size"):
        cache_views(torch.randn(4, 2, 16, 64), 64)

"""Dynamic methods (TopK, Quest, MagicPIG) in the vLLM backend's step logic, without vLLM: paged side data
written through the slot mapping, decode rows selecting from it (or from the keys), prefill rows
(whole, chunked, a prompt's one-token last chunk) running the prefill selector or the static prefill
plan, over shuffled page tables with NaN in every unused cache slot.

References are independent: float64 dense attention (tests/oracle.py) over exactly the keys the
brute-force selections of tests/bruteforce_dynamic.py choose (MagicPIG: the keys and log-weights of
its plain-loop reference, ``magicpig_reference``).
"""

from __future__ import annotations

import pytest
import torch

from sparse_attn import ConfigError, MagicPIG, Quest, SinkLocal, TopK
from sparse_attn.integrations.vllm.dynamic_step import DynamicStats
from sparse_attn.integrations.vllm.step import HeadShard, PagedStep, attend
from sparse_attn.methods.magicpig import magicpig_reference
from sparse_attn.paged_side import PagedSideStore
from tests import bruteforce as bf
from tests import bruteforce_dynamic as bfd
from tests.oracle import dense_attention
from tests.test_vllm_step import Scenario

# (q_len, kv_len, still prefilling): decodes, whole and chunked prefills, a one-token last chunk
REQUESTS = [
    (1, 77, False),
    (40, 40, True),
    (1, 1, False),
    (23, 130, True),
    (1, 200, False),
    (64, 95, True),
    (7, 7, True),
    (1, 61, True),
]

METHODS = {
    "magicpig": MagicPIG(bits=4, tables=8, seed=1, sink_tokens=4, local_tokens=8),
    "topk": TopK(tokens=40, sink_tokens=4, local_tokens=8, block_size=16),
    "topk_density": TopK(density=0.3, sink_tokens=2, local_tokens=5, block_size=32),
    "quest": Quest(tokens=64, sink_tokens=4, local_tokens=8, block_size=16),
    "quest_static_prefill": Quest(
        density=0.4,
        sink_tokens=3,
        local_tokens=5,
        block_size=8,
        prefill=SinkLocal(sink_tokens=4, window_tokens=37, block_size=16),
    ),
}
COVERING = {"topk": TopK(density=1.0, block_size=16), "quest": Quest(tokens=100_000, block_size=16)}


class DynScenario(Scenario):
    """A step's requests in a paged cache, plus the layer's side data written through the slot
    mapping the way vLLM's steps write it: each request's context in chunks over earlier steps, then
    this step's new keys of every request in one write."""

    def __init__(self, requests, hq, hkv, d, page_size, seed=0):
        super().__init__([(q, k) for q, k, _ in requests], hq, hkv, d, page_size, seed=seed)
        self.page_size = page_size
        self.prefilling = torch.tensor([p for _, _, p in requests])
        self.gen = torch.Generator().manual_seed(seed + 1)

    def slots(self, r: int, start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        return (
            self.block_table[r, pos // self.page_size].to(torch.int64) * self.page_size + pos % self.page_size
        )

    def side_store(self, method, key_cache=None) -> PagedSideStore | None:
        key_cache = self.key_cache if key_cache is None else key_cache
        store = PagedSideStore.for_cache(method, key_cache)
        if store is None:
            return None
        for r, (q_len, kv_len) in enumerate(self.requests):
            done = 0
            while done < kv_len - q_len:  # earlier steps: chunks of random sizes
                n = int(torch.randint(1, 40, (1,), generator=self.gen))
                stop = min(kv_len - q_len, done + n)
                store.write(key_cache, self.slots(r, done, stop))
                done = stop
        new = [self.slots(r, k - q, k) for r, (q, k) in enumerate(self.requests)]
        store.write(key_cache, torch.cat([*new, torch.tensor([-1])]))  # one step, one padding token
        return store

    def step(self, min_seq_len: int = 0) -> PagedStep:
        return PagedStep(
            self.query_start, self.kv_lens, self.block_table, min_seq_len, prefilling=self.prefilling
        )

    def run_dynamic(self, method, shard=None, backend="torch", observe=None, heads=None):
        """One rank (all heads by default) of the layer: its query heads, KV heads and side data."""
        shard = shard or HeadShard(self.hq, self.hkv)
        qs, ks = shard.q_slice(), shard.kv_slice()
        key_cache, value_cache = self.key_cache[:, :, ks], self.value_cache[:, :, ks]
        out = torch.full((self.query.shape[0], shard.local_heads, self.d), float("nan"))
        attend(
            self.query[:, qs],
            key_cache,
            value_cache,
            self.step(),
            (method,) * self.hq,
            shard,
            self.d**-0.5,
            out,
            backend=backend,
            side=self.side_store(method, key_cache),
            observe=observe,
        )
        return out

    def request(self, r: int):
        q = self.query[self.query_start[r] : self.query_start[r + 1]].transpose(0, 1)[None]
        return q, self.k[r][None], self.v[r][None]

    def dynamic_reference(self, method) -> torch.Tensor:
        outs = []
        for r, (q_len, kv_len) in enumerate(self.requests):
            q, k, v = self.request(r)
            decode = q_len == 1 and not bool(self.prefilling[r])
            bias = None
            if decode and isinstance(method, MagicPIG):
                mask, bias = magicpig_mask_and_bias(method, q, k, kv_len)
            else:
                mask = selection_mask(method, q, k, q_len, kv_len, decode, self.d**-0.5)
            out, _ = dense_attention(q, k, v, mask[None], bias=None if bias is None else bias[None])
            outs.append(out[0].transpose(0, 1))
        return torch.cat(outs)


def magicpig_mask_and_bias(method, q, k, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [Hq, 1, kv_len] and float64 log-weights: what MagicPIG's reference samples per query head."""
    m = method
    chosen = magicpig_reference(
        q, k, [kv_len], m.projection(q.shape[-1]), None, m.bits, m.tables, m.sink_tokens, m.local_tokens
    )[0]
    mask = torch.zeros(q.shape[1], 1, kv_len, dtype=torch.bool)
    bias = torch.zeros(q.shape[1], 1, kv_len, dtype=torch.float64)
    for h, keys in enumerate(chosen):
        for j, lw in keys.items():
            mask[h, 0, j], bias[h, 0, j] = True, lw
    return mask, bias


def _budget(method) -> dict:
    return dict(
        density=method.density, tokens=method.tokens, sink=method.sink_tokens, local=method.local_tokens
    )


def selection_mask(method, q, k, q_len: int, kv_len: int, decode: bool, scale: float) -> torch.Tensor:
    """bool [Hq, q_len, kv_len]: the keys the brute-force selection lets each query attend."""
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    pos = kv_len - q_len + torch.arange(q_len)
    causal = torch.arange(kv_len)[None, :] <= pos[:, None]  # [q_len, kv_len]
    if decode:
        args = (q, k, [q_len], [kv_len], scale)
        if isinstance(method, TopK):
            sets = bfd.topk_decode(*args, True, **_budget(method))[0]
        else:
            sets = bfd.quest_decode(*args, **_budget(method), block=method.block_size)[0]
        chosen = torch.zeros(hkv, kv_len, dtype=torch.bool)
        for h, keys in enumerate(sets):
            chosen[h, sorted(keys)] = True
        return chosen.repeat_interleave(group, 0)[:, None, :] & causal
    if isinstance(method, TopK):
        bs = method.block_size
        blocks = bfd.topk_prefill_blocks(q, k, q_len, kv_len, 0, scale, True, **_budget(method), block=bs)
        first = (kv_len - q_len) // bs
        mask = torch.zeros(hkv, q_len, kv_len, dtype=torch.bool)
        for i, p in enumerate(pos.tolist()):
            for h in range(hkv):
                for kb in blocks[(h, p // bs - first)]:
                    mask[h, i, kb * bs : (kb + 1) * bs] = True
        return mask.repeat_interleave(group, 0) & causal
    if method.prefill is None:
        return bf.dense_mask(q_len, kv_len, hq)
    pre = method.prefill
    return bf.sink_local_mask(q_len, kv_len, hq, pre.sink_tokens, pre.window_tokens)


TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("name", "hq", "hkv", "page_size"),
    [
        ("topk", 4, 2, 16),
        ("topk", 3, 3, 16),
        ("topk_density", 6, 2, 32),
        ("quest", 4, 2, 16),
        ("quest", 6, 2, 32),
        ("quest_static_prefill", 3, 3, 16),
        ("magicpig", 4, 2, 16),
        ("magicpig", 3, 3, 32),
    ],
)
def test_dynamic_step_matches_brute_force_selection(name: str, hq: int, hkv: int, page_size: int) -> None:
    sc = DynScenario(REQUESTS, hq, hkv, 64, page_size, seed=hq)
    method = METHODS[name]
    out = sc.run_dynamic(method)
    torch.testing.assert_close(out.double(), sc.dynamic_reference(method), **TOL)


@pytest.mark.parametrize("name", sorted(COVERING))
def test_budget_covering_every_row_is_dense(name: str) -> None:
    sc = DynScenario(REQUESTS, 4, 2, 64, 16)
    out = sc.run_dynamic(COVERING[name])
    torch.testing.assert_close(out.double(), sc.reference([None] * 4), **TOL)


@pytest.mark.parametrize("name", ["topk", "quest"])
def test_selection_really_drops_keys(name: str) -> None:
    sc = DynScenario(REQUESTS, 4, 2, 64, 16)
    stats = DynamicStats()
    out = sc.run_dynamic(METHODS[name], observe=stats.observe)
    dense = sc.reference([None] * 4)
    decode_200 = sc.query_start[4]  # request 4: a decode over 200 keys
    assert not torch.allclose(out[decode_200].double(), dense[decode_200], atol=1e-3)
    got = stats.as_dict()
    assert got["decode_selections"] == 3  # three decode rows; the one-token chunk is a prefill
    assert 0.2 < got["decode_density"] < 0.7
    want_prefill = "topk" if name == "topk" else "dense"
    assert got["prefill_rows"] == {want_prefill: 5}


def test_one_token_prompt_chunk_runs_the_prefill_path() -> None:
    """A prompt's one-token last chunk attends like the prefill it is (Quest: densely, as the Hugging
    Face prefill does), not like a decode, which it would be without vLLM's ``is_prefilling``."""
    method = METHODS["quest"]
    chunk = DynScenario([(1, 200, True)], 4, 2, 64, 16)
    decode = DynScenario([(1, 200, False)], 4, 2, 64, 16)
    out = chunk.run_dynamic(method)
    torch.testing.assert_close(out.double(), chunk.reference([None] * 4), **TOL)
    assert torch.equal(decode.query, chunk.query)
    assert not torch.allclose(decode.run_dynamic(method), out, atol=1e-3)


def test_layers_select_from_their_own_queries() -> None:
    """Two layers in one step (one PagedStep): each selects from its own queries; dynamic plans are
    never shared across layers as static plans are."""
    first, second = DynScenario(REQUESTS, 4, 2, 64, 16), DynScenario(REQUESTS, 4, 2, 64, 16)
    second.query = -second.query  # other queries over the same pages: other selections
    step = first.step()
    method = METHODS["topk"]
    for layer in (first, second):
        out = torch.empty(layer.query.shape[0], 4, 64)
        attend(
            layer.query,
            layer.key_cache,
            layer.value_cache,
            step,
            (method,) * 4,
            HeadShard(4, 2),
            64**-0.5,
            out,
        )
        torch.testing.assert_close(out.double(), layer.dynamic_reference(method), **TOL)


@pytest.mark.parametrize(("hq", "hkv", "world"), [(8, 4, 2), (6, 3, 3)])
@pytest.mark.parametrize("name", ["topk", "quest_static_prefill"])
def test_tensor_parallel_ranks_equal_the_whole_layer(hq: int, hkv: int, world: int, name: str) -> None:
    sc = DynScenario(REQUESTS, hq, hkv, 64, 16)
    method = METHODS[name]
    whole = sc.run_dynamic(method)
    for rank in range(world):
        shard = HeadShard(hq, hkv, rank, world)
        out = sc.run_dynamic(method, shard=shard)
        torch.testing.assert_close(out, whole[:, shard.q_slice()], atol=1e-6, rtol=1e-6)


def test_split_gqa_groups_are_refused() -> None:
    sc = DynScenario(REQUESTS[:2], 4, 1, 64, 16)
    with pytest.raises(ConfigError, match="tensor_parallel_size=2 exceeds num_kv_heads=1"):
        sc.run_dynamic(METHODS["topk"], shard=HeadShard(4, 1, 0, 2))


def test_missing_side_store_is_refused() -> None:
    sc = DynScenario(REQUESTS[:2], 4, 2, 64, 16)
    out = torch.empty(sc.query.shape[0], 4, 64)
    with pytest.raises(ConfigError, match="side"):
        attend(
            sc.query,
            sc.key_cache,
            sc.value_cache,
            sc.step(),
            (METHODS["quest"],) * 4,
            HeadShard(4, 2),
            0.1,
            out,
        )


@pytest.mark.parametrize("name", ["topk", "quest", "magicpig"])
def test_triton_paged_path_matches_brute_force(name: str) -> None:
    """The GPU path (Triton attention and scoring kernels) in Triton's interpreter."""
    requests = [(1, 50, False), (17, 40, True), (1, 1, False), (9, 33, True)]
    sc = DynScenario(requests, 4, 2, 64, 16)
    method = METHODS[name]
    out = sc.run_dynamic(method, backend="triton")
    torch.testing.assert_close(out.double(), sc.dynamic_reference(method), atol=1e-4, rtol=1e-4)

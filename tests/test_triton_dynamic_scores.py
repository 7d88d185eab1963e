"""Triton scoring kernels of the dynamic methods (TopK's exact logits over contiguous and paged keys,
Quest's block bounds) against the torch functions they replace (``exact_scores``, ``block_bounds``) and
against float64 brute force written here, plus end to end: TopK / Quest through ``sparse_attention``
with ``backend="triton"`` select the same keys and give the same output as ``backend="torch"``.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on tiny shapes; with
TRITON_INTERPRET=0 on a CUDA machine the same cases run on the GPU.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import sparse_attn as sa
from sparse_attn.methods.quest import Quest, block_bounds, block_min_max
from sparse_attn.methods.topk import TopK, exact_scores

triton = pytest.importorskip("triton")
from sparse_attn.triton_kernels import dynamic_scores  # noqa: E402
from sparse_attn.triton_kernels.dynamic_scores import quest_bounds, topk_scores  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_CUDA = torch.cuda.is_available() and not INTERPRET
DEV = "cuda" if RUN_CUDA else "cpu"
PAGE = 16
NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- oracles
def brute_scores(q, k, q_lens, kv_lens, scale, causal):
    """float64 scores of every (group row, key) by explicit loops over rows: [B, Hkv, G*Sq, Skv]."""
    B, hq, sq, _ = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    out = torch.full((B, hkv, g * sq, n), NEG_INF, dtype=torch.float64)
    q64, k64 = q.double().cpu(), k.double().cpu()
    for b in range(B):
        ql, kl = int(q_lens[b]), int(kv_lens[b])
        for h in range(hq):
            for i in range(ql):
                visible = min(kl, kl - ql + i + 1) if causal else kl
                if visible > 0:
                    out[b, h // g, (h % g) * sq + i, :visible] = (
                        k64[b, h // g, :visible] @ q64[b, h, i]
                    ) * scale
    return out


def brute_bounds(q, side, scale):
    """float64 ``sum_d max(q_d min_d, q_d max_d) * scale`` elementwise: [B, Hkv, G*Sq, nb]."""
    B, hq, sq, d = q.shape
    hkv = side.shape[1]
    qg = q.double().cpu().reshape(B, hkv, (hq // hkv) * sq, 1, d)
    lo = side.double().cpu()[:, :, None, :, 0, :]  # [B, Hkv, 1, nb, D]
    hi = side.double().cpu()[:, :, None, :, 1, :]
    return torch.maximum(qg * lo, qg * hi).sum(-1) * scale


def check_against(got, torch_ref, brute):
    """-inf exactly where the oracle has it; finite values within twice the torch path's own fp32 error
    (plus a float32 ulp floor of the largest score)."""
    got, torch_ref = got.cpu(), torch_ref.cpu()
    assert got.dtype == torch.float32 and got.shape == brute.shape
    assert not got.isnan().any(), "unwritten (poisoned) or NaN-contaminated elements"
    neg = brute == NEG_INF
    assert torch.equal(torch_ref == NEG_INF, neg), "the float64 oracle disagrees with the torch path's mask"
    assert torch.equal(got == NEG_INF, neg)
    fin = ~neg
    if not fin.any():
        return
    err = (got.double() - brute)[fin].abs().max().item()
    ref_err = (torch_ref.double() - brute)[fin].abs().max().item()
    floor = 2.0 * torch.finfo(torch.float32).eps * brute[fin].abs().max().item()
    assert err <= 2 * ref_err + floor, (err, ref_err, floor)


def rand(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def poison_tail(k, kv_lens):
    """NaN in every key slot at or past the row's length: the kernel must never read one."""
    k = k.clone()
    for b, kl in enumerate(kv_lens):
        k[b, :, kl:] = float("nan")
    return k


def to_paged(k, kv_lens, *, seed, extra_cols=2):
    """vLLM V1 key cache [num_pages, PAGE, Hkv, D] holding k's valid keys in randomly permuted pages.
    Every other slot (past kv_len in a used page, spare pages) is NaN; block-table entries past a row's
    used pages hold -1 (never dereferenced)."""
    B, H, S, D = k.shape
    ppr = -(-S // PAGE)
    num_pages = B * ppr + 3
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)[: B * ppr]
    table = torch.full((B, ppr + extra_cols), -1, dtype=torch.int32)
    cache = torch.full((num_pages, PAGE, H, D), float("nan"), dtype=k.dtype)
    for b in range(B):
        used = -(-kv_lens[b] // PAGE)
        table[b, :used] = perm[b * ppr : b * ppr + used].to(torch.int32)
        for j in range(kv_lens[b]):
            cache[table[b, j // PAGE], j % PAGE] = k[b, :, j].cpu()
    return cache.to(DEV), table.to(DEV)


def nan_out(shape):
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEV)


_DT = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


# ----------------------------------------------------------------------------- TopK scores
# (B, Hq, Hkv, Sq, Skv, D, dtype, causal, q_lens, kv_lens)
SCORE_CASES = [
    (1, 1, 1, 1, 1, 64, "f32", True, [1], [1]),
    (2, 3, 1, 1, 63, 96, "f16", True, [1, 1], [63, 17]),
    (2, 6, 2, 3, 300, 128, "f32", True, [3, 1], [300, 129]),
    (3, 2, 2, 2, 200, 64, "f16", False, [2, 0, 1], [200, 5, 0]),
    (2, 3, 3, 4, 130, 96, "bf16", True, [4, 2], [130, 66]),
    (1, 12, 1, 6, 70, 64, "f32", True, [5], [70]),  # 72 group rows: two row tiles
    (2, 3, 1, 2, 90, 128, "f16", False, [2, 2], [1, 90]),
]


def _sid(c):
    B, hq, hkv, sq, skv, d, dt, causal, _, _ = c
    return f"B{B}-Sq{sq}-T{skv}-HQ{hq}-H{hkv}-D{d}-{dt}-{'causal' if causal else 'full'}"


@pytest.mark.parametrize("case", SCORE_CASES, ids=[_sid(c) for c in SCORE_CASES])
def test_topk_scores_contiguous(case):
    B, hq, hkv, sq, skv, d, dt, causal, q_lens, kv_lens = case
    q = rand(B, hq, sq, d, dtype=_DT[dt], seed=1)
    k = rand(B, hkv, skv, d, dtype=_DT[dt], seed=2)
    scale = 1.0 / math.sqrt(d)
    ql, kvl = torch.tensor(q_lens), torch.tensor(kv_lens)
    ref = exact_scores(q, k, kvl, ql, scale, causal)
    # padding queries and keys past kv_len are NaN (never allowed to reach an output), and q is a
    # [B, Sq, Hq, D] buffer seen as [B, Hq, Sq, D], as attention layers hand it over
    q_in = poison_tail(q, q_lens).transpose(1, 2).contiguous().transpose(1, 2)
    got = topk_scores(
        q_in, poison_tail(k, kv_lens), ql, kvl, causal=causal, scale=scale, out=nan_out(ref.shape)
    )
    check_against(got, ref, brute_scores(q, k, q_lens, kv_lens, scale, causal))


# (B, Hq, Hkv, Sq, Skv, D, dtype, causal, q_lens, kv_lens)
PAGED_CASES = [
    (2, 3, 1, 1, 63, 96, "f16", True, [1, 1], [63, 40]),
    (2, 4, 2, 2, 200, 128, "f32", True, [2, 1], [200, 17]),
    (3, 2, 2, 1, 100, 64, "f16", False, [1, 1, 0], [100, 16, 0]),
]


@pytest.mark.parametrize("case", PAGED_CASES, ids=[_sid(c) for c in PAGED_CASES])
def test_topk_scores_paged(case):
    B, hq, hkv, sq, skv, d, dt, causal, q_lens, kv_lens = case
    q = rand(B, hq, sq, d, dtype=_DT[dt], seed=3)
    k = rand(B, hkv, skv, d, dtype=_DT[dt], seed=4)
    scale = 0.7 / math.sqrt(d)
    ql, kvl = torch.tensor(q_lens), torch.tensor(kv_lens)
    cache, table = to_paged(k, kv_lens, seed=5)
    ref = exact_scores(q, k, kvl, ql, scale, causal)
    got = topk_scores(
        q,
        cache,
        ql,
        kvl,
        causal=causal,
        scale=scale,
        block_table=table,
        page_size=PAGE,
        num_keys=skv,
        out=nan_out(ref.shape),
    )
    check_against(got, ref, brute_scores(q, k, q_lens, kv_lens, scale, causal))


def test_topk_scores_paged_default_width_is_table_capacity():
    q = rand(2, 2, 1, 64, dtype=torch.float16, seed=6)
    k = rand(2, 1, 40, 64, dtype=torch.float16, seed=7)
    kv_lens = [40, 9]
    cache, table = to_paged(k, kv_lens, seed=8, extra_cols=1)
    got = topk_scores(
        q,
        cache,
        None,
        torch.tensor(kv_lens, device=DEV),
        causal=True,
        scale=None,
        block_table=table,
        page_size=PAGE,
    ).cpu()
    assert got.shape == (2, 1, 2, table.shape[1] * PAGE)
    ref = exact_scores(q, k, torch.tensor(kv_lens), torch.tensor([1, 1]), 1 / 8, True)
    assert bool((got[..., 40:] == NEG_INF).all())
    check_against(got[..., :40], ref, brute_scores(q, k, [1, 1], kv_lens, 1 / 8, True))


# ----------------------------------------------------------------------------- Quest bounds
# (B, Hq, Hkv, Sq, kv_lens, block, D, dtype)
BOUND_CASES = [
    (1, 1, 1, 1, [16], 16, 64, "f32"),
    (2, 3, 1, 1, [63, 20], 16, 96, "f16"),
    (2, 6, 2, 2, [300, 45], 4, 128, "f32"),  # 75 blocks: two block tiles
    (1, 3, 3, 1, [130], 8, 96, "bf16"),
    (3, 4, 2, 3, [64, 1, 0], 16, 64, "f16"),
]


def _bid(c):
    B, hq, hkv, sq, kv_lens, bs, d, dt = c
    return f"B{B}-Sq{sq}-T{max(kv_lens)}-bs{bs}-HQ{hq}-H{hkv}-D{d}-{dt}"


@pytest.mark.parametrize("case", BOUND_CASES, ids=[_bid(c) for c in BOUND_CASES])
def test_quest_bounds(case):
    B, hq, hkv, sq, kv_lens, bs, d, dt = case
    dtype = _DT[dt]
    n = -(-max(kv_lens) // bs) * bs
    q = rand(B, hq, sq, d, dtype=dtype, seed=9)
    k = rand(B, hkv, n + 2 * bs, d, dtype=dtype, seed=10)
    kvl = torch.tensor(kv_lens)[:, None]
    side = block_min_max(k, bs, kvl)  # [B, Hkv, nb + 2, 2, D], empty blocks zero
    side = side[:, :, : n // bs]  # a strided view, as Quest.select_decode passes it
    scale = 1.0 / math.sqrt(d)
    ref = block_bounds(q, side, scale)
    got = quest_bounds(q, side, scale, out=nan_out(ref.shape))
    brute = brute_bounds(q, side, scale)
    check_against(got, ref, brute)
    # the bound holds: no present key of a block scores above it
    exact = brute_scores(q, k[:, :, :n], [sq] * B, kv_lens, scale, causal=False)
    block_max = exact.view(*exact.shape[:3], n // bs, bs).amax(-1)
    present = block_max > NEG_INF
    assert bool((got.double().cpu()[present] >= block_max[present] - 1e-4).all())


def test_empty_outputs():
    q = rand(2, 2, 1, 64, dtype=torch.float32, seed=11)
    assert quest_bounds(q, rand(2, 1, 0, 2, 64, dtype=torch.float32, seed=12), None).shape == (2, 1, 2, 0)
    k = rand(2, 1, 0, 64, dtype=torch.float32, seed=13)
    assert topk_scores(q, k, [1, 1], [0, 0], causal=False, scale=None).shape == (2, 1, 2, 0)


# ----------------------------------------------------------------------------- errors
def test_errors_name_the_argument(monkeypatch):
    q = rand(1, 2, 1, 64, dtype=torch.float16, seed=14)
    k = rand(1, 1, 32, 64, dtype=torch.float16, seed=15)
    with pytest.raises(ValueError, match="k has dtype"):
        topk_scores(q, k.float(), None, None, causal=True, scale=None)
    with pytest.raises(ValueError, match="Hq=2 must be a multiple of Hkv=3"):
        topk_scores(q, k.expand(1, 3, 32, 64), None, None, causal=True, scale=None)
    with pytest.raises(ValueError, match="kv_lens"):
        topk_scores(q, k, None, [33], causal=True, scale=None)
    with pytest.raises(ValueError, match="q_lens <= kv_lens"):
        topk_scores(q, k, [1], [0], causal=True, scale=None)
    cache, table = to_paged(k, [32], seed=16)
    with pytest.raises(ValueError, match="page_size is required"):
        topk_scores(q, cache, None, [32], causal=True, scale=None, block_table=table)
    with pytest.raises(ValueError, match="block_table has entries outside"):
        topk_scores(q, cache, None, [32], causal=True, scale=None, block_table=table * 0 + 99, page_size=PAGE)
    with pytest.raises(ValueError, match="num_keys"):
        topk_scores(
            q, cache, None, [32], causal=True, scale=None, block_table=table, page_size=PAGE, num_keys=10**6
        )
    with pytest.raises(ValueError, match="out must be a float32"):
        topk_scores(
            q,
            k,
            None,
            None,
            causal=True,
            scale=None,
            out=torch.empty(1, 1, 2, 32, dtype=torch.float16, device=DEV),
        )
    with pytest.raises(ValueError, match="side must be"):
        quest_bounds(q, rand(1, 1, 4, 2, 32, dtype=torch.float16, seed=17), None)
    with pytest.raises(ValueError, match="head dim must be <= 256"):
        quest_bounds(q.new_zeros(1, 2, 1, 512), q.new_zeros(1, 1, 4, 2, 512), None)
    if not RUN_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="need CUDA tensors"):
            quest_bounds(q, rand(1, 1, 4, 2, 64, dtype=torch.float16, seed=18), None)


# ----------------------------------------------------------------------------- end to end
# (method, B, Hq, Hkv, Skv, D, dtype, kv_lens)
E2E_CASES = [
    (TopK(tokens=40), 2, 3, 1, 300, 64, "f16", [300, 131]),
    (TopK(density=0.1, sink_tokens=2, local_tokens=8), 1, 2, 2, 257, 96, "f32", [257]),
    (Quest(tokens=64), 2, 6, 2, 300, 64, "f16", [300, 77]),
    (Quest(tokens=48, block_size=8), 2, 1, 1, 200, 128, "f32", [200, 100]),
]


def _eid(c):
    m, B, hq, hkv, skv, d, dt, _ = c
    return f"{m.name}-B{B}-T{skv}-HQ{hq}-H{hkv}-D{d}-{dt}"


@pytest.mark.parametrize("case", E2E_CASES, ids=[_eid(c) for c in E2E_CASES])
def test_sparse_attention_triton_matches_torch(case, monkeypatch):
    method, B, hq, hkv, skv, d, dt, kv_lens = case
    dtype = _DT[dt]
    q = rand(B, hq, 1, d, dtype=dtype, seed=19)
    k = rand(B, hkv, skv, d, dtype=dtype, seed=20)
    v = rand(B, hkv, skv, d, dtype=dtype, seed=21)
    calls = []
    name = "topk_scores" if isinstance(method, TopK) else "quest_bounds"
    kernel = getattr(dynamic_scores, name)
    monkeypatch.setattr(dynamic_scores, name, lambda *a, **kw: calls.append(1) or kernel(*a, **kw))

    sel_t = sa.select(method, q, k, kv_lens=kv_lens, backend="triton")
    assert calls, "backend='triton' did not run the scoring kernel"
    sel_c = sa.select(method, q, k, kv_lens=kv_lens, backend="torch")
    assert torch.equal(sel_t.counts.cpu(), sel_c.counts.cpu())
    assert torch.equal(sel_t.indices.cpu(), sel_c.indices.cpu())
    assert int(sel_t.counts.min()) < min(kv_lens), "the budget must leave keys out for the test to bite"

    out_t = sa.sparse_attention(q, k, v, method, kv_lens=kv_lens, backend="triton")
    out_c = sa.sparse_attention(q, k, v, method, kv_lens=kv_lens, backend="torch")
    atol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out_t.float().cpu(), out_c.float().cpu(), atol=atol, rtol=0)

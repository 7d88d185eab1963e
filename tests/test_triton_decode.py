"""Triton sparse decode kernels (token selections and key-block lists, contiguous and paged caches)
against the torch token-sparse path in float64 and the float64 dense oracle with an explicit mask.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) on tiny shapes. With
TRITON_INTERPRET=0 on a CUDA machine the same small cases run on the GPU, plus cases at realistic
sizes that are only defined (not even collected elsewhere) when a GPU is present.
"""

from __future__ import annotations

import os

import pytest
import torch
from oracle import NEG_INF, dense_attention, lowp_dense_attention, make_qkv, max_err

import sparse_attn as sa

triton = pytest.importorskip("triton")
from sparse_attn.triton_kernels.sparse_decode import block_decode, token_decode  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
RUN_CUDA = torch.cuda.is_available() and not INTERPRET
# the small cases run on CPU under the interpreter, and on the GPU when one is used instead
DEV = "cuda" if RUN_CUDA else "cpu"
PAGE = 16
GARBAGE = 10**6  # written into index slots past counts: the kernel must never look at them


# ----------------------------------------------------------------------------- builders
def make_selection(
    B, hs, kv_lens, k_max, *, seed, empty=(), index_dtype=torch.int64, weights=False, device="cpu"
):
    """Sorted distinct indices < kv_lens[b]; (b, h) in ``empty`` select nothing; odd heads always keep
    the newest keys (so causal with Sq > 1 drops some for early queries); slots past counts hold
    garbage."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, hs, k_max), GARBAGE, dtype=torch.int64)
    cnt = torch.zeros(B, hs, dtype=torch.int32)
    for b in range(B):
        kl = kv_lens[b]
        for h in range(hs):
            if (b, h) in empty or kl == 0:
                continue
            n = int(torch.randint(1, min(k_max, kl) + 1, (1,), generator=g))
            sel = torch.randperm(kl, generator=g)[:n]
            if h % 2 == 1:
                sel = torch.unique(torch.cat([sel[: max(0, n - 2)], torch.tensor([kl - 1, max(0, kl - 2)])]))
            sel = sel.sort().values
            idx[b, h, : len(sel)] = sel
            cnt[b, h] = len(sel)
    lw = torch.rand(B, hs, k_max, generator=g) * 3.0 - 1.0 if weights else None
    out = (idx.to(index_dtype).to(device), cnt.to(device), None if lw is None else lw.to(device))
    return out


def make_blocks(B, hs, kv_lens, block_k, max_blocks, *, seed, empty=(), device="cpu"):
    """Distinct key blocks per (b, h) in random (unsorted) order, the partial last block included
    when drawn; padding entries hold garbage."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((B, hs, max_blocks), GARBAGE, dtype=torch.int32)
    cnt = torch.zeros(B, hs, dtype=torch.int32)
    for b in range(B):
        nb = -(-kv_lens[b] // block_k)
        for h in range(hs):
            if (b, h) in empty or nb == 0:
                continue
            n = int(torch.randint(1, min(max_blocks, nb) + 1, (1,), generator=g))
            blocks = torch.randperm(nb, generator=g)[:n]
            if h % 2 == 1 and (nb - 1) not in blocks.tolist():
                blocks[0] = nb - 1  # the block holding the newest keys
            idx[b, h, :n] = blocks.to(torch.int32)
            cnt[b, h] = n
    return idx.to(device), cnt.to(device)


def blocks_to_selection(kv_indices, kv_counts, block_k, kv_lens):
    """The TokenSelection with exactly the keys of the listed blocks (below kv_lens)."""
    B, H, _ = kv_indices.shape
    rows, cnt = [], torch.zeros(B, H, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            n = int(kv_counts[b, h])
            blk = kv_indices[b, h, :n].long().cpu()
            keys = (blk[:, None] * block_k + torch.arange(block_k)).flatten()
            keys = keys[keys < kv_lens[b]].sort().values
            rows.append(keys)
            cnt[b, h] = len(keys)
    k_max = max(1, max(len(r) for r in rows))
    idx = torch.zeros(B, H, k_max, dtype=torch.int64)
    for n, r in enumerate(rows):
        idx[n // H, n % H, : len(r)] = r
    return sa.TokenSelection(indices=idx, counts=cnt)


def to_paged(k, v, *, seed, page_size=PAGE, extra_cols=2):
    """vLLM V1 paged cache [num_pages, page_size, Hkv, D] holding k/v in randomly permuted pages
    (so page order != logical order); spare pages hold garbage, and ``extra_cols`` unused block-table
    columns hold -1 (never used by any row, so never checked or read)."""
    B, H, S, _ = k.shape
    ppr = -(-S // page_size)
    num_pages = B * ppr + 3
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)[: B * ppr]
    table = torch.full((B, ppr + extra_cols), -1, dtype=torch.int32)
    table[:, :ppr] = perm.view(B, ppr).to(torch.int32)

    def scatter(x):
        cache = torch.randn(num_pages, page_size, H, x.shape[-1], generator=g).to(x.dtype) * 50
        xp = torch.zeros(B, H, ppr * page_size, x.shape[-1], dtype=x.dtype)
        xp[:, :, :S] = x.cpu()
        cache[perm] = (
            xp.view(B, H, ppr, page_size, -1).permute(0, 2, 3, 1, 4).reshape(B * ppr, page_size, H, -1)
        )
        return cache.to(x.device)

    return scatter(k), scatter(v), table.to(k.device)


def dense_mask_bias(sel, hq, sq, skv, q_lens, kv_lens, causal):
    """bool mask [B, Hq, Sq, Skv] and float64 bias for a TokenSelection (explicit, for the dense oracle)."""
    B, hs, _ = sel.indices.shape
    sel_cpu = sa.TokenSelection(
        sel.indices.cpu(), sel.counts.cpu(), None if sel.log_weights is None else sel.log_weights.cpu()
    )
    m = sel_cpu.to_dense_mask(skv).repeat_interleave(hq // hs, dim=1)[:, :, None, :]  # [B, Hq, 1, Skv]
    i = torch.arange(sq)
    ql, kl = torch.tensor(q_lens), torch.tensor(kv_lens)
    row = i[None, :] < ql[:, None]  # [B, Sq]
    j = torch.arange(skv)
    ok = row[:, :, None] & (j[None, None, :] < kl[:, None, None])
    if causal:
        ok = ok & (j[None, None, :] <= (kl - ql)[:, None, None] + i[None, :, None])
    mask = m & ok[:, None]
    bias = torch.zeros(B, hs, skv + 1, dtype=torch.float64)
    if sel_cpu.log_weights is not None:
        used = sel_cpu.used()
        col = torch.where(used, sel_cpu.indices.long().clamp(0, skv), skv)
        bias.scatter_(2, col, torch.where(used, sel_cpu.log_weights.double(), 0.0))
    bias = bias[..., :skv].repeat_interleave(hq // hs, dim=1)[:, :, None, :]
    return mask, bias


def torch_oracle(q, k, v, sel, *, causal, q_lens, kv_lens, scale=None):
    """float64 torch token-sparse path (sparse_attn's CPU kernel) on upcast inputs."""
    dev = q.device  # (the torch path wants the selection on q's device)
    lw = None if sel.log_weights is None else sel.log_weights.to(dev)
    sel = sa.TokenSelection(sel.indices.to(dev), sel.counts.to(dev), lw)
    return sa.token_sparse_attention(
        q.double(),
        k.double(),
        v.double(),
        sel,
        causal=causal,
        q_lens=list(q_lens),
        kv_lens=list(kv_lens),
        scale=scale,
        backend="torch",
        return_lse=True,
    )


def check(out, lse, q, k, v, sel, *, causal, q_lens, kv_lens, scale=None):
    """Compare with the float64 references; low precision against twice the naive low-precision error."""
    B, hq, sq, _ = q.shape
    ref_out, ref_lse = torch_oracle(q, k, v, sel, causal=causal, q_lens=q_lens, kv_lens=kv_lens, scale=scale)
    mask, bias = dense_mask_bias(sel, hq, sq, k.shape[2], q_lens, kv_lens, causal)
    dev = q.device
    d_out, d_lse = dense_attention(
        q.double(), k.double(), v.double(), mask.to(dev), scale=scale, bias=bias.to(dev)
    )
    torch.testing.assert_close(ref_out, d_out, atol=1e-10, rtol=0)  # the two oracles agree
    assert torch.equal(torch.isneginf(ref_lse), torch.isneginf(d_lse))
    assert out.shape == (B, hq, sq, v.shape[-1]) and out.dtype == q.dtype and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any(), "unwritten (poisoned) elements"
    empty = ~mask.any(-1).to(dev)  # [B, Hq, Sq]
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "queries without keys must give 0"
    assert bool((lse[empty] == NEG_INF).all()) and bool(torch.isfinite(lse[~empty]).all())
    if q.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out, atol=3e-5, rtol=1e-5)
        torch.testing.assert_close(lse.double()[~empty], ref_lse[~empty], atol=3e-5, rtol=1e-5)
    else:
        lp_out, lp_lse = lowp_dense_attention(q, k, v, mask.to(dev), scale=scale, bias=bias.to(dev))
        valid = ~empty
        atol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[q.dtype]
        assert max_err(out, ref_out, valid) <= 2 * max_err(lp_out, ref_out, valid) + atol
        assert max_err(lse, ref_lse, valid) <= 2 * max_err(lp_lse, ref_lse, valid) + 1e-4
    return empty


def poisoned(q, dv):
    return torch.full((*q.shape[:3], dv), float("nan"), dtype=q.dtype, device=q.device)


def cache_args(k, v, paged, seed):
    if not paged:
        return k, v, {}
    kc, vc, table = to_paged(k, v, seed=seed)
    return kc, vc, {"block_table": table, "page_size": PAGE}


# ----------------------------------------------------------------------------- interpreter cases
# (Hq, Hkv, sel heads "kv"/"q"/"1", Sq, q_lens, kv_lens, D, dtype, causal, log-weights, paged, splits, k_max)
TOKEN_CASES = [
    (8, 2, "kv", 1, (1, 1), (63, 200), 64, torch.float32, True, False, False, 1, 24),
    (8, 2, "kv", 1, (1, 1), (63, 200), 64, torch.float32, True, True, True, 3, 24),
    (8, 2, "q", 3, (1, 3), (1, 63), 64, torch.float32, True, False, True, 2, 12),
    (8, 2, "q", 3, (3, 2), (200, 63), 96, torch.float32, True, True, False, 1, 20),
    (4, 4, "kv", 3, (3, 3), (63, 200), 64, torch.float32, True, True, True, 9, 20),
    (8, 2, "1", 1, (1, 1), (200, 63), 96, torch.float32, True, True, False, 2, 24),
    (8, 2, "kv", 3, (3, 3), (63, 200), 64, torch.float32, False, True, True, 4, 20),
    (8, 2, "kv", 3, (3, 3), (200, 63), 96, torch.float16, True, True, True, 3, 24),
    (8, 2, "q", 1, (1, 1), (63, 200), 64, torch.float16, True, False, False, None, 20),
    (16, 1, "kv", 5, (5, 4), (63, 200), 64, torch.float32, True, False, True, 2, 16),  # 80 rows: per q head
]


def _dt(dtype):
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def _tid(c, kind="tok"):
    hq, hkv, hs, sq, ql, kl, d, dtype, causal, lw, paged, splits, _ = c
    return (
        f"{kind}-B{len(kl)}-q{sq}-ql{'_'.join(map(str, ql))}-kv{'_'.join(map(str, kl))}-HQ{hq}-KV{hkv}-Hs{hs}-D{d}"
        f"-{_dt(dtype)}{'-causal' if causal else '-noncausal'}{'-logw' if lw else ''}"
        f"-{'paged' if paged else 'contig'}-s{splits}"
    )


def _sel_heads(name, hq, hkv):
    return {"kv": hkv, "q": hq, "1": 1}[name]


def run_token_case(c, device=DEV, seed=0):
    hq, hkv, hs_name, sq, q_lens, kv_lens, d, dtype, causal, lw, paged, splits, k_max = c
    B, skv = len(kv_lens), max(kv_lens)
    hs = _sel_heads(hs_name, hq, hkv)
    q, k, v = (
        t.to(device) for t in make_qkv(B, hq, hkv, sq, skv, d, dtype=dtype, seed=seed, kv_lens=kv_lens)
    )
    idx, cnt, lwt = make_selection(
        B,
        hs,
        kv_lens,
        k_max,
        seed=seed + 1,
        empty=((1, 0),),
        weights=lw,
        device=device,
        index_dtype=torch.int32 if seed % 2 else torch.int64,
    )
    kk, vv, extra = cache_args(k, v, paged, seed)
    out = poisoned(q, d)
    res, lse = token_decode(
        q,
        kk,
        vv,
        idx,
        cnt,
        lwt,
        torch.tensor(q_lens, device=device),
        torch.tensor(kv_lens, device=device),
        causal=causal,
        scale=None,
        num_splits=splits,
        out=out,
        **extra,
    )
    assert res is out
    sel = sa.TokenSelection(idx.cpu(), cnt.cpu(), None if lwt is None else lwt.cpu())
    empty = check(res, lse, q, k, v, sel, causal=causal, q_lens=q_lens, kv_lens=kv_lens)
    assert empty.any(), "test setup: expected some queries with no key"


@pytest.mark.parametrize("case", TOKEN_CASES, ids=[_tid(c) for c in TOKEN_CASES])
def test_token_decode_small(case):
    run_token_case(case)


# (Hq, Hkv, sel heads, Sq, q_lens, kv_lens, D, dtype, causal, block_k, paged, splits, max blocks)
BLOCK_CASES = [
    (8, 2, "kv", 1, (1, 1), (63, 200), 64, torch.float32, True, 16, False, 1, 6),
    (8, 2, "kv", 3, (3, 3), (63, 200), 64, torch.float32, True, 32, True, 3, 5),
    (8, 2, "q", 3, (1, 3), (1, 200), 96, torch.float32, True, 20, True, 2, 6),
    (4, 4, "kv", 1, (1, 1), (200, 63), 64, torch.float32, False, 128, True, 2, 2),
    (8, 2, "1", 3, (3, 3), (200, 63), 64, torch.float16, True, 16, True, 7, 4),
]


def _bid(c):
    return _tid(c, "blk").replace("-logw", "") + f"-bk{c[9]}"


def run_block_case(c, device=DEV, seed=0):
    hq, hkv, hs_name, sq, q_lens, kv_lens, d, dtype, causal, block_k, paged, splits, max_blocks = c
    B, skv = len(kv_lens), max(kv_lens)
    hs = _sel_heads(hs_name, hq, hkv)
    q, k, v = (
        t.to(device) for t in make_qkv(B, hq, hkv, sq, skv, d, dtype=dtype, seed=seed, kv_lens=kv_lens)
    )
    idx, cnt = make_blocks(B, hs, kv_lens, block_k, max_blocks, seed=seed + 2, empty=((1, 0),), device=device)
    kk, vv, extra = cache_args(k, v, paged, seed)
    out = poisoned(q, d)
    res, lse = block_decode(
        q,
        kk,
        vv,
        idx,
        cnt,
        list(q_lens),
        torch.tensor(kv_lens, device=device),
        block_k=block_k,
        causal=causal,
        scale=0.3,
        num_splits=splits,
        out=out,
        **extra,
    )
    assert res is out
    sel = blocks_to_selection(idx.cpu(), cnt.cpu(), block_k, kv_lens)
    check(res, lse, q, k, v, sel, causal=causal, q_lens=q_lens, kv_lens=kv_lens, scale=0.3)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=[_bid(c) for c in BLOCK_CASES])
def test_block_decode_small(case):
    run_block_case(case)


def test_block_list_of_every_block_is_dense_attention():
    """All key blocks listed (in reverse order) == dense causal attention; no lse requested."""
    q, k, v = (t.to(DEV) for t in make_qkv(2, 4, 2, 2, 50, 64, seed=3, kv_lens=(50, 37)))
    kv_lens = (50, 37)
    nb = 4  # block_k 16 -> 4 blocks cover 50 keys
    idx = torch.arange(nb - 1, -1, -1, dtype=torch.int32).expand(2, 2, nb).contiguous()
    idx[1, :, :3] = torch.tensor([2, 1, 0], dtype=torch.int32)  # row 1: 37 keys in 3 blocks
    idx[1, :, 3] = GARBAGE
    idx = idx.to(DEV)
    cnt = torch.tensor([[4, 4], [3, 3]], dtype=torch.int32, device=DEV)
    out = block_decode(
        q,
        k,
        v,
        idx,
        cnt,
        None,
        list(kv_lens),
        block_k=16,
        causal=True,
        scale=None,
        num_splits=2,
        return_lse=False,
    )
    i = torch.arange(2)
    mask = torch.zeros(2, 4, 2, 50, dtype=torch.bool)
    for b, kl in enumerate(kv_lens):
        mask[b, :, :, :kl] = torch.arange(kl)[None, :] <= (kl - 2 + i)[:, None]
    ref, _ = dense_attention(q, k, v, mask.to(DEV))
    torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=1e-5)


def test_token_decode_matches_torch_backend_api():
    """The same answer as the public token_sparse_attention (torch backend) in fp32, out-only call."""
    kv_lens = (40, 29)
    q, k, v = (t.to(DEV) for t in make_qkv(2, 4, 2, 1, 40, 64, seed=4, kv_lens=kv_lens))
    idx, cnt, lw = make_selection(2, 2, kv_lens, 16, seed=5, weights=True, device=DEV)
    sel = sa.TokenSelection(idx, cnt, lw)
    ref = sa.token_sparse_attention(q, k, v, sel, kv_lens=list(kv_lens), backend="torch")
    out = token_decode(q, k, v, idx, cnt, lw, None, list(kv_lens), causal=True, scale=None, return_lse=False)
    torch.testing.assert_close(out, ref, atol=3e-5, rtol=1e-5)


def test_more_splits_than_keys_and_zero_length_selection():
    """k_max 0 (nothing selected anywhere) and splits far above the key count: out 0, lse -inf."""
    q, k, v = (t.to(DEV) for t in make_qkv(1, 4, 2, 1, 20, 64, seed=6))
    idx = torch.zeros(1, 2, 0, dtype=torch.int64, device=DEV)
    cnt = torch.zeros(1, 2, dtype=torch.int32, device=DEV)
    out, lse = token_decode(
        q, k, v, idx, cnt, None, None, None, causal=True, scale=None, num_splits=5, out=poisoned(q, 64)
    )
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == NEG_INF).all())


# ----------------------------------------------------------------------------- errors
def _small(device=DEV):
    q, k, v = (t.to(device) for t in make_qkv(2, 4, 2, 1, 40, 64, seed=7))
    idx, cnt, _ = make_selection(2, 2, (40, 40), 8, seed=8, device=device)
    return q, k, v, idx, cnt


@pytest.mark.parametrize("bad", [-2, "num_pages"], ids=["negative", "num_pages"])
def test_bad_page_table_entry_raises(bad):
    q, k, v, idx, cnt = _small()
    kc, vc, table = to_paged(k, v, seed=1)
    table[1, 1] = kc.shape[0] if bad == "num_pages" else bad
    with pytest.raises(ValueError, match="block_table"):
        token_decode(
            q,
            kc,
            vc,
            idx,
            cnt,
            None,
            None,
            [40, 40],
            causal=True,
            scale=None,
            block_table=table,
            page_size=PAGE,
        )
    bidx, bcnt = make_blocks(2, 2, (40, 40), 16, 2, seed=3, device=DEV)
    with pytest.raises(ValueError, match="block_table"):
        block_decode(
            q,
            kc,
            vc,
            bidx,
            bcnt,
            None,
            [40, 40],
            block_k=16,
            causal=True,
            scale=None,
            block_table=table,
            page_size=PAGE,
        )


def test_page_table_entries_beyond_used_pages_are_ignored():
    """A row of 16 keys uses one page: garbage in its other entries is neither checked nor read."""
    q, k, v, idx, cnt = _small()
    kc, vc, table = to_paged(k, v, seed=2)
    table[0, 1:] = 10**6
    idx0 = idx.clone()
    idx0[0] = torch.where(idx0[0] < 16, idx0[0], GARBAGE)
    cnt0 = cnt.clone()
    cnt0[0] = (idx0[0] < 16).sum(-1)
    idx0[0] = idx0[0].sort(-1).values
    out, lse = token_decode(
        q,
        kc,
        vc,
        idx0,
        cnt0,
        None,
        None,
        [16, 40],
        causal=True,
        scale=None,
        block_table=table,
        page_size=PAGE,
    )
    sel = sa.TokenSelection(idx0.cpu(), cnt0.cpu())
    check(out, lse, q, k, v, sel, causal=True, q_lens=(1, 1), kv_lens=(16, 40))


def test_cpu_tensors_without_interpreter_raise(monkeypatch):
    q, k, v, idx, cnt = _small("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        token_decode(q, k, v, idx, cnt, None, None, None, causal=True, scale=None)


def test_non_contiguous_head_dim_raises():
    q, k, v, idx, cnt = _small()
    k_bad = torch.randn(2, 2, 40, 128, device=DEV)[..., ::2]
    with pytest.raises(ValueError, match=r"\bk\b"):
        token_decode(q, k_bad, v, idx, cnt, None, None, None, causal=True, scale=None)
    v_bad = torch.randn(2, 2, 40, 128, device=DEV)[..., ::2]
    with pytest.raises(ValueError, match=r"\bv\b"):
        block_decode(q, k, v_bad, idx.int(), cnt, None, None, block_k=16, causal=True, scale=None)


def test_head_dim_over_256_and_bad_lengths_raise():
    q, k, v = (t.to(DEV) for t in make_qkv(1, 2, 1, 1, 8, 320, seed=9))
    idx = torch.zeros(1, 1, 1, dtype=torch.int64, device=DEV)
    cnt = torch.ones(1, 1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match="head dim"):
        token_decode(q, k, v, idx, cnt, None, None, None, causal=True, scale=None)
    q, k, v, idx, cnt = _small()
    with pytest.raises(ValueError, match="kv_lens"):
        token_decode(q, k, v, idx, cnt, None, None, [40, 41], causal=True, scale=None)


# ----------------------------------------------------------------------------- CUDA (not collected on CPU)
if RUN_CUDA:
    CUDA_TOKEN = [
        (32, 8, "kv", 1, (1, 1, 1), (4099, 1, 12345), 128, dt, True, lw, paged, splits, 1024)
        for dt in (torch.bfloat16, torch.float16)
        for lw, paged, splits in (
            (False, False, None),
            (True, True, None),
            (False, True, 1),
            (True, False, 16),
        )
    ] + [
        (32, 8, "q", 4, (4, 2, 4), (4099, 63, 8000), 128, torch.bfloat16, True, True, True, None, 700),
        (32, 8, "kv", 4, (4, 2, 4), (4099, 63, 8000), 96, torch.bfloat16, True, False, True, 7, 700),
        (16, 16, "kv", 8, (8, 8), (300, 5000), 64, torch.float32, True, True, True, None, 900),
        (32, 8, "1", 1, (1, 1), (200, 3000), 256, torch.bfloat16, True, True, False, 3, 500),
        (64, 4, "kv", 8, (8, 3), (2000, 777), 80, torch.float16, False, False, True, None, 300),
    ]

    @pytest.mark.parametrize("case", CUDA_TOKEN, ids=[_tid(c) for c in CUDA_TOKEN])
    def test_token_decode_cuda(case):
        run_token_case(case, device="cuda", seed=11)

    CUDA_BLOCK = [
        (32, 8, "kv", 1, (1, 1, 1), (4099, 1, 12345), 128, torch.bfloat16, True, 64, paged, splits, 40)
        for paged, splits in ((False, None), (True, None), (True, 1))
    ] + [
        (32, 8, "q", 4, (4, 2), (5000, 63), 128, torch.float16, True, 128, True, None, 12),
        (16, 16, "1", 8, (8, 8), (300, 5000), 64, torch.float32, True, 16, False, 5, 30),
        (32, 8, "kv", 2, (2, 2), (2047, 900), 256, torch.bfloat16, True, 64, True, None, 10),
    ]

    @pytest.mark.parametrize("case", CUDA_BLOCK, ids=[_bid(c) for c in CUDA_BLOCK])
    def test_block_decode_cuda(case):
        run_block_case(case, device="cuda", seed=12)

    def test_cuda_graph_capture_and_no_recompile_per_length():
        """Captures in a CUDA graph (host checks skipped), and new kv_lens / k_max reuse the binary."""
        from sparse_attn.triton_kernels import sparse_decode as sd

        q, k, v = (t.cuda() for t in make_qkv(1, 8, 2, 1, 4096, 128, dtype=torch.bfloat16, seed=1))
        idx, cnt, _ = make_selection(1, 2, (4096,), 256, seed=2, device="cuda")
        kv = torch.tensor([4096], device="cuda")
        token_decode(q, k, v, idx, cnt, None, None, kv, causal=True, scale=None, num_splits=4)
        fwd = sd._kernels()[0]

        def n_compiled():  # binaries in the JIT cache (device_caches[dev][0] in Triton 3.6..3.9)
            return sum(len(entry[0]) for entry in fwd.device_caches.values())

        before = n_compiled()
        for kl, km in ((4000, 300), (3001, 129)):
            idx2, cnt2, _ = make_selection(1, 2, (kl,), km, seed=kl, device="cuda")
            token_decode(q, k, v, idx2, cnt2, None, None, [kl], causal=True, scale=None, num_splits=4)
        assert n_compiled() == before, "a new kv_len / k_max compiled a new kernel"
        out = torch.empty(1, 8, 1, 128, dtype=torch.bfloat16, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            token_decode(q, k, v, idx, cnt, None, None, kv, causal=True, scale=None, num_splits=4, out=out)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            token_decode(q, k, v, idx, cnt, None, None, kv, causal=True, scale=None, num_splits=4, out=out)
        ref = token_decode(
            q, k, v, idx, cnt, None, None, kv, causal=True, scale=None, num_splits=4, return_lse=False
        )
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, ref, atol=0, rtol=0)

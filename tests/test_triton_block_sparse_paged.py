"""The Triton block-sparse prefill kernel reading K/V through a vLLM V1 page table.

A contiguous k/v is scattered into randomly permuted pages of a cache ``[num_pages, page_size, Hkv, D]``
(pages no row references hold NaN, table entries past a row's last used page are out of range), and
the paged kernel must match the contiguous kernel exactly and the torch path within tolerance.
Runs on CPU tensors under ``TRITON_INTERPRET=1`` (small shapes), or on CUDA when the interpreter is off.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

import sparse_attn as sa

try:
    from tests.oracle import make_qkv
except ModuleNotFoundError:  # tests/ itself on sys.path
    from oracle import make_qkv  # type: ignore[no-redef]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if (not INTERPRET and torch.cuda.is_available()) else "cpu"


def _kernel():
    from sparse_attn.triton_kernels.block_sparse_fwd import block_sparse_fwd

    return block_sparse_fwd


def paginate(
    k: torch.Tensor, v: torch.Tensor, kv_lens: list[int], page_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache, block_table int32) holding k/v [B, Hkv, Skv, D] in shuffled pages.
    Each row gets the pages its kv_len needs; spare pages hold NaN and unused table slots point far
    outside the cache (the kernel must never read either)."""
    b, hkv, _, d = k.shape
    dv = v.shape[-1]
    need = [-(-kl // page_size) for kl in kv_lens]
    max_pages = max(need) + 1
    num_pages = sum(need) + 3
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g)
    kc = torch.full((num_pages, page_size, hkv, d), float("nan"), dtype=k.dtype)
    vc = torch.full((num_pages, page_size, hkv, dv), float("nan"), dtype=v.dtype)
    table = torch.full((b, max_pages), 10**6, dtype=torch.int32)
    used = 0
    for r in range(b):
        for p in range(need[r]):
            page = int(perm[used])
            used += 1
            table[r, p] = page
            lo, hi = p * page_size, min((p + 1) * page_size, k.shape[2])
            kc[page, : hi - lo] = k[r, :, lo:hi].transpose(0, 1)
            vc[page, : hi - lo] = v[r, :, lo:hi].transpose(0, 1)
    return kc, vc, table


def _plan(name: str, block: int, q_lens, kv_lens, hq: int, hkv: int) -> sa.BlockLayout:
    method = {
        "s2": lambda: sa.S2(block_size=block, local_blocks=1, vert_stride=2),
        "sinklocal": lambda: sa.SinkLocal(sink_tokens=5, window_tokens=37, block_size=block),
    }[name]()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sa.CoverageWarning)
        return method.plan(torch.tensor(q_lens), torch.tensor(kv_lens), hq, hkv, causal=True)


def _run(q, k, v, lay: sa.BlockLayout, **paged):
    b, hq, sq, _ = q.shape
    out = torch.full((b, hq, sq, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    lse = torch.full((b, hq, sq), float("nan"), dtype=torch.float32, device=q.device)
    return _kernel()(
        q, k, v, lay.kv_indices, lay.kv_counts, lay.full, lay.q_lens, lay.kv_lens,
        block_q=lay.block_q, block_k=lay.block_k, causal=lay.causal,
        sink_tokens=lay.sink_tokens, window_tokens=lay.window_tokens,
        return_lse=True, out=out, lse_out=lse, **paged,
    )  # fmt: skip


@pytest.mark.parametrize("name", ["s2", "sinklocal"])
@pytest.mark.parametrize(
    "block,page_size", [(16, 16), (32, 16), (16, 32)], ids=["B16-P16", "B32-P16", "B16-P32"]
)
@pytest.mark.parametrize("hq,hkv", [(2, 2), (4, 1)], ids=["gqa1", "gqa4"])
def test_paged_matches_contiguous_and_torch(name: str, block: int, page_size: int, hq: int, hkv: int) -> None:
    q_lens, kv_lens = [37, 20], [75, 44]  # chunked prefill: queries at the end of longer contexts
    lay = _plan(name, block, q_lens, kv_lens, hq, hkv)
    q, k, v = make_qkv(2, hq, hkv, max(q_lens), max(kv_lens), 32, q_lens=q_lens, kv_lens=kv_lens)
    kc, vc, table = paginate(k, v, kv_lens, page_size, seed=block + page_size + hq)
    q, k, v, kc, vc, table = (t.to(DEVICE) for t in (q, k, v, kc, vc, table))

    out, lse = _run(q, kc, vc, lay, block_table=table, page_size=page_size)
    ref_out, ref_lse = _run(q, k, v, lay)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), "unwritten or NaN outputs"
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)

    t_out, t_lse = sa.block_sparse_attention(q.cpu(), k.cpu(), v.cpu(), lay, backend="torch", return_lse=True)
    torch.testing.assert_close(out.cpu(), t_out, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), t_lse, atol=1e-5, rtol=1e-5)


def _paged_inputs(page_size: int = 16):
    q_lens, kv_lens = [20, 9], [40, 30]
    lay = _plan("s2", 16, q_lens, kv_lens, 2, 1)
    q, k, v = make_qkv(2, 2, 1, max(q_lens), max(kv_lens), 32, q_lens=q_lens, kv_lens=kv_lens)
    kc, vc, table = paginate(k, v, kv_lens, page_size)
    return lay, *(t.to(DEVICE) for t in (q, kc, vc, table))


@pytest.mark.parametrize("entry", [-1, "num_pages"])
def test_page_out_of_range_raises(entry) -> None:
    lay, q, kc, vc, table = _paged_inputs()
    table[1, 1] = kc.shape[0] if entry == "num_pages" else entry  # row 1 uses pages 0 and 1
    with pytest.raises(ValueError, match="block_table"):
        _run(q, kc, vc, lay, block_table=table, page_size=16)


def test_bad_paging_arguments_raise() -> None:
    lay, q, kc, vc, table = _paged_inputs()
    with pytest.raises(ValueError, match="page_size"):
        _run(q, kc, vc, lay, block_table=table, page_size=32)  # not the cache's page size
    for bad in (0, -16, True, 16.0):
        with pytest.raises(ValueError, match="page_size"):
            _run(q, kc, vc, lay, block_table=table, page_size=bad)
    with pytest.raises(ValueError, match="page_size is required"):
        _run(q, kc, vc, lay, block_table=table)
    with pytest.raises(ValueError, match="block_table"):
        _run(q, kc, vc, lay, block_table=table[:1], page_size=16)  # wrong batch
    with pytest.raises(ValueError, match="block_table"):
        _run(q, kc, vc, lay, block_table=table.float(), page_size=16)
    with pytest.raises(ValueError, match="exceed"):
        _run(q, kc, vc, lay, block_table=table[:, :1], page_size=16)  # 16 keys < kv_len 40
    # pages that are neither whole blocks nor inside one block
    kc24 = torch.zeros(8, 24, *kc.shape[2:], dtype=kc.dtype, device=kc.device)
    with pytest.raises(ValueError, match="multiple of page_size"):
        _run(q, kc24, kc24, lay, block_table=table.clamp(0, 7), page_size=24)
    # page_size without block_table, with contiguous k/v
    _, k, v = make_qkv(2, 2, 1, 20, 40, 32)
    with pytest.raises(ValueError, match="only valid together with block_table"):
        _run(q, k.to(DEVICE), v.to(DEVICE), lay, page_size=16)

"""The Triton collision-count kernel (MagicPIG) against the torch function it replaces and a brute
force, and MagicPIG's selection with ``backend="triton"`` against ``backend="torch"``. On CPU the
kernel runs under TRITON_INTERPRET=1 (set by conftest) on small shapes."""

from __future__ import annotations

import os

import pytest
import torch

import sparse_attn as sa
from sparse_attn.methods import magicpig as mp
from tests.oracle import make_qkv

triton = pytest.importorskip("triton")
from sparse_attn.triton_kernels.simhash import collision_counts  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


@pytest.mark.parametrize(
    "B,Hkv,G,N,L,dtype",
    [
        pytest.param(1, 1, 1, 1, 2, torch.int16, id="B1-H1-G1-N1-L2"),
        pytest.param(2, 2, 3, 77, 150, torch.int16, id="B2-H2-G3-N77-L150"),
        pytest.param(1, 3, 2, 130, 7, torch.int32, id="B1-H3-G2-N130-L7-int32"),
    ],
)
def test_counts_equal_the_torch_function_and_brute_force(B, Hkv, G, N, L, dtype) -> None:
    g = torch.Generator().manual_seed(N + L)
    # few distinct codes, so that counts spread over 0..L; one key equals a query everywhere
    codes_k = torch.randint(-2, 2, (B, Hkv, N, L), generator=g).to(dtype)
    codes_q = torch.randint(-2, 2, (B, Hkv, G, L), generator=g).to(dtype)
    codes_q[:, :, 0] = codes_k[:, :, N // 2]
    got = collision_counts(codes_q.to(DEV), codes_k.to(DEV)).cpu()
    brute = torch.zeros(B, Hkv, G, N, dtype=torch.int64)
    for t in range(L):
        brute += codes_k[:, :, None, :, t] == codes_q[:, :, :, None, t]
    assert got.dtype == torch.int32 and torch.equal(got.long(), brute)
    assert torch.equal(mp.collision_counts(codes_q, codes_k).long(), brute)
    assert int(brute.max()) == L


def test_a_view_of_a_larger_store_is_read_through_its_strides() -> None:
    g = torch.Generator().manual_seed(0)
    store = torch.randint(0, 3, (2, 2, 100, 9), generator=g, dtype=torch.int16)
    codes_q = torch.randint(0, 3, (2, 2, 2, 9), generator=g, dtype=torch.int16)
    view = store[:, :, :61]
    got = collision_counts(codes_q.to(DEV), view.to(DEV)).cpu()
    assert torch.equal(got.long(), mp.collision_counts(codes_q, view.contiguous()).long())


def test_bad_inputs_raise_value_error_naming_the_argument() -> None:
    q = torch.zeros(1, 1, 1, 4, dtype=torch.int16)
    k = torch.zeros(1, 1, 5, 4, dtype=torch.int16)
    with pytest.raises(ValueError, match="codes_k"):
        collision_counts(q, k.int())
    with pytest.raises(ValueError, match="codes_q"):
        collision_counts(q.float(), k)
    with pytest.raises(ValueError, match="codes_k"):
        collision_counts(q, k[..., :3])


@pytest.mark.parametrize("kv_lens", [(95,), (120, 57)], ids=["B1", "B2-pad"])
def test_magicpig_selects_the_same_keys_with_the_kernel(kv_lens, monkeypatch) -> None:
    from sparse_attn.triton_kernels import simhash

    calls = []
    monkeypatch.setattr(
        simhash, "collision_counts", lambda *a, **kw: calls.append(1) or collision_counts(*a, **kw)
    )
    method = sa.MagicPIG(bits=4, tables=10, seed=2, sink_tokens=2, local_tokens=5)
    q, k, v = make_qkv(len(kv_lens), 4, 2, 1, max(kv_lens), 32, kv_lens=kv_lens, seed=1)
    q, k, v = q.to(DEV), k.to(DEV), v.to(DEV)
    ref = sa.select(method, q, k, kv_lens=list(kv_lens), backend="torch")
    got = sa.select(method, q, k, kv_lens=list(kv_lens), backend="triton")
    assert torch.equal(got.counts.cpu(), ref.counts.cpu()) and torch.equal(
        got.indices.cpu(), ref.indices.cpu()
    )
    assert torch.equal(got.log_weights.cpu(), ref.log_weights.cpu())
    assert calls == [1]  # the kernel counted, once per selection

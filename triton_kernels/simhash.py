"""MagicPIG's collision count: in how many of L hash tables each key's packed SimHash code equals the
query's.

Public function:

- ``collision_counts``: codes_q ``[B, Hkv, G, L]`` and codes_k ``[B, Hkv, N, L]`` (int16 or int32,
  one packed code per table) -> ``[B, Hkv, G, N]`` int32 with the number of tables ``t`` where
  ``codes_k[b, h, n, t] == codes_q[b, h, g, t]``. The pure-torch reference is
  ``sparse_attn.methods.magicpig.collision_counts``.

Execution: a 1-D grid of ``key tiles x (B * Hkv * G)`` programs (key tiles vary fastest, so a long
context never hits CUDA's 65535 limit on grid dims 1 and 2). A program loads its query's L codes once
(padded to a power of two, masked), then a ``[BLOCK_N, BLOCK_L]`` tile of key codes, compares and
sums along the tables: integer work only, no dot product, so the interpreter computes what the GPU
does. Keys at or past N are never loaded.

Tested only under ``TRITON_INTERPRET=1`` (against the torch function and a brute force); no GPU was
available when it was written, so it is neither benchmarked nor tuned.

This module imports nothing else of sparse_attn. The kernel is jitted lazily, once per mode
(``TRITON_INTERPRET == "1"`` read at call time).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_decode import _interpreting, _next_pow2

__all__ = ["collision_counts", "collision_counts_fwd_kernel"]

MAX_TABLES = 4096
_DTYPES = (torch.int16, torch.int32)


def collision_counts_fwd_kernel(
    CQ,  # [B, Hkv, G, L]
    CK,  # [B, Hkv, N, L]
    OUT,  # [B, Hkv, G, N] int32
    stride_qb,
    stride_qh,
    stride_qg,
    stride_ql,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kl,
    stride_ob,
    stride_oh,
    stride_og,
    stride_on,
    HKV,
    G,
    N,
    L,
    N_TILES,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % N_TILES
    rest = pid // N_TILES
    g = rest % G
    bh = rest // G
    b = bh // HKV
    h = bh % HKV

    t = tl.arange(0, BLOCK_L)  # [BLOCK_L]
    t_ok = t < L
    cq = tl.load(CQ + b * stride_qb + h * stride_qh + g * stride_qg + t * stride_ql, mask=t_ok, other=0)
    n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] int64
    n_ok = n < N
    ck = tl.load(
        CK + b * stride_kb + h * stride_kh + n[:, None] * stride_kn + t[None, :] * stride_kl,
        mask=n_ok[:, None] & t_ok[None, :],
        other=0,
    )  # [BLOCK_N, BLOCK_L]
    # padded tables compare 0 with 0: masked out, so they never count
    hit = (ck == cq[None, :]) & t_ok[None, :]
    count = tl.sum(hit.to(tl.int32), axis=1)  # [BLOCK_N]
    tl.store(OUT + b * stride_ob + h * stride_oh + g * stride_og + n * stride_on, count, mask=n_ok)


_JIT_CACHE: dict[bool, object] = {}


def _kernel():
    mode = _interpreting()
    kernel = _JIT_CACHE.get(mode)
    if kernel is None:
        # the key count and the strides that grow with it change every step: never specialise on them
        kernel = _JIT_CACHE[mode] = triton.jit(
            collision_counts_fwd_kernel,
            do_not_specialize=[
                "stride_kb",
                "stride_kh",
                "stride_ob",
                "stride_oh",
                "stride_og",
                "N",
                "N_TILES",
            ],
        )
    return kernel


def collision_counts(
    codes_q: torch.Tensor,  # [B, Hkv, G, L]
    codes_k: torch.Tensor,  # [B, Hkv, N, L]
    *,
    out: torch.Tensor | None = None,  # [B, Hkv, G, N] int32, written completely
    block_n: int = 64,
) -> torch.Tensor:
    """Tables in which each query's code equals each key's: ``[B, Hkv, G, N]`` int32."""
    for name, t, what in (("codes_q", codes_q, "[B, Hkv, G, L]"), ("codes_k", codes_k, "[B, Hkv, N, L]")):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor {what}, got {getattr(t, 'shape', type(t))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} must be int16 or int32 packed codes, got {t.dtype}")
    if codes_k.dtype != codes_q.dtype:
        raise ValueError(f"codes_k has dtype {codes_k.dtype}, codes_q has {codes_q.dtype}")
    if codes_k.device != codes_q.device:
        raise ValueError(f"codes_k is on {codes_k.device}, codes_q on {codes_q.device}")
    b, hkv, g, n_tables = codes_q.shape
    if codes_k.shape[0] != b or codes_k.shape[1] != hkv or codes_k.shape[3] != n_tables:
        raise ValueError(f"codes_k must be [B={b}, Hkv={hkv}, N, L={n_tables}], got {tuple(codes_k.shape)}")
    if n_tables > MAX_TABLES:
        raise ValueError(f"at most {MAX_TABLES} tables, got {n_tables}")
    n = codes_k.shape[2]
    shape = (b, hkv, g, n)
    if out is None:
        out = torch.empty(shape, dtype=torch.int32, device=codes_k.device)
    elif tuple(out.shape) != shape or out.dtype != torch.int32 or out.device != codes_k.device:
        raise ValueError(f"out must be an int32 tensor of shape {shape} on {codes_k.device}")
    if out.numel() == 0:
        return out
    n_tiles = -(-n // block_n)
    _kernel()[(n_tiles * b * hkv * g,)](
        codes_q,
        codes_k,
        out,
        *codes_q.stride(),
        *codes_k.stride(),
        *out.stride(),
        hkv,
        g,
        n,
        n_tables,
        n_tiles,
        BLOCK_N=block_n,
        BLOCK_L=max(16, _next_pow2(n_tables)),
        num_warps=4 if n_tables > 128 else 2,
    )
    return out

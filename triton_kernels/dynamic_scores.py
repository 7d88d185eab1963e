"""Scoring kernels of the dynamic (content-based) methods: TopK's exact logits over a contiguous or
paged K cache, and Quest's per-block upper bounds from key min/max side data.

Public functions:

- ``topk_scores``: scaled logits ``q.k * scale`` of every (group query row, key), -inf where the pair
  is not allowed (key at or past ``kv_lens[b]``, padding query ``i >= q_lens[b]``, or, causal, a key
  after the query's position ``kv_lens[b] - q_lens[b] + i``) -> ``[B, Hkv, G*Sq, N]`` float32. The
  pure-torch reference is ``sparse_attn.methods.topk.exact_scores``.
- ``quest_bounds``: ``sum_d max(q_d * min_d, q_d * max_d) * scale`` per (group query row, key block)
  -> ``[B, Hkv, G*Sq, nb]`` float32, no masking (the selector masks). Reference:
  ``sparse_attn.methods.quest.block_bounds``.

Group rows are ordered as ``q.reshape(B, Hkv, G*Sq, D)``: row ``r`` of KV head ``h`` is query head
``h*G + r // Sq``, query ``r % Sq`` (G = Hq / Hkv). The GQA aggregation (``group_log_mass``: softmax
per row, log-sum over the group) stays in torch: for decode the score matrix is ``G*Sq`` fp32 values
per key, fewer bytes than the key row the kernel reads (``G*Sq*4 < D*2`` for usual shapes), so fusing
it would save little and cost a second pass over K (each row's normaliser needs every key first).

Execution: a 1-D grid of ``key tiles x row tiles x (B * Hkv)`` programs (the key tiles vary fastest,
so a long context never hits CUDA's 65535 limit on grid dims 1 and 2). A program loads its rows of
the group's queries once ``[BLOCK_R, BLOCK_D]`` (head dims padded to a power of two, masked), gathers
``BLOCK_N`` keys (paged: through the block table) or side-data blocks and computes the tile with
``tl.dot``: 16-bit inputs multiply exactly into fp32 accumulators; fp32 inputs use ``ieee`` precision
(no tf32), so the ranking matches the torch path's fp32 matmul. Quest's bound is two dots,
``relu(q) . max + min(q, 0) . min``, which equals the elementwise max because ``min <= max``.

Memory safety does not depend on validated metadata: keys at or past ``min(kv_len, capacity)`` are
never loaded and masked block-table lanes load nothing. The public functions additionally validate
lengths and page tables on the host (one device sync, skipped during CUDA graph capture) and raise
ValueError naming the argument.

Tested only under ``TRITON_INTERPRET=1`` (against the torch functions and a float64 brute force); no
GPU was available when these kernels were written, so they are neither benchmarked nor tuned: the
tile sizes below are the decode kernel's defaults, not measurements.

This module imports nothing else of sparse_attn. Kernels are jitted lazily, once per mode
(``TRITON_INTERPRET == "1"`` read at call time), so the interpreter and the GPU backend can each be
used from one process.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .sparse_decode import IntsLike, _capturing, _check_device, _interpreting, _lengths, _next_pow2

__all__ = ["MAX_HEAD_DIM", "quest_bounds", "quest_bounds_fwd_kernel", "topk_scores", "topk_scores_fwd_kernel"]

MAX_HEAD_DIM = 256
MAX_ROWS_PER_PROGRAM = 64  # G * Sq above this: several row tiles per (b, kv head)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# launch overrides for tuning experiments (None: the built-in choice)
TUNING: dict[str, int | None] = {"block_n": None, "num_warps": None}



# ----------------------------------------------------------------------------------------------
# kernels (plain functions, jitted lazily by _kernels(), so both modes can coexist in one process)


def topk_scores_fwd_kernel(
    Q,  # [B, Hq, Sq, D]
    K,  # contiguous [B, Hkv, Skv, D] or paged [num_pages, page_size, Hkv, D]
    BT,  # [B, max_pages] block table (PAGED) or a dummy
    QLEN,  # [B] int32
    KVLEN,  # [B] int32
    OUT,  # [B, Hkv, G*Sq, N] fp32
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,  # contiguous: batch/head/token; paged: page/head/slot
    stride_kd,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_or,
    stride_on,
    HKV,
    SQ,
    D,
    ROWS,  # G * Sq
    N,  # keys per output row
    CAP,  # keys a row can hold: Skv (contiguous) or max_pages * page_size (paged)
    PAGE_SIZE,
    N_TILES,  # key tiles per output row
    ROW_TILES,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % N_TILES
    rest = pid // N_TILES
    rt = rest % ROW_TILES
    bh = rest // ROW_TILES  # b * HKV + kv head
    b = bh // HKV
    kvh = bh % HKV

    q_len = tl.load(QLEN + b)
    kv_len = tl.minimum(tl.load(KVLEN + b), CAP)

    # ---- rows r -> (q head, query index i)
    r = rt * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_in = r < ROWS
    qh = kvh * (ROWS // SQ) + r // SQ
    qi = r % SQ
    d = tl.arange(0, BLOCK_D)
    d_ok = d[None, :] < D
    q = tl.load(
        Q + b * stride_qb + qh[:, None] * stride_qh + qi[:, None] * stride_qs + d[None, :] * stride_qd,
        mask=row_in[:, None] & d_ok,
        other=0.0,
    )  # [BLOCK_R, BLOCK_D]

    # ---- keys j of this tile
    j = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] int64
    key_ok = j < kv_len
    if PAGED:
        page = tl.load(BT + b * stride_btb + j // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
        k_row = page * stride_kb + (j % PAGE_SIZE) * stride_ks
    else:
        k_row = b * stride_kb + j * stride_ks
    k = tl.load(
        K + kvh * stride_kh + k_row[:, None] + d[None, :] * stride_kd,
        mask=key_ok[:, None] & d_ok,
        other=0.0,
    )  # [BLOCK_N, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)
        k = k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_R, BLOCK_N]

    allowed = (row_in & (qi < q_len))[:, None] & key_ok[None, :]
    if CAUSAL:
        allowed = allowed & (j[None, :] <= (kv_len - q_len + qi)[:, None])
    s = tl.where(allowed, s, float("-inf"))
    o_ptrs = OUT + b * stride_ob + kvh * stride_oh + r[:, None] * stride_or + j[None, :] * stride_on
    tl.store(o_ptrs, s, mask=row_in[:, None] & (j[None, :] < N))


def quest_bounds_fwd_kernel(
    Q,  # [B, Hq, Sq, D]
    S,  # [B, Hkv, nb, 2, D] (index 0 min, 1 max)
    OUT,  # [B, Hkv, G*Sq, nb] fp32
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_sb,
    stride_sh,
    stride_sn,
    stride_sm,
    stride_sd,
    stride_ob,
    stride_oh,
    stride_or,
    stride_on,
    HKV,
    SQ,
    D,
    ROWS,  # G * Sq
    NB,  # key blocks
    N_TILES,  # block tiles per output row
    ROW_TILES,
    scale,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % N_TILES
    rest = pid // N_TILES
    rt = rest % ROW_TILES
    bh = rest // ROW_TILES
    b = bh // HKV
    kvh = bh % HKV

    r = rt * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R]
    row_in = r < ROWS
    qh = kvh * (ROWS // SQ) + r // SQ
    qi = r % SQ
    d = tl.arange(0, BLOCK_D)
    d_ok = d[None, :] < D
    q = tl.load(
        Q + b * stride_qb + qh[:, None] * stride_qh + qi[:, None] * stride_qs + d[None, :] * stride_qd,
        mask=row_in[:, None] & d_ok,
        other=0.0,
    )  # [BLOCK_R, BLOCK_D]

    blk = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] int64
    blk_ok = blk < NB
    base = S + b * stride_sb + kvh * stride_sh + blk[:, None] * stride_sn + d[None, :] * stride_sd
    lo = tl.load(base, mask=blk_ok[:, None] & d_ok, other=0.0)  # [BLOCK_N, BLOCK_D]
    hi = tl.load(base + stride_sm, mask=blk_ok[:, None] & d_ok, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
    # max(q*lo, q*hi) = q*hi where q >= 0 and q*lo where q < 0, since lo <= hi; the split halves are
    # exact in the input dtype (a zeroed lane contributes 0), so each dot is an exact-product fp32 sum
    zero = tl.zeros_like(q)
    q_pos = tl.maximum(q, zero)
    q_neg = tl.minimum(q, zero)
    s = tl.dot(q_pos, tl.trans(hi), input_precision=PRECISION)
    s = s + tl.dot(q_neg, tl.trans(lo), input_precision=PRECISION)  # [BLOCK_R, BLOCK_N]
    s = s * scale
    o_ptrs = OUT + b * stride_ob + kvh * stride_oh + r[:, None] * stride_or + blk[None, :] * stride_on
    tl.store(o_ptrs, s, mask=row_in[:, None] & blk_ok[None, :])


# ----------------------------------------------------------------------------------------------
# host side

_JIT_CACHE: dict[bool, tuple] = {}


def _kernels() -> tuple:
    """(TopK scores kernel, Quest bounds kernel), jitted for the current mode (GPU or interpreter)."""
    mode = _interpreting()
    kernels = _JIT_CACHE.get(mode)
    if kernels is None:
        # lengths and the output / block-table strides change with the sequence length: never
        # specialise on them (the q/k strides are multiples of D and keep their alignment hints)
        scores = triton.jit(
            topk_scores_fwd_kernel,
            do_not_specialize=[
                "stride_btb",
                "stride_ob",
                "stride_oh",
                "stride_or",
                "N",
                "CAP",
                "N_TILES",
            ],
        )
        bounds = triton.jit(
            quest_bounds_fwd_kernel,
            do_not_specialize=[
                "stride_sb",
                "stride_sh",
                "stride_ob",
                "stride_oh",
                "stride_or",
                "NB",
                "N_TILES",
            ],
        )
        kernels = _JIT_CACHE[mode] = (scores, bounds)
    return kernels


def _check_tensor(name: str, t: object, dims: int, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        raise ValueError(f"{name} must be a {dims}-D tensor {what}, got {getattr(t, 'shape', type(t))}")
    return t


def _check_dtype(q: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if q.dtype not in _DTYPES:
        raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
    if t.dtype != q.dtype:
        raise ValueError(f"{name} has dtype {t.dtype}, q has {q.dtype}")


def _validate(
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    sq: int,
    cap: int,
    causal: bool,
    block_table: torch.Tensor | None,
    page_size: int,
    num_pages: int,
) -> None:
    """0 <= kv_lens <= capacity, 0 <= q_lens <= Sq (<= kv_lens when causal) and, paged, every page a
    row uses inside [0, num_pages). One host sync; skipped during CUDA graph capture (the kernel still
    never reads outside the cache: it clamps kv_len to the capacity)."""
    if q_lens.numel() == 0 or _capturing(q_lens.device):
        return
    ql, kl = q_lens.long(), kv_lens.long()
    bad = (kl < 0) | (kl > cap) | (ql < 0) | (ql > sq)
    if causal:
        bad = bad | (ql > kl)
    checks = [bad.any()]
    if block_table is not None:
        need = (kl.clamp(0, cap) + page_size - 1) // page_size  # [B] pages used
        used = torch.arange(block_table.shape[1], device=block_table.device)[None, :] < need[:, None]
        checks.append((used & ((block_table < 0) | (block_table >= num_pages))).any())
    flags = torch.stack(checks).cpu().tolist()
    if flags[0]:
        raise ValueError(
            f"lengths out of range: need 0 <= kv_lens <= {cap} (cache capacity), 0 <= q_lens <= Sq={sq}"
            f"{' and q_lens <= kv_lens (causal)' if causal else ''}; got q_lens={ql.tolist()}, "
            f"kv_lens={kl.tolist()}"
        )
    if block_table is not None and flags[1]:
        raise ValueError(
            f"block_table has entries outside [0, num_pages={num_pages}) in pages that kv_lens use"
        )


def _tiles(rows: int, n: int, block_n: int) -> tuple[int, int, int]:
    """(BLOCK_R, row tiles, key tiles) for ``rows`` group rows and ``n`` keys or blocks."""
    block_r = max(16, _next_pow2(min(rows, MAX_ROWS_PER_PROGRAM)))
    return block_r, -(-rows // block_r), -(-n // block_n)


def _precision(interp: bool, dtype: torch.dtype) -> str:
    # tf32 would perturb fp32 scores (and the ranking) beyond the torch path's fp32 matmul
    return "ieee" if (interp or dtype == torch.float32) else "tf32"


def topk_scores(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D] or paged key_cache [num_pages, page_size, Hkv, D]
    q_lens: IntsLike,  # [B] (None: min(Sq, kv_lens))
    kv_lens: IntsLike,  # [B] (None: Skv; required when paged)
    *,
    causal: bool,
    scale: float | None,
    block_table: torch.Tensor | None = None,  # [B, max_pages] int32/int64
    page_size: int | None = None,
    num_keys: int | None = None,
    out: torch.Tensor | None = None,  # [B, Hkv, G*Sq, N] fp32, written completely
    check_inputs: bool = True,
) -> torch.Tensor:
    """Scaled logits of every (group query row, key): ``[B, Hkv, G*Sq, N]`` float32.

    ``out[b, h, r, j] = q[b, h*G + r // Sq, r % Sq] . key_j * scale`` where the pair is allowed, -inf
    elsewhere: ``j >= kv_lens[b]``, a padding query ``r % Sq >= q_lens[b]``, or (causal) ``j`` after the
    query's position ``kv_lens[b] - q_lens[b] + r % Sq``. Contiguous k: N = Skv. Paged: pass
    ``key_cache`` as k with ``block_table`` and ``page_size`` (key j of row b at page
    ``block_table[b, j // page_size]``, slot ``j % page_size``); N = ``num_keys`` (default the table's
    capacity ``max_pages * page_size``). ``check_inputs`` validates lengths and the page table on the
    host (one device sync); the kernel never reads outside the cache either way.
    """
    q = _check_tensor("q", q, 4, "[B, Hq, Sq, D]")
    k = _check_tensor("k", k, 4, "[B, Hkv, Skv, D] or [num_pages, page_size, Hkv, D]")
    _check_dtype(q, "k", k)
    _check_device(q, {"k": k, "block_table": block_table, "out": out}, "scoring")
    B, HQ, SQ, D = q.shape
    paged = block_table is not None
    if paged:
        if page_size is None:
            raise ValueError("page_size is required with block_table")
        num_pages, ps, hkv, dk = k.shape
        if int(page_size) != ps:
            raise ValueError(
                f"paged k must be [num_pages, page_size={page_size}, Hkv, D], got {tuple(k.shape)}"
            )
        block_table = _check_tensor("block_table", block_table, 2, f"[B={B}, max_pages]")
        if block_table.shape[0] != B:
            raise ValueError(
                f"block_table must have shape [B={B}, max_pages], got {tuple(block_table.shape)}"
            )
        if block_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_table must be int32/int64, got {block_table.dtype}")
        block_table = block_table.contiguous()
        cap = int(block_table.shape[1]) * ps
        k_strides = (k.stride(0), k.stride(2), k.stride(1), k.stride(3))  # page, head, slot, dim
        if kv_lens is None:
            raise ValueError("kv_lens is required with a paged cache")
        n = cap if num_keys is None else int(num_keys)
        if not 0 <= n <= cap:
            raise ValueError(f"num_keys must be in [0, {cap}] (the block table's capacity), got {num_keys}")
    else:
        if page_size is not None or num_keys is not None:
            raise ValueError("page_size and num_keys are only valid together with block_table")
        bk, hkv, cap, dk = k.shape
        if bk != B:
            raise ValueError(f"k must be [B={B}, Hkv, Skv, D], got {tuple(k.shape)}")
        num_pages, ps, n = 0, 1, cap
        k_strides = (k.stride(0), k.stride(1), k.stride(2), k.stride(3))  # batch, head, token, dim
    if dk != D:
        raise ValueError(f"q has head dim {D}, k has {dk}")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be <= {MAX_HEAD_DIM}, got {D}")
    if hkv == 0 or HQ % hkv:
        raise ValueError(f"Hq={HQ} must be a multiple of Hkv={hkv}")
    rows = (HQ // hkv) * SQ
    dev = q.device
    kvl = _lengths("kv_lens", kv_lens, B, cap, dev)
    ql = torch.clamp(kvl, max=SQ) if q_lens is None else _lengths("q_lens", q_lens, B, SQ, dev)
    shape = (B, hkv, rows, n)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=dev)
    elif tuple(out.shape) != shape or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    if check_inputs:
        _validate(ql, kvl, SQ, cap, causal, block_table, ps, num_pages)
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    interp = _interpreting()
    block_n = TUNING["block_n"] or 64
    block_r, row_tiles, n_tiles = _tiles(rows, n, block_n)
    block_d = max(16, _next_pow2(D))
    kern, _ = _kernels()
    bt = block_table if paged else kvl  # a dummy pointer when contiguous (never read)
    kern[(n_tiles * row_tiles * B * hkv,)](
        q,
        k,
        bt,
        ql,
        kvl,
        out,
        *q.stride(),
        *k_strides,
        bt.stride(0),
        *out.stride(),
        hkv,
        SQ,
        D,
        rows,
        n,
        cap,
        ps,
        n_tiles,
        row_tiles,
        scale,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PAGED=paged,
        CAUSAL=bool(causal),
        DOT_FP32=interp,
        PRECISION=_precision(interp, q.dtype),
        num_warps=TUNING["num_warps"] or (4 if block_d > 128 or block_r > 32 else 2),
    )
    return out


def quest_bounds(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    side: torch.Tensor,  # [B, Hkv, nb, 2, D] block min (index 0) and max (index 1) of the keys
    scale: float | None,
    *,
    out: torch.Tensor | None = None,  # [B, Hkv, G*Sq, nb] fp32, written completely
) -> torch.Tensor:
    """Quest's upper bounds, scaled: ``[B, Hkv, G*Sq, nb]`` float32 with
    ``out[b, h, r, n] = sum_d max(q_d * min_d, q_d * max_d) * scale`` for the query
    ``q[b, h*G + r // Sq, r % Sq]`` and block ``n``'s ``side[b, h, n]`` (``min <= max`` elementwise,
    as side data built from keys is). Every (row, block) is scored: masking is the caller's."""
    q = _check_tensor("q", q, 4, "[B, Hq, Sq, D]")
    side = _check_tensor("side", side, 5, "[B, Hkv, nb, 2, D]")
    _check_dtype(q, "side", side)
    _check_device(q, {"side": side, "out": out}, "scoring")
    B, HQ, SQ, D = q.shape
    if side.shape[0] != B or side.shape[3] != 2 or side.shape[4] != D:
        raise ValueError(f"side must be [B={B}, Hkv, nb, 2, D={D}], got {tuple(side.shape)}")
    hkv, nb = side.shape[1], side.shape[2]
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head dim must be <= {MAX_HEAD_DIM}, got {D}")
    if hkv == 0 or HQ % hkv:
        raise ValueError(f"Hq={HQ} must be a multiple of side's Hkv={hkv}")
    rows = (HQ // hkv) * SQ
    shape = (B, hkv, rows, nb)
    if out is None:
        out = torch.empty(shape, dtype=torch.float32, device=q.device)
    elif tuple(out.shape) != shape or out.dtype != torch.float32:
        raise ValueError(f"out must be a float32 tensor of shape {shape}, got {out.dtype} {tuple(out.shape)}")
    if out.numel() == 0:
        return out
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    interp = _interpreting()
    block_n = TUNING["block_n"] or 64
    block_r, row_tiles, n_tiles = _tiles(rows, nb, block_n)
    block_d = max(16, _next_pow2(D))
    _, kern = _kernels()
    kern[(n_tiles * row_tiles * B * hkv,)](
        q,
        side,
        out,
        *q.stride(),
        *side.stride(),
        *out.stride(),
        hkv,
        SQ,
        D,
        rows,
        nb,
        n_tiles,
        row_tiles,
        scale,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        DOT_FP32=interp,
        PRECISION=_precision(interp, q.dtype),
        num_warps=TUNING["num_warps"] or (4 if block_d > 128 or block_r > 32 else 2),
    )
    return out

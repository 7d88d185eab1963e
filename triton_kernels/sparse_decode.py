"""Sparse decode kernels: split-K attention of a few query tokens over a TokenSelection or over
per-head key-block lists, on a contiguous or a paged (vLLM V1 layout) KV cache.

Public functions:

- ``token_decode``: each query attends to its head's selected keys ``indices [B, Hs, K]`` (first
  ``counts`` entries), with optional per-key log-weights added to the scaled logits.
- ``block_decode``: each query attends to the keys of its head's key blocks ``kv_indices [B, H, MK]``
  (first ``kv_counts`` entries, block size ``block_k``) — what static patterns compile to for decode.

Both take q ``[B, Hq, Sq, D]`` with small Sq (decode / speculative steps), right-padded lengths
``q_lens [B]`` / ``kv_lens [B]``, bottom-right causal alignment (query i of row b sits at key position
``kv_lens[b] - q_lens[b] + i``), and either contiguous k/v ``[B, Hkv, Skv, D]`` or vLLM's paged cache
``key_cache/value_cache [num_pages, page_size, Hkv, D]`` with ``block_table [B, max_pages]``.

Execution: grid ``(num_splits, B * units)``. A unit is one KV head with its whole GQA group
(``group * Sq`` query rows stacked, so every selected K/V row is read once per KV head) when the
selection is shared by the group (Hs = 1 or Hkv), or one query head when Hs = Hq. Each program runs
an online softmax over its slice of the unit's selection (tiles of ``BLOCK_N`` keys gathered by
index; QK^T and PV as ``tl.dot`` with the query rows padded to 16) and, with several splits, writes
its partial (acc, running max, running sum) into fp32 workspaces; ``_decode_reduce_kernel`` then
combines the splits exactly (log-sum-exp) and writes out/lse. With one split the main kernel writes
out/lse itself (one launch).

Memory safety does not depend on validated metadata: keys outside ``[0, min(kv_len, capacity))``
are dropped, counts are clamped to the list length, and every masked lane loads nothing. The
public functions additionally validate lengths and page tables on the host (one device sync, skipped
while a CUDA graph is being captured) and raise ValueError.

This module imports nothing else of sparse_attn. triton is imported here, on first use of the module;
kernels are jitted lazily, once per mode (``TRITON_INTERPRET == "1"`` read at call time), so the
interpreter and the GPU backend can each be used from one process.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

__all__ = ["block_decode", "default_num_splits", "token_decode"]

MAX_HEAD_DIM = 256
MAX_ROWS_PER_PROGRAM = 64  # group * Sq above this: one program per query head instead
MAX_SPLITS = 128
MIN_TILES_PER_SPLIT = 4
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

IntsLike = torch.Tensor | Sequence[int] | int | None


# ----------------------------------------------------------------------------------------------
# kernels (plain functions, jitted lazily by _kernels(); no jit helpers so both modes can coexist)


def _sparse_decode_fwd_kernel(
    # tensors
    Q,  # [B, Hq, Sq, D]
    K,  # contiguous [B, Hkv, Skv, D] or paged [num_pages, page_size, Hkv, D]
    V,  # like K, last dim Dv
    SEL,  # token mode: indices [B, Hs, MK]; block mode: kv_indices [B, Hs, MK]
    CNT,  # [B, Hs] number of used entries of SEL
    LW,  # [B, Hs, MK] fp32 log-weights (token mode, HAS_LW) or a dummy
    QLEN,  # [B] int32
    KVLEN,  # [B] int32
    BT,  # [B, max_pages] block table (PAGED) or a dummy
    OUT,  # [B, Hq, Sq, Dv] (direct mode) or a dummy
    LSE,  # [B, Hq, Sq] fp32 (direct mode) or a dummy
    WS_ACC,  # [S, B * Hq * Sq, Dv] fp32 (split mode)
    WS_M,  # [S, B * Hq * Sq] fp32, running max in log2 units (split mode)
    WS_L,  # [S, B * Hq * Sq] fp32, running sum (split mode)
    # strides (int64-safe: promoted before use)
    stride_qb,
    stride_qh,
    stride_qs,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,  # contiguous: batch/head/token; paged: page/head/slot
    stride_vb,
    stride_vh,
    stride_vs,
    stride_sb,
    stride_sh,  # SEL / LW / CNT batch and head strides (stride_sh = 0 when Hs == 1)
    stride_cb,
    stride_ch,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    # sizes (runtime)
    B,
    HQ,
    SQ,
    D,
    DV,
    MK,  # entries per SEL row
    CAP,  # keys a row can hold: Skv (contiguous) or max_pages * page_size (paged)
    PAGE_SIZE,
    BLOCK_KEYS,  # block mode: keys per listed block
    UNITS,  # units per batch row
    UNIT_Q,  # query heads per unit (group or 1)
    KV_DIV,  # unit -> kv head divisor (1 or group)
    SEL_DIV,  # unit -> selection head divisor
    qk_scale,  # softmax scale * log2(e)
    # compile-time
    BLOCK_R: tl.constexpr,  # >= UNIT_Q * SQ, >= 16
    BLOCK_N: tl.constexpr,  # keys per tile
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IS_BLOCK: tl.constexpr,
    HAS_LW: tl.constexpr,
    PAGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
):
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    pid = tl.program_id(1)
    b = (pid // UNITS).to(tl.int64)
    u = pid % UNITS
    kvh = (u // KV_DIV).to(tl.int64)
    selh = (u // SEL_DIV).to(tl.int64)

    q_len = tl.load(QLEN + b)
    kv_len = tl.minimum(tl.load(KVLEN + b), CAP)
    count = tl.minimum(tl.load(CNT + b * stride_cb + selh * stride_ch), MK)
    count = tl.maximum(count, 0)

    # ---- this program's query rows: r -> (q head, query index i)
    r = tl.arange(0, BLOCK_R)  # [BLOCK_R]
    n_rows = UNIT_Q * SQ
    qh = (u * UNIT_Q + r // SQ).to(tl.int64)
    qi = r % SQ
    row_in = r < n_rows
    row_ok = row_in & (qi < q_len)
    pos = kv_len - q_len + qi  # [BLOCK_R] absolute key position of each query
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = (
        Q
        + b * stride_qb
        + qh[:, None] * stride_qh
        + qi[:, None].to(tl.int64) * stride_qs
        + d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (d[None, :] < D), other=0.0)  # [BLOCK_R, BLOCK_D]
    if DOT_FP32:
        q = q.to(tl.float32)

    # ---- this split's share of the tiles
    if IS_BLOCK:
        tiles_per_block = tl.cdiv(BLOCK_KEYS, BLOCK_N)
        n_tiles = count * tiles_per_block
    else:
        tiles_per_block = 1
        n_tiles = tl.cdiv(count, BLOCK_N)
    per_split = tl.cdiv(n_tiles, num_splits)
    if IS_BLOCK:  # whole blocks per split where possible (keys of a block stay together)
        per_split = tl.cdiv(per_split, tiles_per_block) * tiles_per_block
    t_lo = split * per_split
    t_hi = tl.minimum(t_lo + per_split, n_tiles)

    sel_base = SEL + b * stride_sb + selh * stride_sh
    lw_base = LW + b * stride_sb + selh * stride_sh
    n_off = tl.arange(0, BLOCK_N)
    k_head = K + kvh * stride_kh
    v_head = V + kvh * stride_vh
    dk_ok = d[None, :] < D
    dv_ok = dv[None, :] < DV

    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_DV], tl.float32)

    # Triton's pipeliner (num_stages) overlaps the indirect loads of consecutive tiles; a hand-written
    # register double buffer was measured slower on H100 (register pressure).
    for t in range(t_lo, t_hi):
        if IS_BLOCK:
            blk = tl.load(sel_base + t // tiles_per_block).to(tl.int64)
            sub = (t % tiles_per_block) * BLOCK_N + n_off  # [BLOCK_N] offsets inside the block
            j = tl.where(sub < BLOCK_KEYS, blk * BLOCK_KEYS + sub, -1)  # a negative block id: j < 0 too
        else:
            slot = t * BLOCK_N + n_off
            j = tl.load(sel_base + slot, mask=slot < count, other=-1).to(tl.int64)
        key_ok = (j >= 0) & (j < kv_len)  # [BLOCK_N]; j < 0: no key
        if PAGED:
            page = tl.load(BT + b * stride_btb + j // PAGE_SIZE, mask=key_ok, other=0).to(tl.int64)
            k_row = page * stride_kb + (j % PAGE_SIZE) * stride_ks
            v_row = page * stride_vb + (j % PAGE_SIZE) * stride_vs
        else:
            k_row = b * stride_kb + j * stride_ks
            v_row = b * stride_vb + j * stride_vs
        k = tl.load(
            k_head + k_row[:, None] + d[None, :], mask=key_ok[:, None] & dk_ok, other=0.0
        )  # [BLOCK_N, BLOCK_D]
        v = tl.load(
            v_head + v_row[:, None] + dv[None, :], mask=key_ok[:, None] & dv_ok, other=0.0
        )  # [BLOCK_N, BLOCK_DV]
        if DOT_FP32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [BLOCK_R, BLOCK_N]
        if HAS_LW:
            lw = tl.load(lw_base + slot, mask=key_ok, other=0.0).to(tl.float32)
            s = s + lw[None, :] * 1.4426950408889634
        allowed = row_ok[:, None] & key_ok[None, :]
        if CAUSAL:
            allowed = allowed & (j[None, :] <= pos[:, None])
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])  # [BLOCK_R, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_FP32:
            pv = tl.dot(p, v, input_precision=PRECISION)
        else:
            pv = tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    rid = (b * HQ + qh) * SQ + qi  # [BLOCK_R] flat (b, q head, i)
    if SPLIT:
        ws_row = split.to(tl.int64) * (B * HQ * SQ) + rid
        tl.store(WS_M + ws_row, m_i, mask=row_in)
        tl.store(WS_L + ws_row, l_i, mask=row_in)
        tl.store(WS_ACC + ws_row[:, None] * DV + dv[None, :], acc, mask=row_in[:, None] & (dv[None, :] < DV))
    else:
        has = l_i > 0.0
        denom = tl.where(has, l_i, 1.0)
        o = tl.where(has[:, None], acc / denom[:, None], 0.0)
        lse = tl.where(has, (m_i + tl.log2(denom)) * 0.6931471805599453, float("-inf"))
        o_ptrs = (
            OUT
            + b * stride_ob
            + qh[:, None] * stride_oh
            + qi[:, None].to(tl.int64) * stride_os
            + dv[None, :] * stride_od
        )
        tl.store(o_ptrs, o.to(OUT.dtype.element_ty), mask=row_in[:, None] & (dv[None, :] < DV))
        tl.store(LSE + rid, lse, mask=row_in)


def _decode_reduce_kernel(
    WS_ACC,  # [S, R, Dv] fp32
    WS_M,  # [S, R] fp32 (log2 units)
    WS_L,  # [S, R] fp32
    OUT,  # [B, Hq, Sq, Dv]
    LSE,  # [B * Hq * Sq] fp32
    stride_ob,
    stride_oh,
    stride_os,
    stride_od,
    HQ,
    SQ,
    DV,
    NUM_SPLITS,
    ROWS,
    BLOCK_DV: tl.constexpr,
):
    rid = tl.program_id(0).to(tl.int64)  # flat (b, q head, i)
    dv = tl.arange(0, BLOCK_DV)
    dmask = dv < DV
    m = tl.full([1], float("-inf"), tl.float32)
    l = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_DV], tl.float32)
    zero = tl.zeros([1], tl.int32)
    for s in range(0, NUM_SPLITS):
        row = s * ROWS + rid
        m_s = tl.load(WS_M + row + zero)  # [1]
        l_s = tl.load(WS_L + row + zero)
        a_s = tl.load(WS_ACC + row * DV + dv, mask=dmask, other=0.0)  # [BLOCK_DV]
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l = l * alpha + l_s * beta
        acc = acc * alpha + a_s * beta
        m = m_new
    has = l > 0.0
    denom = tl.where(has, l, 1.0)
    o = tl.where(has, acc / denom, 0.0)
    lse = tl.where(has, (m + tl.log2(denom)) * 0.6931471805599453, float("-inf"))
    b = rid // (HQ * SQ)
    h = (rid // SQ) % HQ
    i = rid % SQ
    tl.store(
        OUT + b * stride_ob + h * stride_oh + i * stride_os + dv * stride_od,
        o.to(OUT.dtype.element_ty),
        mask=dmask,
    )
    tl.store(LSE + rid + zero, lse)


_JIT_CACHE: dict[bool, tuple] = {}
# launch overrides for tuning experiments (None: the built-in choice)
TUNING: dict[str, int | None] = {"num_warps": None, "num_stages": None, "block_n": None}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels() -> tuple:
    """(decode kernel, reduce kernel), jitted for the current mode (GPU or interpreter)."""
    mode = _interpreting()
    kernels = _JIT_CACHE.get(mode)
    if kernels is None:
        fwd = triton.jit(
            _sparse_decode_fwd_kernel,
            # lengths and index-list strides only: the K/V/q/out strides keep Triton's divisibility
            # specialisation (it proves 16-byte alignment, so K/V rows load as vectors); they do not
            # depend on the sequence length beyond a multiple of D, a multiple of 16 for every
            # supported head dim
            do_not_specialize=[
                "stride_sb",
                "stride_sh",
                "stride_cb",
                "stride_btb",
                "B",
                "MK",
                "CAP",
                "BLOCK_KEYS",
            ],
        )
        red = triton.jit(_decode_reduce_kernel, do_not_specialize=["stride_ob", "NUM_SPLITS", "ROWS"])
        kernels = _JIT_CACHE[mode] = (fwd, red)
    return kernels


# ----------------------------------------------------------------------------------------------
# host side


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_num_splits(programs: int, tiles: int, device: torch.device) -> int:
    """Splits of the selection so that ``programs * splits`` is about 4x the SM count.

    ``programs`` = B * units (programs per split), ``tiles`` = most key tiles any program visits.
    Gathered rows need many loads in flight: on H100, 2x the SM count left bandwidth unused, 4x was
    near the best. Each split keeps at least ``MIN_TILES_PER_SPLIT`` tiles; at most ``MAX_SPLITS``.
    """
    want = -(-4 * _sm_count(device) // max(1, programs))
    return int(max(1, min(want, tiles // MIN_TILES_PER_SPLIT, MAX_SPLITS)))


def _lengths(name: str, x: IntsLike, batch: int, default: int, device: torch.device) -> torch.Tensor:
    """int32 [B] on ``device`` from None (all ``default``), an int, a sequence or a tensor."""
    if x is None:
        return torch.full((batch,), default, dtype=torch.int32, device=device)
    if isinstance(x, torch.Tensor):
        if x.dim() > 1 or (x.dim() == 1 and x.numel() not in (1, batch)):
            raise ValueError(f"{name} must have shape [B={batch}], got {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")
        return x.reshape(-1).expand(batch).to(device=device, dtype=torch.int32).contiguous()
    if isinstance(x, int):
        return torch.full((batch,), x, dtype=torch.int32, device=device)
    vals = list(x)
    if len(vals) != batch:
        raise ValueError(f"{name} must have {batch} entries, got {len(vals)}")
    return torch.tensor(vals, dtype=torch.int32, device=device)


def _check_device(q: torch.Tensor, named: dict[str, torch.Tensor | None], kernels: str = "decode") -> None:
    dev = q.device
    if dev.type == "cpu":
        if not _interpreting():
            raise ValueError(
                f"the Triton {kernels} kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                "got CPU tensors"
            )
    elif dev.type != "cuda":
        raise ValueError(f"the Triton {kernels} kernels need CUDA tensors, got a {dev.type} tensor")
    for name, t in named.items():
        if t is not None and t.device != dev:
            raise ValueError(f"{name} is on {t.device}, q on {dev}")


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class _Launch:
    """Everything both public functions share: checks, cache geometry, lengths, output buffers."""

    def __init__(self, q, k, v, q_lens, kv_lens, causal, scale, block_table, page_size, out, check_inputs):
        if not isinstance(q, torch.Tensor) or q.dim() != 4:
            raise ValueError(f"q must be a 4-D tensor [B, Hq, Sq, D], got {getattr(q, 'shape', type(q))}")
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a 4-D tensor, got {getattr(t, 'shape', type(t))}")
            if t.dtype != q.dtype:
                raise ValueError(f"{name} has dtype {t.dtype}, q has {q.dtype}")
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                raise ValueError(
                    f"{name} must be contiguous in its last (head) dim, got strides {t.stride()}"
                )
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"q must be float16, bfloat16 or float32, got {q.dtype}")
        self.paged = block_table is not None
        _check_device(q, {"k": k, "v": v, "block_table": block_table, "out": out})
        B, HQ, SQ, D = q.shape
        if self.paged:
            if page_size is None:
                raise ValueError("page_size is required with block_table")
            # vLLM V1: [num_pages, page_size, Hkv, D]
            num_pages, ps, hkv, dk = k.shape
            if int(page_size) != ps or v.shape[:3] != k.shape[:3]:
                raise ValueError(
                    f"paged k/v must be [num_pages, page_size={page_size}, Hkv, D]; got k {tuple(k.shape)}, "
                    f"v {tuple(v.shape)}"
                )
            if block_table.dim() != 2 or block_table.shape[0] != B:
                raise ValueError(
                    f"block_table must have shape [B={B}, max_pages], got {tuple(block_table.shape)}"
                )
            if block_table.dtype not in (torch.int32, torch.int64):
                raise ValueError(f"block_table must be int32/int64, got {block_table.dtype}")
            self.block_table = block_table if block_table.stride(-1) == 1 else block_table.contiguous()
            self.cap = int(block_table.shape[1]) * ps
            self.num_pages, self.page_size = num_pages, ps
            self.k_strides = (k.stride(0), k.stride(2), k.stride(1))  # page, head, slot
            self.v_strides = (v.stride(0), v.stride(2), v.stride(1))
        else:
            if page_size is not None:
                raise ValueError("page_size is only valid together with block_table")
            bk, hkv, skv, dk = k.shape
            if bk != B or tuple(v.shape[:3]) != (B, hkv, skv):
                raise ValueError(
                    f"k/v must be [B={B}, Hkv, Skv, D]; got k {tuple(k.shape)}, v {tuple(v.shape)}"
                )
            self.block_table = None
            self.cap = skv
            self.num_pages, self.page_size = 0, 1
            self.k_strides = (k.stride(0), k.stride(1), k.stride(2))  # batch, head, token
            self.v_strides = (v.stride(0), v.stride(1), v.stride(2))
        if dk != D:
            raise ValueError(f"q has head dim {D}, k has {dk}")
        DV = v.shape[-1]
        if D > MAX_HEAD_DIM or DV > MAX_HEAD_DIM:
            raise ValueError(f"head dim must be <= {MAX_HEAD_DIM}, got D={D}, Dv={DV}")
        if hkv == 0 or HQ % hkv != 0:
            raise ValueError(f"Hq={HQ} must be a multiple of Hkv={hkv}")
        self.q, self.k, self.v = q, k, v
        self.B, self.HQ, self.SQ, self.D, self.DV, self.HKV = B, HQ, SQ, D, DV, hkv
        self.group = HQ // hkv
        self.causal = bool(causal)
        self.scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        dev = q.device
        if kv_lens is None and self.paged:
            raise ValueError("kv_lens is required with a paged cache")
        self.kv_lens = _lengths("kv_lens", kv_lens, B, self.cap, dev)
        if q_lens is None:  # like the core: min(Sq, kv_len), bottom-right aligned
            self.q_lens = torch.clamp(self.kv_lens, max=SQ)
        else:
            self.q_lens = _lengths("q_lens", q_lens, B, SQ, dev)
        if out is None:
            out = torch.empty(B, HQ, SQ, DV, dtype=q.dtype, device=dev)
        elif tuple(out.shape) != (B, HQ, SQ, DV) or out.dtype != q.dtype:
            raise ValueError(
                f"out must be a {q.dtype} tensor of shape {(B, HQ, SQ, DV)}, got {out.dtype} {tuple(out.shape)}"
            )
        self.out = out
        self.lse = torch.empty(B, HQ, SQ, dtype=torch.float32, device=dev)
        if check_inputs:
            self._validate_lengths_and_pages()

    def _validate_lengths_and_pages(self) -> None:
        """Lengths within the cache, q_lens <= Sq (<= kv_len when causal) and, paged, every page a row
        uses inside [0, num_pages). One host sync; skipped during CUDA graph capture (the kernel still
        never reads outside the cache: it clamps kv_len to the capacity)."""
        if self.B == 0 or _capturing(self.q.device):
            return
        ql, kl = self.q_lens.long(), self.kv_lens.long()
        bad_len = (kl < 0) | (kl > self.cap) | (ql < 0) | (ql > self.SQ)
        if self.causal:
            bad_len = bad_len | (ql > kl)
        checks = [bad_len.any()]
        if self.paged:
            bt = self.block_table
            need = (kl.clamp(0, self.cap) + self.page_size - 1) // self.page_size  # [B] pages used
            used = torch.arange(bt.shape[1], device=bt.device)[None, :] < need[:, None]
            bad_page = used & ((bt < 0) | (bt >= self.num_pages))
            checks.append(bad_page.any())
        flags = torch.stack(checks).cpu().tolist()
        if flags[0]:
            raise ValueError(
                f"lengths out of range: need 0 <= kv_lens <= {self.cap} (cache capacity), 0 <= q_lens <= "
                f"Sq={self.SQ}{' and q_lens <= kv_lens (causal)' if self.causal else ''}; got q_lens="
                f"{self.q_lens.tolist()}, kv_lens={self.kv_lens.tolist()}"
            )
        if self.paged and flags[1]:
            raise ValueError(
                f"block_table has entries outside [0, num_pages={self.num_pages}) in pages that kv_lens use"
            )

    def units(self, sel_heads: int) -> tuple[int, int, int, int, int]:
        """(units per row, query heads per unit, unit->kv-head divisor, unit->selection-head divisor,
        selection head stride multiplier 0/1) for a selection with ``sel_heads`` heads."""
        g, hkv, hq = self.group, self.HKV, self.HQ
        if sel_heads not in (1, hkv, hq):
            raise ValueError(f"selection has {sel_heads} heads; expected 1, Hkv={hkv} or Hq={hq}")
        shared = sel_heads != hq or g == 1  # the whole GQA group uses one selection row
        if shared and g * self.SQ <= MAX_ROWS_PER_PROGRAM:
            return hkv, g, 1, 1, int(sel_heads != 1)
        # one program per query head (selection per q head, or too many rows for one program)
        return hq, 1, g, (1 if sel_heads == hq else g), int(sel_heads != 1)

    def run(self, sel, cnt, lw, *, is_block: bool, block_keys: int, sel_heads: int, num_splits):
        B, HQ, SQ, D, DV = self.B, self.HQ, self.SQ, self.D, self.DV
        if B == 0 or SQ == 0 or HQ == 0:
            self.out.zero_()
            self.lse.fill_(float("-inf"))
            return self.out, self.lse
        units, unit_q, kv_div, sel_div, sel_mult = self.units(sel_heads)
        block_r = max(16, _next_pow2(unit_q * SQ))
        block_d, block_dv = max(16, _next_pow2(D)), max(16, _next_pow2(DV))
        # tiles of 32 keys with 2 warps (4 for wide heads / many rows): measured best on H100 for
        # gathered rows (64-key tiles and manual double buffering were slower: register pressure)
        big = max(block_d, block_dv) > 128 or block_r > 32
        block_n = TUNING["block_n"] or (max(16, min(_next_pow2(block_keys), 32)) if is_block else 32)
        if is_block:
            tiles = sel.shape[-1] * -(-block_keys // block_n)
        else:
            tiles = -(-sel.shape[-1] // block_n)
        num_warps = TUNING["num_warps"] or (4 if big else 2)
        dev = self.q.device
        programs = B * units
        if num_splits is None:
            num_splits = default_num_splits(programs, tiles, dev)
        num_splits = int(num_splits)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1, got {num_splits}")
        split = num_splits > 1
        interp = _interpreting()
        fwd, red = _kernels()
        rows = B * HQ * SQ
        if split:
            ws_acc = torch.empty(num_splits, rows, DV, dtype=torch.float32, device=dev)
            ws_m = torch.empty(num_splits, rows, dtype=torch.float32, device=dev)
            ws_l = torch.empty(num_splits, rows, dtype=torch.float32, device=dev)
        else:
            ws_acc = ws_m = ws_l = self.lse  # unused
        out, lse = self.out, self.lse
        bt = self.block_table if self.paged else self.kv_lens
        lw_t = lw if lw is not None else self.lse
        precision = "ieee" if (interp or self.q.dtype == torch.float32) else "tf32"
        fwd[(num_splits, programs)](
            self.q,
            self.k,
            self.v,
            sel,
            cnt,
            lw_t,
            self.q_lens,
            self.kv_lens,
            bt,
            out,
            lse,
            ws_acc,
            ws_m,
            ws_l,
            self.q.stride(0),
            self.q.stride(1),
            self.q.stride(2),
            self.q.stride(3),
            *self.k_strides,
            *self.v_strides,
            sel.stride(0),
            sel.stride(1) * sel_mult,
            cnt.stride(0),
            cnt.stride(1) * sel_mult,
            bt.stride(0),
            out.stride(0),
            out.stride(1),
            out.stride(2),
            out.stride(3),
            B,
            HQ,
            SQ,
            D,
            DV,
            sel.shape[-1],
            self.cap,
            self.page_size,
            max(1, block_keys),
            units,
            unit_q,
            kv_div,
            sel_div,
            self.scale * LOG2E,
            BLOCK_R=block_r,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            BLOCK_DV=block_dv,
            IS_BLOCK=is_block,
            HAS_LW=lw is not None,
            PAGED=self.paged,
            CAUSAL=self.causal,
            SPLIT=split,
            DOT_FP32=interp,
            PRECISION=precision,
            num_warps=num_warps,
            num_stages=TUNING["num_stages"] or 2,
        )
        if split:
            red[(rows,)](
                ws_acc,
                ws_m,
                ws_l,
                out,
                lse,
                out.stride(0),
                out.stride(1),
                out.stride(2),
                out.stride(3),
                HQ,
                SQ,
                DV,
                num_splits,
                rows,
                BLOCK_DV=block_dv,
                num_warps=1 if block_dv <= 128 else 2,
            )
        return out, lse


def _check_list(name: str, t: torch.Tensor, B: int, dims: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims or t.shape[0] != B:
        raise ValueError(
            f"{name} must be a {dims}-D tensor with batch {B}, got {getattr(t, 'shape', type(t))}"
        )
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32/int64, got {t.dtype}")


def _finish(out: torch.Tensor, lse: torch.Tensor, return_lse: bool):
    return (out, lse) if return_lse else out


def token_decode(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D] or paged key_cache [num_pages, page_size, Hkv, D]
    v: torch.Tensor,  # [B, Hkv, Skv, Dv] or paged value_cache [num_pages, page_size, Hkv, Dv]
    indices: torch.Tensor,  # [B, Hs, K] int32/int64, Hs in (1, Hkv, Hq)
    counts: torch.Tensor,  # [B, Hs] used entries of indices
    log_weights: torch.Tensor | None,  # [B, Hs, K] fp32, added to the scaled logits
    q_lens: IntsLike,  # [B] (None: min(Sq, kv_lens))
    kv_lens: IntsLike,  # [B] (None: Skv; required when paged)
    *,
    causal: bool,
    scale: float | None,
    num_splits: int | None = None,
    block_table: torch.Tensor | None = None,  # [B, max_pages] int32
    page_size: int | None = None,
    return_lse: bool = True,
    out: torch.Tensor | None = None,  # [B, Hq, Sq, Dv] in q.dtype, written completely
    check_inputs: bool = True,
):
    """Split-K decode attention over a token selection.

    Query head h of row b attends to keys ``indices[b, hs, :counts[b, hs]]`` of its KV head
    (``hs`` = 0, h // group or h for Hs = 1, Hkv, Hq), with ``log_weights`` (if any) added to the
    scaled logits; causal drops keys after the query's position ``kv_lens[b] - q_lens[b] + i``.
    Indices outside ``[0, kv_lens[b])`` are dropped. Returns out ``[B, Hq, Sq, Dv]`` in q.dtype and
    (when ``return_lse``) lse ``[B, Hq, Sq]`` fp32; queries with no visible key, and rows
    ``i >= q_lens[b]``, give 0 and -inf. ``num_splits`` None picks about 4x the SM count of programs (see default_num_splits).
    Paged: pass ``key_cache``/``value_cache`` as k/v with ``block_table`` and ``page_size``.
    ``check_inputs`` validates lengths and the page table on the host (one device sync; skipped
    automatically during CUDA graph capture); pass False when the caller has validated them (the
    kernel itself never reads outside the cache either way).
    """
    launch = _Launch(q, k, v, q_lens, kv_lens, causal, scale, block_table, page_size, out, check_inputs)
    B = launch.B
    _check_list("indices", indices, B, 3)
    _check_list("counts", counts, B, 2)
    hs = indices.shape[1]
    if tuple(counts.shape) != (B, hs):
        raise ValueError(f"counts must have shape {(B, hs)}, got {tuple(counts.shape)}")
    dev = q.device
    if indices.device != dev or counts.device != dev:
        raise ValueError(f"indices/counts must be on {dev}")
    indices = indices.contiguous()
    counts = counts.contiguous()
    if log_weights is not None:
        if tuple(log_weights.shape) != tuple(indices.shape) or not log_weights.dtype.is_floating_point:
            raise ValueError(f"log_weights must be a float tensor of shape {tuple(indices.shape)}")
        if log_weights.device != dev:
            raise ValueError(f"log_weights must be on {dev}")
        log_weights = log_weights.to(torch.float32).contiguous()
    out_t, lse = launch.run(
        indices, counts, log_weights, is_block=False, block_keys=1, sel_heads=hs, num_splits=num_splits
    )
    return _finish(out_t, lse, return_lse)


def block_decode(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D] or paged key_cache [num_pages, page_size, Hkv, D]
    v: torch.Tensor,  # [B, Hkv, Skv, Dv] or paged value_cache
    kv_indices: torch.Tensor,  # [B, H, MK] key-block ids, H in (1, Hkv, Hq)
    kv_counts: torch.Tensor,  # [B, H]
    q_lens: IntsLike,
    kv_lens: IntsLike,
    *,
    block_k: int,
    causal: bool,
    scale: float | None,
    num_splits: int | None = None,
    block_table: torch.Tensor | None = None,
    page_size: int | None = None,
    return_lse: bool = True,
    out: torch.Tensor | None = None,
    check_inputs: bool = True,
):
    """Split-K decode attention over per-head lists of key blocks.

    Query head h of row b attends to the keys ``[blk * block_k, (blk + 1) * block_k)`` of every block
    ``blk`` in ``kv_indices[b, hs, :kv_counts[b, hs]]`` (blocks should be distinct), masked to
    ``< kv_lens[b]`` and, when causal, to ``<= kv_lens[b] - q_lens[b] + i``. Same heads, paging,
    outputs and splits as :func:`token_decode`; ``block_k`` is any positive int (tiles of up to 64 keys).
    """
    launch = _Launch(q, k, v, q_lens, kv_lens, causal, scale, block_table, page_size, out, check_inputs)
    B = launch.B
    if not isinstance(block_k, int) or block_k < 1:
        raise ValueError(f"block_k must be a positive int, got {block_k!r}")
    _check_list("kv_indices", kv_indices, B, 3)
    _check_list("kv_counts", kv_counts, B, 2)
    hs = kv_indices.shape[1]
    if tuple(kv_counts.shape) != (B, hs):
        raise ValueError(f"kv_counts must have shape {(B, hs)}, got {tuple(kv_counts.shape)}")
    if kv_indices.device != q.device or kv_counts.device != q.device:
        raise ValueError(f"kv_indices/kv_counts must be on {q.device}")
    out_t, lse = launch.run(
        kv_indices.contiguous(),
        kv_counts.contiguous(),
        None,
        is_block=True,
        block_keys=block_k,
        sel_heads=hs,
        num_splits=num_splits,
    )
    return _finish(out_t, lse, return_lse)

"""Block-sparse flash-attention forward over a BlockLayout (Triton).

One program per (query tile, batch row x query head). A program walks the key blocks its layout row
lists for the tile, with an online softmax in float32, and reads its KV head directly (native GQA, no
``repeat_kv``). Full blocks skip the element mask (only the ``j < kv_len`` bound of a ragged last
block remains); partial blocks apply the element predicate of ``sparse_attn.block_layout``::

    j < kv_len  and  (not causal or j <= p)  and  (no window or |p - j| < window or j < sink)

Query tiles are absolute: tile ``t`` of row ``b`` is the query block ``q_start // block_q + t`` with
``q_start = kv_len - q_len`` (bottom-right alignment, so chunked prefill against a longer context and
decode are exact). Rows outside ``[0, q_len)`` of the query tensor get out 0 and lse -inf, as do rows
that see no key.

K/V are contiguous ``[B, Hkv, Skv, D]`` or, with ``block_table``/``page_size``, a vLLM V1 paged cache
``[num_pages, page_size, Hkv, D]`` (a constexpr ``PAGED`` flag: the contiguous path's code is unchanged).

This module imports nothing from the rest of the project: plain tensors and ints in, tensors out.
Sequence lengths are runtime values (loaded from ``q_lens``/``kv_lens`` inside the kernel), so new
lengths never trigger a recompile.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

__all__ = ["MAX_HEAD_DIM", "block_sparse_fwd", "block_sparse_fwd_kernel"]

MAX_HEAD_DIM = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634
# Offset that makes floor division of a possibly negative q_start (non-causal rows with
# q_len > kv_len) a division of non-negative numbers: 2**40 blocks is beyond any sequence.
_FLOOR_SHIFT = 40


# Strides of the layout tensors and of lse change with the sequence length (their divisibility too)
# and feed only scalar address arithmetic: never specialise on them, nor on the lengths.
@triton.jit(
    do_not_specialize=[
        "stride_lb",
        "stride_lh",
        "stride_ib",
        "stride_ih",
        "stride_it",
        "stride_cb",
        "stride_ch",
        "stride_ct",
        "stride_fb",
        "stride_fh",
        "stride_ft",
        "stride_wb",
        "stride_wh",
        "stride_sb",
        "stride_sh",
        "stride_btb",
        "n_q_rows",
        "n_layout_tiles",
    ]
)
def block_sparse_fwd_kernel(
    Q,  # [B, Hq, Sq, D]
    K,  # [B, Hkv, Skv, D], or paged (PAGED) [num_pages, page_size, Hkv, D]
    V,  # [B, Hkv, Skv, Dv], or paged [num_pages, page_size, Hkv, Dv]
    Out,  # [B, Hq, Sq, Dv]
    Lse,  # [B, Hq, Sq] float32 (unused unless STORE_LSE)
    KvIdx,  # [B, H, NT, MK] int32/int64, last dim contiguous
    KvCnt,  # [B, H, NT]
    Full,  # [B, H, NT, MK] uint8 (a bool view), last dim contiguous
    QLens,  # [B]
    KvLens,  # [B]
    Sink,  # [B, H] int64 (unused unless HAS_WINDOW)
    Window,  # [B, H] int64
    BlockTable,  # [B, max_pages] int32/int64 (unused unless PAGED)
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,  # paged: page stride
    stride_kh,
    stride_ks,  # paged: slot stride
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    stride_lb,
    stride_lh,
    stride_ib,
    stride_ih,
    stride_it,
    stride_cb,
    stride_ch,
    stride_ct,
    stride_fb,
    stride_fh,
    stride_ft,
    stride_wb,
    stride_wh,
    stride_sb,
    stride_sh,
    stride_btb,
    n_head_groups,  # Hq // HEADS
    group_size,
    layout_div,
    n_q_rows,
    n_layout_tiles,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HEADS: tl.constexpr,  # query heads per program (of one GQA group, sharing one layout row)
    CAUSAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    STORE_LSE: tl.constexpr,
    PAGED: tl.constexpr,  # K/V through BlockTable (vLLM V1 paged cache)
    PAGE_SIZE: tl.constexpr,  # keys per page (1 unless PAGED; fixed per model, so no recompiles)
    DOT_FP32: tl.constexpr,  # interpreter: bf16 tl.dot is wrong there, so every dot runs in fp32
    IEEE_DOT: tl.constexpr,  # fp32 inputs: full-precision dots (no tf32), like torch's default
    FLOOR_SHIFT: tl.constexpr,
):
    # Tiles run in reverse order: later (causal: heavier) tiles start first, lighter ones fill the tail.
    t = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_head_groups).to(tl.int64)
    h0 = (pid_bh % n_head_groups).to(tl.int64) * HEADS  # first query head of this program
    kvh = h0 // group_size
    lh = h0 // layout_div  # layout row: h (H == Hq), h // group (H == Hkv) or 0 (H == 1)

    q_len = tl.load(QLens + b).to(tl.int64)
    kv_len = tl.load(KvLens + b).to(tl.int64)
    q_start = kv_len - q_len
    # floor((q_start) / BLOCK_Q) and floor((kv_len - 1) / BLOCK_Q) for possibly negative numerators
    shift = BLOCK_Q << FLOOR_SHIFT
    first_qb = (q_start + shift) // BLOCK_Q - (1 << FLOOR_SHIFT)
    last_qb = (kv_len - 1 + shift) // BLOCK_Q - (1 << FLOOR_SHIFT)
    row_tiles = tl.minimum(last_qb - first_qb + 1, n_layout_tiles)
    row_tiles = tl.where(q_len > 0, row_tiles, 0)

    # The program's rows: HEADS query heads x BLOCK_Q positions, stacked.
    offs_r = tl.arange(0, HEADS * BLOCK_Q)  # [R]
    offs_q = offs_r % BLOCK_Q  # [R] row within the tile
    head = h0 + (offs_r // BLOCK_Q).to(tl.int64)  # [R] query head of each row
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    offs_d = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    offs_dv = tl.arange(0, BLOCK_DV)  # [BLOCK_DV]
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DV

    out_base = Out + b * stride_ob + head * stride_oh  # [R]
    lse_base = Lse + b * stride_lb + head * stride_lh  # [R]

    if t < row_tiles:
        t64 = t.to(tl.int64)
        pos = (first_qb + t64) * BLOCK_Q + offs_q  # [R] absolute query positions
        row_ok = (pos >= q_start) & (pos < kv_len)
        rows = pos - q_start  # query row in the tensor
        q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + rows[:, None] * stride_qs + offs_d[None, :]
        q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [R, BLOCK_D]
        if DOT_FP32:
            q = q.to(tl.float32)

        if PAGED:
            k_base = K + kvh * stride_kh
            v_base = V + kvh * stride_vh
            bt_base = BlockTable + b * stride_btb
        else:
            k_base = K + b * stride_kb + kvh * stride_kh
            v_base = V + b * stride_vb + kvh * stride_vh
        count = tl.load(KvCnt + b * stride_cb + lh * stride_ch + t64 * stride_ct)
        idx_base = KvIdx + b * stride_ib + lh * stride_ih + t64 * stride_it
        full_base = Full + b * stride_fb + lh * stride_fh + t64 * stride_ft
        if HAS_WINDOW:
            sink = tl.load(Sink + b * stride_sb + lh * stride_sh)
            window = tl.load(Window + b * stride_wb + lh * stride_wh)

        m_i = tl.full([HEADS * BLOCK_Q], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([HEADS * BLOCK_Q], dtype=tl.float32)
        acc = tl.zeros([HEADS * BLOCK_Q, BLOCK_DV], dtype=tl.float32)
        for s in range(0, count):
            kb = tl.load(idx_base + s).to(tl.int64)
            is_full = tl.load(full_base + s)
            cols = kb * BLOCK_K + offs_k  # [BLOCK_K] key positions
            col_ok = cols < kv_len
            if PAGED:  # key j at page BlockTable[b, j // PAGE_SIZE], slot j % PAGE_SIZE
                page = tl.load(bt_base + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
                slot = cols % PAGE_SIZE
                k_off = (page * stride_kb + slot * stride_ks)[None, :]
                v_off = (page * stride_vb + slot * stride_vs)[:, None]
            else:
                k_off = cols[None, :] * stride_ks
                v_off = cols[:, None] * stride_vs
            k = tl.load(
                k_base + k_off + offs_d[:, None],
                mask=col_ok[None, :] & d_ok[:, None],
                other=0.0,
            )  # [BLOCK_D, BLOCK_K]
            if DOT_FP32:
                k = k.to(tl.float32)
            if IEEE_DOT:
                qk = tl.dot(q, k, input_precision="ieee")
            else:
                qk = tl.dot(q, k)
            qk = qk * qk_scale  # [R, BLOCK_K], log2 units
            # Full blocks need no mask unless they hold the ragged end of the keys.
            if (is_full == 0) | (kb * BLOCK_K + BLOCK_K > kv_len):
                ok = tl.broadcast_to(col_ok[None, :], (HEADS * BLOCK_Q, BLOCK_K))
                elem = ok
                if CAUSAL:
                    elem = elem & (cols[None, :] <= pos[:, None])
                if HAS_WINDOW:
                    near = (cols[None, :] > pos[:, None] - window) & (cols[None, :] < pos[:, None] + window)
                    elem = elem & (near | (cols[None, :] < sink))
                ok = ok & (elem | (is_full != 0))
                qk = tl.where(ok, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # [R]
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
            p = tl.math.exp2(qk - m_safe[:, None])  # [R, BLOCK_K]
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(
                v_base + v_off + offs_dv[None, :],
                mask=col_ok[:, None] & dv_ok[None, :],
                other=0.0,
            )  # [BLOCK_K, BLOCK_DV]
            acc = acc * alpha[:, None]
            if DOT_FP32:
                acc += tl.dot(p, v.to(tl.float32))
            elif IEEE_DOT:
                acc += tl.dot(p, v, input_precision="ieee")
            else:
                acc += tl.dot(p.to(v.dtype), v)
            m_i = m_new

        # l == 0 only where no key was seen (acc is 0 there); a NaN l keeps its NaN.
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = out_base[:, None] + rows[:, None] * stride_os + offs_dv[None, :]
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
        if STORE_LSE:
            l_log = tl.math.log2(tl.where(l_i == 0.0, 1.0, l_i))
            lse = tl.where(l_i == 0.0, float("-inf"), (m_i + l_log) * 0.6931471805599453)
            tl.store(lse_base + rows, lse, mask=row_ok)

    # Padding rows [q_len, n_q_rows): program t clears rows q_len + t*BLOCK_Q + [0, BLOCK_Q).
    pad = q_len + t.to(tl.int64) * BLOCK_Q + offs_q  # [R]
    if q_len + t.to(tl.int64) * BLOCK_Q < n_q_rows:
        pad_ok = pad < n_q_rows
        zeros = tl.zeros([HEADS * BLOCK_Q, BLOCK_DV], dtype=Out.dtype.element_ty)
        tl.store(
            out_base[:, None] + pad[:, None] * stride_os + offs_dv[None, :],
            zeros,
            mask=pad_ok[:, None] & dv_ok[None, :],
        )
        if STORE_LSE:
            tl.store(lse_base + pad, tl.full([HEADS * BLOCK_Q], float("-inf"), dtype=tl.float32), mask=pad_ok)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Below this many listed key blocks per tile (the layout's max_k, known on the host), programs are
# short and more, smaller programs per SM win (H100, bf16, D=128: 64-row programs ~7% faster at 3%
# density and 32k tokens; 128-row programs of two heads win on long loops).
SHORT_LOOP_BLOCKS = 16


def _heads_per_program(hq: int, hkv: int, h_layout: int, block_q: int, max_blocks: int) -> int:
    """Query heads one program serves: the heads of a GQA group share their K/V loads when they also
    share a layout row (layout heads 1 or Hkv), up to 128 rows per program, unless loops are short."""
    group = hq // hkv
    if (h_layout == hq and group > 1) or max_blocks <= SHORT_LOOP_BLOCKS:
        return 1
    heads = 1
    while heads * 2 * block_q <= 128 and group % (heads * 2) == 0:
        heads *= 2
    return heads


def _launch_config(rows: int, block_k: int, block_d: int, interpret: bool) -> tuple[int, int]:
    """(num_warps, num_stages) for a program of ``rows`` query rows (measured on an H100, bf16)."""
    if interpret:
        return 4, 1
    num_warps = 8 if rows >= 128 else 4
    if rows <= 16:
        num_warps = 2 if block_k <= 32 else 4
    num_stages = 2 if (block_d >= 256 or block_k >= 128) else 3
    return num_warps, num_stages


def _launch_block_sparse_fwd(
    *,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor | None,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    full: torch.Tensor,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    sink: torch.Tensor | None,
    window: torch.Tensor | None,
    block_q: int,
    block_k: int,
    causal: bool,
    scale: float,
    grid_tiles: int,
    interpret: bool,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_table: torch.Tensor | None = None,
    page_size: int = 1,
) -> None:
    """Typed launcher: picks the grid and the tile config and passes every argument by keyword.
    With ``block_table``, k/v are paged caches [num_pages, page_size, Hkv, D]."""
    b, hq, sq, d = q.shape
    paged = block_table is not None
    hkv = k.shape[2] if paged else k.shape[1]
    # (batch or page, head, token or slot) strides
    k_strides = (k.stride(0), k.stride(2), k.stride(1)) if paged else (k.stride(0), k.stride(1), k.stride(2))
    v_strides = (v.stride(0), v.stride(2), v.stride(1)) if paged else (v.stride(0), v.stride(1), v.stride(2))
    bt = block_table if paged else q_lens
    dv = v.shape[3]
    h_layout = kv_indices.shape[1]
    group = hq // hkv
    layout_div = 1 if h_layout == hq else (group if h_layout == hkv else hq)
    block_d = max(16, triton.next_power_of_2(d))
    block_dv = max(16, triton.next_power_of_2(dv))
    heads = heads_per_program or _heads_per_program(hq, hkv, h_layout, block_q, kv_indices.shape[3])
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or heads & (heads - 1):
        raise ValueError(f"heads_per_program must be a power of two >= 1, got {heads!r}")
    if group % heads or (h_layout == hq and heads > 1 and group > 1) or (h_layout != hq and heads > group):
        raise ValueError(
            f"heads_per_program={heads} must divide the GQA group ({group}) and share one layout row"
        )
    warps, stages = _launch_config(heads * block_q, block_k, max(block_d, block_dv), interpret)
    num_warps = num_warps or warps
    num_stages = num_stages or stages
    has_window = window is not None
    sink_t = sink if has_window else q_lens
    window_t = window if has_window else q_lens
    sw_strides = (window_t.stride(0), window_t.stride(1)) if has_window else (0, 0)
    ss_strides = (sink_t.stride(0), sink_t.stride(1)) if has_window else (0, 0)
    lse_t = lse if lse is not None else out
    lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    grid = (grid_tiles, b * (hq // heads))
    block_sparse_fwd_kernel[grid](
        Q=q,
        K=k,
        V=v,
        Out=out,
        Lse=lse_t,
        KvIdx=kv_indices,
        KvCnt=kv_counts,
        Full=full,
        QLens=q_lens,
        KvLens=kv_lens,
        Sink=sink_t,
        Window=window_t,
        BlockTable=bt,
        stride_qb=q.stride(0),
        stride_qh=q.stride(1),
        stride_qs=q.stride(2),
        stride_kb=k_strides[0],
        stride_kh=k_strides[1],
        stride_ks=k_strides[2],
        stride_vb=v_strides[0],
        stride_vh=v_strides[1],
        stride_vs=v_strides[2],
        stride_ob=out.stride(0),
        stride_oh=out.stride(1),
        stride_os=out.stride(2),
        stride_lb=lse_strides[0],
        stride_lh=lse_strides[1],
        stride_ib=kv_indices.stride(0),
        stride_ih=kv_indices.stride(1),
        stride_it=kv_indices.stride(2),
        stride_cb=kv_counts.stride(0),
        stride_ch=kv_counts.stride(1),
        stride_ct=kv_counts.stride(2),
        stride_fb=full.stride(0),
        stride_fh=full.stride(1),
        stride_ft=full.stride(2),
        stride_wb=sw_strides[0],
        stride_wh=sw_strides[1],
        stride_sb=ss_strides[0],
        stride_sh=ss_strides[1],
        stride_btb=bt.stride(0) if paged else 0,
        n_head_groups=hq // heads,
        group_size=group,
        layout_div=layout_div,
        n_q_rows=sq,
        n_layout_tiles=kv_indices.shape[2],
        qk_scale=float(scale) * _LOG2E,
        HEAD_DIM=d,
        HEAD_DV=dv,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        HEADS=heads,
        CAUSAL=bool(causal),
        HAS_WINDOW=has_window,
        STORE_LSE=lse is not None,
        PAGED=paged,
        PAGE_SIZE=page_size if paged else 1,
        DOT_FP32=interpret,
        IEEE_DOT=q.dtype == torch.float32,
        FLOOR_SHIFT=_FLOOR_SHIFT,
        num_warps=num_warps,
        num_stages=num_stages,
    )


def _check_pow2_block(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= 16 for the Triton kernel, got {value!r}")
    return value


def _check_int_tensor(t: object, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    return t


def _nonempty(t: torch.Tensor) -> torch.Tensor:
    """A tensor the kernel may hold a pointer to (never dereferenced when the original is empty)."""
    return t if t.numel() else torch.zeros(1, dtype=t.dtype, device=t.device).expand(t.shape)


def _host_lengths_check(
    q_lens: torch.Tensor, kv_lens: torch.Tensor, sq: int, skv: int, nt: int, block_q: int, causal: bool
) -> None:
    """Bounds that keep the kernel in memory; only when the lengths live on the host (no device sync)."""
    ql = q_lens.to(torch.int64)
    kl = kv_lens.to(torch.int64)
    if bool((ql < 0).any()) or bool((kl < 0).any()):
        raise ValueError("q_lens and kv_lens must be non-negative")
    if bool((ql > sq).any()) or bool((kl > skv).any()):
        raise ValueError(
            f"q_lens {ql.tolist()} / kv_lens {kl.tolist()} exceed the tensors' Sq={sq} / Skv={skv}"
        )
    if causal and bool((ql > kl).any()):
        raise ValueError("causal attention needs q_lens <= kv_lens in every row")
    q_start = kl - ql
    tiles = torch.where(
        ql > 0,
        torch.div(kl - 1, block_q, rounding_mode="floor")
        - torch.div(q_start, block_q, rounding_mode="floor")
        + 1,
        torch.zeros_like(ql),
    )
    if tiles.numel() and int(tiles.max()) > nt:
        raise ValueError(f"the lengths need {int(tiles.max())} query tiles of {block_q}; kv_indices has {nt}")


def _check_page_table(
    block_table: torch.Tensor, kv_lens: torch.Tensor, page_size: int, num_pages: int, capacity: int
) -> None:
    """Every page a row uses (``ceil(kv_len / page_size)`` of them) is in ``[0, num_pages)`` and
    ``kv_len <= capacity``. One host sync when the tensors are on a GPU; skipped during CUDA graph
    capture."""
    bt = block_table
    if bt.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return
    kl = kv_lens.to(device=bt.device, dtype=torch.int64)
    bad_len = (kl > capacity).any()
    need = (kl.clamp(0, capacity) + page_size - 1) // page_size  # [B] pages used
    used = torch.arange(bt.shape[1], device=bt.device)[None, :] < need[:, None]
    bad_page = (used & ((bt < 0) | (bt >= num_pages))).any()
    flags = torch.stack([bad_len, bad_page]).cpu().tolist()
    if flags[0]:
        raise ValueError(
            f"kv_lens {kv_lens.tolist()} exceed the paged cache's capacity "
            f"(block_table max_pages * page_size = {capacity})"
        )
    if flags[1]:
        raise ValueError(
            f"block_table has entries outside [0, num_pages={num_pages}) in the pages that kv_lens use"
        )


def block_sparse_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    full: torch.Tensor,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    *,
    block_q: int,
    block_k: int,
    causal: bool,
    sink_tokens: torch.Tensor | None = None,
    window_tokens: torch.Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    lse_out: torch.Tensor | None = None,
    heads_per_program: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    block_table: torch.Tensor | None = None,
    page_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Block-sparse attention forward over a BlockLayout's tensors.

    Shapes:
        q            [B, Hq, Sq, D]     fp16 / bf16 / fp32, any strides with a contiguous last dim
        k            [B, Hkv, Skv, D]   Hq % Hkv == 0 (GQA: query head h reads KV head h // (Hq // Hkv))
        v            [B, Hkv, Skv, Dv]  D, Dv <= 256 (64/80/96/128/256 and others, padded to a power of 2)
        kv_indices   [B, H, NT, MK]     int32/int64 key blocks per (row, layout head, query tile), ascending
        kv_counts    [B, H, NT]         how many slots of kv_indices are used
        full         [B, H, NT, MK]     bool: the block needs no element mask
        q_lens, kv_lens  [B]            int; row b's queries are q[b, :, :q_lens[b]] at absolute positions
                                        kv_lens[b] - q_lens[b] + i (bottom-right alignment)
        sink_tokens, window_tokens  [B, H] int64 or None (given together)
    H is 1, Hkv or Hq: query head h uses layout row 0, h // (Hq // Hkv) or h.
    ``block_q``/``block_k`` are powers of two >= 16. Query tile t of row b is the absolute query block
    ``(kv_len - q_len) // block_q + t``.

    Returns ``(out [B, Hq, Sq, Dv] in q.dtype, lse [B, Hq, Sq] float32 or None)``. Query rows beyond
    ``q_lens`` and rows that see no key get out 0 and lse -inf; NaN in an attended input propagates.
    ``out``/``lse_out`` may be given (preallocated, last dim contiguous); every element is written.
    ``heads_per_program`` (default: automatic) lets one program serve that many query heads of a GQA
    group when they share a layout row (layout heads 1 or Hkv), so each K/V block is loaded once for
    all of them; ``num_warps``/``num_stages`` override the tile config (benchmarks and tuning).
    fp32 inputs use full-precision (non-tf32) dots. Layout tensors on another device than q are copied
    to q's device on every call: keep them there. Runs on CUDA tensors, or on CPU tensors under
    ``TRITON_INTERPRET=1`` (tests only; every dot is done in fp32 there).

    Paged KV (vLLM V1 layout): with ``block_table [B, max_pages]`` (int32/int64) and ``page_size``,
    k/v are ``key_cache [num_pages, page_size, Hkv, D]`` / ``value_cache [num_pages, page_size, Hkv, Dv]``
    and logical key j of row b is at page ``block_table[b, j // page_size]``, slot ``j % page_size``
    (each key's page is looked up, so a key block may span several pages or part of one). ``block_k``
    must be a multiple of ``page_size`` or ``page_size`` a multiple of ``block_k`` (every key block
    covers whole pages or lies inside one). kv_lens must fit ``max_pages * page_size``; the pages each
    row uses (``ceil(kv_len / page_size)``) must be in ``[0, num_pages)``, checked on the host (one
    device sync unless the tensors are on the CPU; skipped during CUDA graph capture) -> ValueError.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, S, D], got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise ValueError(
                f"{name} must be float16, bfloat16 or float32 for the Triton kernel, got {t.dtype}"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"q, k and v must share a dtype, got q={q.dtype}, {name}={t.dtype}")
        if t.device != q.device:
            raise ValueError(f"q, k and v must be on one device, got q={q.device}, {name}={t.device}")
    interpret = _interpreting()
    if q.device.type != "cuda" and not interpret:
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got {q.device.type} tensors); use the torch backend on "
            "CPU, or set TRITON_INTERPRET=1 (tests only) to run the kernel in the Triton interpreter"
        )
    b, hq, sq, d = q.shape
    paged = block_table is not None
    num_pages = 0
    if paged:
        if page_size is None:
            raise ValueError("page_size is required with block_table")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
            raise ValueError(f"page_size must be a positive int, got {page_size!r}")
        num_pages, ps, hkv, dk = k.shape
        if ps != page_size or tuple(v.shape[:3]) != tuple(k.shape[:3]):
            raise ValueError(
                f"paged k/v must be [num_pages, page_size={page_size}, Hkv, D]; got k {tuple(k.shape)}, "
                f"v {tuple(v.shape)}"
            )
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2 or block_table.shape[0] != b:
            raise ValueError(
                f"block_table must be a tensor of shape [B={b}, max_pages], got "
                f"{tuple(getattr(block_table, 'shape', ())) or type(block_table).__name__}"
            )
        if block_table.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"block_table must be int32 or int64, got {block_table.dtype}")
        if kv_lens is None:
            raise ValueError("kv_lens is required with a paged cache (block_table)")
        skv = block_table.shape[1] * page_size  # the cache capacity of a row
    else:
        if page_size is not None:
            raise ValueError("page_size is only valid together with block_table")
        _, hkv, skv, dk = k.shape
    dv = v.shape[3]
    if dk != d:
        raise ValueError(f"q and k must share head_dim, got q={d}, k={dk}")
    if not paged and (tuple(v.shape[:3]) != (b, hkv, skv) or k.shape[0] != b):
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    for name, hd in (("head_dim", d), ("v head_dim", dv)):
        if not 1 <= hd <= MAX_HEAD_DIM:
            raise ValueError(f"{name}={hd} is not supported by the Triton kernel (1..{MAX_HEAD_DIM})")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(
                f"{name} must be contiguous in its last (head_dim) dimension, got strides {tuple(t.stride())}; "
                f"pass {name}.contiguous()"
            )
    block_q = _check_pow2_block(block_q, "block_q")
    block_k = _check_pow2_block(block_k, "block_k")
    if paged and block_k % page_size and page_size % block_k:
        raise ValueError(
            f"block_k={block_k} must be a multiple of page_size={page_size} or page_size a multiple of block_k"
        )
    if not isinstance(kv_indices, torch.Tensor) or kv_indices.dim() != 4:
        raise ValueError("kv_indices must be a 4-D tensor [B, H, NT, MK]")
    _, h_layout, nt, mk = kv_indices.shape
    if kv_indices.shape[0] != b:
        raise ValueError(f"kv_indices has batch {kv_indices.shape[0]}, q has {b}")
    if h_layout not in (1, hkv, hq):
        raise ValueError(f"the layout has {h_layout} heads; expected 1, Hkv={hkv} or Hq={hq}")
    _check_int_tensor(kv_indices, "kv_indices", (b, h_layout, nt, mk))
    _check_int_tensor(kv_counts, "kv_counts", (b, h_layout, nt))
    if (
        not isinstance(full, torch.Tensor)
        or full.dtype != torch.bool
        or tuple(full.shape) != (b, h_layout, nt, mk)
    ):
        raise ValueError(f"full must be a bool tensor of shape {(b, h_layout, nt, mk)}")
    _check_int_tensor(q_lens, "q_lens", (b,))
    _check_int_tensor(kv_lens, "kv_lens", (b,))
    if (sink_tokens is None) != (window_tokens is None):
        raise ValueError("sink_tokens and window_tokens must be given together")
    if window_tokens is not None:
        _check_int_tensor(sink_tokens, "sink_tokens", (b, h_layout))
        _check_int_tensor(window_tokens, "window_tokens", (b, h_layout))
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if q_lens.device.type == "cpu" and kv_lens.device.type == "cpu":
        _host_lengths_check(q_lens, kv_lens, sq, skv, nt, block_q, causal)
    if paged:
        _check_page_table(block_table, kv_lens, page_size, num_pages, skv)

    dev = q.device
    if out is None:
        out = torch.empty(b, hq, sq, dv, dtype=q.dtype, device=dev)
    elif (
        not isinstance(out, torch.Tensor)
        or tuple(out.shape) != (b, hq, sq, dv)
        or out.dtype != q.dtype
        or out.device != dev
        or (out.stride(-1) != 1 and dv > 1)
    ):
        raise ValueError(
            f"out must be a {q.dtype} tensor of shape {(b, hq, sq, dv)} on {dev}, last dim contiguous"
        )
    lse = None
    if return_lse:
        if lse_out is None:
            lse = torch.empty(b, hq, sq, dtype=torch.float32, device=dev)
        elif (
            not isinstance(lse_out, torch.Tensor)
            or tuple(lse_out.shape) != (b, hq, sq)
            or lse_out.dtype != torch.float32
            or lse_out.device != dev
            or (lse_out.stride(-1) != 1 and sq > 1)
        ):
            raise ValueError(
                f"lse_out must be a float32 tensor of shape {(b, hq, sq)} on {dev}, last dim contiguous"
            )
        else:
            lse = lse_out
    if out.numel() == 0 and (lse is None or lse.numel() == 0):
        return out, lse
    if b == 0 or hq == 0 or sq == 0:
        return out, lse

    def on_dev(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return t.to(device=dev, dtype=dtype or t.dtype, non_blocking=True)

    kv_indices = _nonempty(on_dev(kv_indices).contiguous())
    kv_counts = _nonempty(on_dev(kv_counts))
    full_u8 = _nonempty(on_dev(full).contiguous().view(torch.uint8))
    q_lens_d = on_dev(q_lens)
    kv_lens_d = on_dev(kv_lens)
    sink_d = window_d = None
    if window_tokens is not None:
        sink_d = on_dev(sink_tokens, torch.int64)
        window_d = on_dev(window_tokens, torch.int64)
    bt_d = None
    if paged:
        bt_d = _nonempty(on_dev(block_table).contiguous())
    # Grid: enough tiles for the layout's tiles and for clearing every padding row.
    grid_tiles = max(nt, triton.cdiv(sq, block_q))
    _launch_block_sparse_fwd(
        q=q,
        k=_nonempty(k),
        v=_nonempty(v),
        out=out,
        lse=lse,
        kv_indices=kv_indices,
        kv_counts=kv_counts,
        full=full_u8,
        q_lens=q_lens_d,
        kv_lens=kv_lens_d,
        sink=sink_d,
        window=window_d,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        scale=float(scale),
        grid_tiles=grid_tiles,
        interpret=interpret,
        heads_per_program=heads_per_program,
        num_warps=num_warps,
        num_stages=num_stages,
        block_table=bt_d,
        page_size=page_size or 1,
    )
    return out, lse

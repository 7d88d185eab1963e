"""Token-sparse attention over a TokenSelection in plain PyTorch (decode, and small query counts).

Only the selected keys are read: from contiguous K/V, or through a vLLM-style page table from a
paged cache, so a decode step touches O(selected) keys, never the whole context.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..token_selection import TokenSelection
from .common import accum_dtype, head_units, softmax_av

# (key positions [B, U, km] (valid everywhere), KV head of each unit [U]) -> (k_sel, v_sel) [B, U, km, D]
Gather = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# Above this many selected keys per head a decode step's matmul / softmax / matmul beats CPU SDPA,
# whose one-query flash kernel scales worse (the 64k decode rows of throughput-cpu-2026-12-01-b/-c.json
# against throughput-cpu-2026-12-01.json, bench/results/README.md)
SDPA_MAX_KEYS = 1024


def token_sparse_attention_torch(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    k: torch.Tensor,  # [B, Hkv, Skv, D]
    v: torch.Tensor,  # [B, Hkv, Skv, Dv]
    selection: TokenSelection,
    scale: float,
    causal: bool,
    q_lens: torch.Tensor,  # [B]
    kv_lens: torch.Tensor,  # [B]
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each query attends to its head's selected keys (plus log-weights). Returns out [B, Hq, Sq, Dv]
    and lse [B, Hq, Sq] (None unless ``need_lse``); rows outside q_lens, and rows with no selected
    key, are 0 with lse -inf."""
    b, hkv = k.shape[0], k.shape[1]
    selection = per_kv_head(selection, hkv)
    k_rows, k_step = key_rows(k)
    v_rows, v_step = key_rows(v)
    if k_step != v_step:  # K and V laid out differently (rare): both as contiguous copies
        k_rows, v_rows = k.reshape(-1, k.shape[-1]), v.reshape(-1, v.shape[-1])
        k_step = (k.shape[1] * k.shape[2], k.shape[2])
    batch_step, head_step = k_step

    def flat_rows(idx: torch.Tensor, kv_head: torch.Tensor) -> torch.Tensor:
        base = torch.arange(b, device=idx.device)[:, None] * batch_step + kv_head[None, :] * head_step  # [B, U]
        return (idx + base[..., None]).flatten()

    def gather(idx: torch.Tensor, kv_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # rows of k/v flattened to [B*Hkv*Skv, D]: one index_select instead of a 3-index gather
        if idx is selection.indices:
            # the selection's own indices, one per KV head: every layer of a step that shares the
            # selection (a static layout's) and the cache length reuses the flat rows
            cache = selection.__dict__.setdefault("_flat_rows", {})
            key = (b, hkv, k_step, idx.device)
            if key not in cache:
                cache.clear()
                cache[key] = flat_rows(idx, kv_head)
            flat = cache[key]
        else:
            flat = flat_rows(idx, kv_head)
        k_sel = k_rows.index_select(0, flat).view(*idx.shape, -1)
        v_sel = v_rows.index_select(0, flat).view(*idx.shape, -1)
        return k_sel, v_sel

    return _attend_selected(q, hkv, selection, scale, causal, q_lens, kv_lens, gather, need_lse)


def key_rows(t: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """``t`` [B, H, S, D] as a table of rows [R, D] without copying it when its rows are evenly
    strided (a contiguous cache, or a slice of a longer preallocated one such as a StaticCache's),
    and (rows per batch entry, rows per head): key j of (b, h) is row ``b * rb + h * rh + j``.
    A reshape would copy the whole cache of a sliced view on every call."""
    b, h, s, d = t.shape
    sb, sh, ss, sd = t.stride()
    rows_ok = sd == 1 and ss >= d and sb % ss == 0 and sh % ss == 0
    if not rows_ok or t.numel() == 0:
        return t.reshape(-1, d), (h * s, s)
    rb, rh = sb // ss, sh // ss
    count = (b - 1) * rb + (h - 1) * rh + s
    return t.as_strided((count, d), (ss, 1)), (rb, rh)


def _attend_selected(
    q: torch.Tensor,
    num_kv_heads: int,
    selection: TokenSelection,
    scale: float,
    causal: bool,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    gather: Gather,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The grouped fast path when the selection is one row per KV head (or one for all heads), the
    general per-unit path otherwise (per-query-head selections, e.g. MoA's)."""
    hkv = num_kv_heads
    if selection.num_heads == hkv:
        return _grouped_decode(q, hkv, selection, scale, causal, q_lens, kv_lens, gather, need_lse)
    return selected_attention(q, hkv, selection, scale, causal, q_lens, kv_lens, gather)


def per_kv_head(selection: TokenSelection, num_kv_heads: int) -> TokenSelection:
    """A selection shared by every head as one row per KV head (views, no copy); made once per
    selection, so the layers of a step that share it also share its derived gather rows."""
    if selection.num_heads != 1 or num_kv_heads == 1:
        return selection
    cached = selection.__dict__.get("_per_kv_head")
    if cached is None or cached.num_heads != num_kv_heads:
        b, lw = selection.batch_size, selection.log_weights
        cached = TokenSelection(
            selection.indices.expand(b, num_kv_heads, -1),
            selection.counts.expand(b, num_kv_heads),
            None if lw is None else lw.expand(b, num_kv_heads, -1),
        )
        selection.__dict__["_per_kv_head"] = cached
    return cached


@functools.lru_cache(maxsize=32)
def _kv_heads(num_kv_heads: int, device: torch.device) -> torch.Tensor:
    """arange(num_kv_heads) on ``device``, made once: the gather of a step whose flat rows are cached
    never reads it, and building it per layer call costs as much as a small op. A normal tensor even
    when first asked for under inference mode, so that later autograd calls may use it."""
    with torch.inference_mode(False):
        return torch.arange(num_kv_heads, device=device)


def _grouped_decode(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    hkv: int,
    selection: TokenSelection,  # one row per KV head, shared by its query heads
    scale: float,
    causal: bool,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    gather: Gather,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The common decode case (static layouts' decode selections, the dynamic methods' selections) in
    as few ops as it takes: a step runs this once per layer, so its fixed cost matters as much as the
    gather. The query heads of a KV head are consecutive, so they are a view of q and the result
    needs no reordering."""
    b, hq, sq, d = q.shape
    dev = q.device
    acc = accum_dtype(q.dtype)
    idx = selection.indices.to(dev, torch.int64)  # [B, Hkv, km]
    km = idx.shape[-1]
    counts = selection.counts.to(dev)
    lo = int(counts.min()) if counts.numel() else km
    # every slot used (static patterns' decode, most rows): no slot mask at all
    unused = None if lo == km else torch.arange(km, device=dev) >= counts[..., None]  # [B, Hkv, km]
    one_query = all(n == sq for n in q_lens.tolist()) and (not causal or sq == 1)
    gather_idx = idx if unused is None else idx.masked_fill(unused, 0)
    if one_query and lo > 0 and selection.log_weights is None and not need_lse and km <= SDPA_MAX_KEYS:
        # plain attention over the gathered keys: SDPA's fused kernel costs less than the matmul /
        # softmax / matmul chain on a few hundred keys
        k_sel, v_sel = gather(gather_idx, _kv_heads(hkv, dev))  # [B, Hkv, km, D]
        if unused is None:  # GQA without repeating K/V
            return F.scaled_dot_product_attention(q, k_sel, v_sel, scale=scale, enable_gqa=hq != hkv), None
        # heads that selected fewer keys than k_max (a block method's): every key is visible to the
        # one query, so a KV head's query heads are SDPA's queries over its keys, with one mask row
        mask = torch.zeros(unused.shape, dtype=q.dtype, device=dev).masked_fill_(unused, float("-inf"))
        qg = q.reshape(b, hkv, (hq // hkv) * sq, d)  # [B, Hkv, G*Sq, D]
        out = F.scaled_dot_product_attention(qg, k_sel, v_sel, attn_mask=mask[:, :, None, :], scale=scale)
        return out.view(b, hq, sq, -1), None
    k_sel, v_sel = gather(gather_idx, _kv_heads(hkv, dev))
    k_sel, v_sel = k_sel.to(acc), v_sel.to(acc)  # [B, Hkv, km, D], [B, Hkv, km, Dv]
    q_sel = q.reshape(b, hkv, (hq // hkv) * sq, d).to(acc) * scale  # [B, Hkv, G*Sq, D]
    scores = torch.matmul(q_sel, k_sel.transpose(-1, -2))  # [B, Hkv, G*Sq, km]
    if selection.log_weights is not None:
        scores.add_(selection.log_weights.to(dev, acc)[:, :, None, :])
    if one_query:
        # one real query per row at position kv_len - 1: every selected key (< kv_len) is visible
        if unused is not None:
            scores.masked_fill_(unused[:, :, None, :], float("-inf"))
    else:
        i = torch.arange(sq, device=dev)
        hidden = (i[None, :] >= q_lens.to(dev)[:, None]).repeat(1, hq // hkv)[:, None, :, None]
        if unused is not None:
            hidden = hidden | unused[:, :, None, :]
        if causal:
            pos = (kv_lens.to(dev) - q_lens.to(dev))[:, None] + i[None, :]  # [B, Sq] query positions
            hidden = hidden | (idx[:, :, None, :] > pos.repeat(1, hq // hkv)[:, None, :, None])
        scores.masked_fill_(hidden, float("-inf"))
    # with one visible query per row, a row sees no key only when its count is 0
    may_be_empty = lo == 0 or not one_query
    out, lse = softmax_av(scores, v_sel, need_lse=need_lse, may_be_empty=may_be_empty)  # [B, Hkv, G*Sq, Dv]
    return out.view(b, hq, sq, -1).to(q.dtype), None if lse is None else lse.view(b, hq, sq)


def paged_token_sparse_attention_torch(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    value_cache: torch.Tensor,  # [num_pages, page_size, Hkv, Dv]
    block_table: torch.Tensor,  # [B, max_pages]
    selection: TokenSelection,
    scale: float,
    causal: bool,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    need_lse: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """token_sparse_attention_torch over a paged cache: key j of row b is at page
    ``block_table[b, j // page_size]``, slot ``j % page_size``; only selected keys are gathered."""
    num_pages, page_size, hkv = key_cache.shape[0], key_cache.shape[1], key_cache.shape[2]
    selection = per_kv_head(selection, hkv)
    table = block_table.to(q.device, torch.int64)
    flat_ok = key_cache.is_contiguous() and value_cache.is_contiguous()

    def slot_rows(idx: torch.Tensor, kv_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        page_of = (idx // page_size).clamp(0, table.shape[1] - 1)
        pages = table.gather(1, page_of.flatten(1)).view_as(idx).clamp(0, num_pages - 1)
        return pages, idx % page_size

    def flat_rows(idx: torch.Tensor, kv_head: torch.Tensor) -> torch.Tensor:
        pages, slots = slot_rows(idx, kv_head)
        return ((pages * page_size + slots) * hkv + kv_head.view(1, -1, 1)).flatten()

    def gather(idx: torch.Tensor, kv_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if flat_ok:  # one index_select over [pages*page_size*Hkv, D] rows instead of a 3-index gather
            if idx is selection.indices:
                # the selection's own indices: the layers of a step sharing it and the step's block
                # table (kept alive by the cache, so its identity is a valid key) reuse the rows
                cache = selection.__dict__.setdefault("_paged_rows", {})
                hit = cache.get("rows")
                if hit is None or hit[0] is not block_table or hit[1] != (num_pages, page_size, hkv):
                    hit = cache["rows"] = (block_table, (num_pages, page_size, hkv), flat_rows(idx, kv_head))
                flat = hit[2]
            else:
                flat = flat_rows(idx, kv_head)
            k_sel = key_cache.view(-1, key_cache.shape[-1]).index_select(0, flat)
            v_sel = value_cache.view(-1, value_cache.shape[-1]).index_select(0, flat)
            return k_sel.view(*idx.shape, -1), v_sel.view(*idx.shape, -1)
        pages, slots = slot_rows(idx, kv_head)
        heads = kv_head.view(1, -1, 1).expand_as(idx)
        return key_cache[pages, slots, heads], value_cache[pages, slots, heads]

    return _attend_selected(q, hkv, selection, scale, causal, q_lens, kv_lens, gather, need_lse)


def selected_attention(
    q: torch.Tensor,
    num_kv_heads: int,
    selection: TokenSelection,
    scale: float,
    causal: bool,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    gather: Gather,
) -> tuple[torch.Tensor, torch.Tensor]:
    b, hq, sq, _ = q.shape
    dev = q.device
    acc = accum_dtype(q.dtype)
    units = head_units(hq, num_kv_heads, selection.num_heads)
    gq = units.group_size
    lrow = units.pattern_row.to(selection.indices.device)  # the selection may live on the host
    idx = selection.indices[:, lrow].to(dev, torch.int64)  # [B, U, km]
    kv_lens_d, q_lens_d = kv_lens.to(dev), q_lens.to(dev)
    used = selection.used()[:, lrow].to(dev) & (idx < kv_lens_d[:, None, None])
    k_sel, v_sel = gather(torch.where(used, idx, torch.zeros_like(idx)), units.kv_head.to(dev))
    k_sel, v_sel = k_sel.to(acc), v_sel.to(acc)  # [B, U, km, D], [B, U, km, Dv]
    q_sel = q[:, units.q_heads.to(dev)].to(acc).flatten(2, 3) * scale  # [B, U, gq*Sq, D]
    scores = torch.matmul(q_sel, k_sel.transpose(-1, -2))  # [B, U, gq*Sq, km]
    if selection.log_weights is not None:
        log_weights = selection.log_weights.to(dev, acc)[:, lrow.to(dev)]
        scores.add_(log_weights[:, :, None, :])
    i = torch.arange(sq, device=dev)
    row_ok = i[None, :] < q_lens_d[:, None]  # [B, Sq]
    allowed = used[:, :, None, :] & row_ok.repeat(1, gq)[:, None, :, None]
    if causal:
        pos = (kv_lens_d - q_lens_d)[:, None] + i[None, :]  # [B, Sq] absolute query positions
        allowed = allowed & (idx[:, :, None, :] <= pos.repeat(1, gq)[:, None, :, None])
    scores.masked_fill_(~allowed, float("-inf"))
    out, lse = softmax_av(scores, v_sel, need_lse=True)  # [B, U, gq*Sq, Dv], [B, U, gq*Sq]
    out = out.unflatten(2, (gq, sq)).flatten(1, 2)  # [B, Hq, Sq, Dv] in unit order
    lse = lse.unflatten(2, (gq, sq)).flatten(1, 2)
    order = units.q_heads.flatten().to(dev)
    result = torch.empty(b, hq, sq, out.shape[-1], dtype=q.dtype, device=dev)
    result[:, order] = out.to(q.dtype)
    lse_full = torch.empty(b, hq, sq, dtype=acc, device=dev)
    lse_full[:, order] = lse
    return result, lse_full

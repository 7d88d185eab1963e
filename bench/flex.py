"""FlexAttention baselines shared by the CPU and GPU benchmarks: a BlockMask built from a
BlockLayout (the identical blocks and element rule) and a compiled flex_attention whose
recompile-limit hit raises instead of silently falling back to eager flex (which materialises the
whole score matrix)."""

from __future__ import annotations

from typing import Any

import torch

# Every case (new BlockMask closure or length) recompiles; dynamo's default limit (8) is reached
# within one run.
FLEX_RECOMPILE_LIMIT = 128
_COMPILED_FLEX: Any = None


def _pack(idx: torch.Tensor, sel: torch.Tensor, n_kv_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pack the selected entries of ``idx`` (ascending) into [..., n_kv_blocks] int32."""
    num = sel.sum(-1)
    key = torch.where(sel, idx, idx + n_kv_blocks + 1)
    packed = torch.gather(idx, -1, key.argsort(dim=-1, stable=True))
    mk = idx.shape[-1]
    packed = torch.where(torch.arange(mk, device=idx.device) < num.unsqueeze(-1), packed, 0)
    out = torch.zeros(*idx.shape[:-1], n_kv_blocks, dtype=torch.int32, device=idx.device)
    w = min(mk, n_kv_blocks)
    out[..., :w] = packed[..., :w].to(torch.int32)
    return num.to(torch.int32), out


def layout_to_block_mask(
    layout: Any, num_heads: int, q_len: int, kv_len: int, device: str | torch.device = "cpu"
) -> Any:
    """A FlexAttention BlockMask over the same full/partial block lists as a BlockLayout, on ``device``.
    Partial blocks get the element rule (causal + the layout's sink/window) and the block table."""
    from torch.nn.attention.flex_attention import BlockMask

    idx = layout.kv_indices.to(device, torch.int64)
    counts = layout.kv_counts.to(device, torch.int64)
    full = layout.full.to(device)
    h = idx.shape[1]
    if h not in (1, num_heads):
        rep = num_heads // h
        idx, counts, full = (t.repeat_interleave(rep, dim=1) for t in (idx, counts, full))
    hh_div = 1 if idx.shape[1] == num_heads else num_heads  # table head of query head hh: hh // hh_div
    bq, bk = int(layout.block_q), int(layout.block_k)
    n_kv_blocks = -(-kv_len // bk)
    valid = torch.arange(idx.shape[-1], device=device) < counts.unsqueeze(-1)
    kv_num, kv_idx = _pack(idx, valid & ~full, n_kv_blocks)
    full_num, full_idx = _pack(idx, valid & full, n_kv_blocks)
    table = torch.zeros(*idx.shape[:3], n_kv_blocks + 1, dtype=torch.bool, device=device)
    table.scatter_(-1, torch.where(valid, idx, n_kv_blocks), True)
    table = table[..., :n_kv_blocks].contiguous()
    offset = kv_len - q_len
    q_block0 = offset // bq
    causal = bool(layout.causal)

    def _heads(t: Any) -> torch.Tensor | None:
        if t is None:
            return None
        t = t.to(device, torch.int64)
        return t.repeat_interleave(num_heads // t.shape[1], dim=1) if t.shape[1] != num_heads else t

    sink = _heads(layout.sink_tokens)
    window = _heads(layout.window_tokens)

    def mask_mod(b: Any, hh: Any, q_idx: Any, kv: Any) -> Any:
        p = q_idx + offset
        m = table[b, hh // hh_div, p // bq - q_block0, kv // bk]
        if causal:
            m = m & (kv <= p)
        if sink is not None and window is not None:
            w = window[b, hh]
            m = m & (((kv > p - w) & (kv < p + w)) | (kv < sink[b, hh]))
        return m

    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(bq, bk),
        mask_mod=mask_mod,
        seq_lengths=(q_len, kv_len),
        compute_q_blocks=False,
    )


def compiled_flex() -> Any:
    """``torch.compile(flex_attention)`` whose recompile-limit hit raises instead of falling back to
    eager flex (which materialises the whole score matrix)."""
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        import torch._dynamo.config as dynamo_config
        from torch.nn.attention.flex_attention import flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        settings = {
            name: value
            for name, value in (
                ("recompile_limit", FLEX_RECOMPILE_LIMIT),
                ("cache_size_limit", FLEX_RECOMPILE_LIMIT),
                ("fail_on_recompile_limit_hit", True),
            )
            if hasattr(dynamo_config, name)
        }

        def call(*args: Any, **kwargs: Any) -> Any:
            with dynamo_config.patch(**settings):
                return compiled(*args, **kwargs)

        _COMPILED_FLEX = call
    return _COMPILED_FLEX


# ----------------------------------------------------------------------------------------------
# rows

"""Test-side oracle for the attention kernels, written independently of ``sparse_attn.reference``.

Conventions (the pinned API): q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]``, right padding; row b's
keys are ``k[b, :, :kv_lens[b]]`` and its queries ``q[b, :, :q_lens[b]]``; query i of row b sits at the
absolute position ``kv_lens[b] - q_lens[b] + i`` (bottom-right causal alignment).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import torch

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- dense attention
def _repeat_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    group = num_heads // x.shape[1]
    return x.repeat_interleave(group, dim=1)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 dense attention with an explicit bool mask (True = attend).

    ``mask`` and ``bias`` (added to the scaled logits, e.g. per-key log-weights) broadcast to
    ``[B, Hq, Sq, Skv]``. GQA by repeating K/V. A row with no attended key gives out 0 and lse -inf.
    Returns ``(out [B, Hq, Sq, Dv] float64, lse [B, Hq, Sq] float64)``.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0 and v.shape[1] == Hkv and v.shape[2] == Skv
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    q64 = q.to(torch.float64)
    k64 = _repeat_kv(k.to(torch.float64), Hq)
    v64 = _repeat_kv(v.to(torch.float64), Hq)
    logits = torch.einsum("bhid,bhjd->bhij", q64, k64) * scale
    if bias is not None:
        logits = logits + bias.to(torch.float64)
    mask = mask.to(torch.bool).expand(B, Hq, Sq, Skv)
    logits = logits.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)  # -inf for rows without any attended key
    probs = torch.where(mask, torch.exp(logits - lse.unsqueeze(-1)), torch.zeros((), dtype=torch.float64))
    out = torch.einsum("bhij,bhjd->bhid", probs, v64)
    return out, lse


def lowp_dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    *,
    scale: float | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same dense masked attention done naively in the inputs' low precision.

    Like flash-attn's ``attention_ref(upcast=False)``: scores and P @ V in q.dtype, softmax statistics
    in float32. Its distance to :func:`dense_attention` is the yardstick for low-precision kernels.
    """
    B, Hq, Sq, D = q.shape
    Skv = k.shape[2]
    dtype = q.dtype
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    k_r, v_r = _repeat_kv(k, Hq), _repeat_kv(v, Hq)
    logits = torch.matmul((q * scale).to(dtype), k_r.transpose(-1, -2)).float()
    if bias is not None:
        logits = logits + bias.float()
    mask = mask.to(torch.bool).expand(B, Hq, Sq, Skv)
    logits = logits.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.where(mask, torch.exp(logits - lse.unsqueeze(-1)), torch.zeros(()))
    out = torch.matmul(probs.to(dtype), v_r)
    return out, lse


# ----------------------------------------------------------------------------- masks
def causal_mask(q_len: int, kv_len: int) -> torch.Tensor:
    """bool [q_len, kv_len]: key j visible to query i iff j <= kv_len - q_len + i."""
    pos = torch.arange(kv_len - q_len, kv_len).unsqueeze(1)
    return torch.arange(kv_len).unsqueeze(0) <= pos


def batch_mask_from_method(
    method,
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    Sq: int,
    Skv: int,
    num_heads: int,
    num_kv_heads: int,
    *,
    causal: bool,
    method_for_row: Callable[[int], object] | None = None,
) -> torch.Tensor:
    """bool [B, Hq, Sq, Skv] from per-row ``method.mask(q_lens[b], kv_lens[b], ...)``; padding False.

    ``method_for_row(b)``, when given, supplies the method to use for row b (e.g. a BlockSparse whose
    mask_fn is bound to that batch row). Sanity-checks the shape of ``mask()`` and, when causal, that
    it never attends a key in the future of the query (independent bottom-right causal check).
    """
    B = len(q_lens)
    full = torch.zeros(B, num_heads, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        ql, kl = int(q_lens[b]), int(kv_lens[b])
        if ql == 0 or kl == 0:
            continue
        m = (method_for_row(b) if method_for_row is not None else method).mask(
            ql, kl, num_heads, num_kv_heads, causal=causal
        )
        assert m.dtype == torch.bool and tuple(m.shape) == (num_heads, ql, kl), (m.dtype, m.shape)
        if causal:
            assert not (m & ~causal_mask(ql, kl)).any(), "method.mask() attends a future key"
        full[b, :, :ql, :kl] = m
    return full


def causal_batch_mask(q_lens, kv_lens, Sq, Skv, num_heads, *, causal: bool) -> torch.Tensor:
    """bool [B, Hq, Sq, Skv]: plain (dense) attention per row, padding excluded."""
    B = len(q_lens)
    full = torch.zeros(B, num_heads, Sq, Skv, dtype=torch.bool)
    for b in range(B):
        ql, kl = int(q_lens[b]), int(kv_lens[b])
        m = causal_mask(ql, kl) if causal else torch.ones(ql, kl, dtype=torch.bool)
        full[b, :, :ql, :kl] = m
    return full


def selection_mask_and_bias(
    indices: torch.Tensor,
    counts: torch.Tensor,
    log_weights: torch.Tensor | None,
    Sq: int,
    Skv: int,
    num_heads: int,
    kv_lens: Sequence[int],
    *,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense bool mask [B, Hq, Sq, Skv] and additive bias (float64) for a TokenSelection.

    Query head h uses selection head ``h // (Hq // H)``. Query i of row b is at position
    ``kv_lens[b] - Sq + i``; causal drops selected keys after it.
    """
    B, H, _ = indices.shape
    per = num_heads // H
    mask = torch.zeros(B, num_heads, Sq, Skv, dtype=torch.bool)
    bias = torch.zeros(B, num_heads, Sq, Skv, dtype=torch.float64)
    for b in range(B):
        kl = int(kv_lens[b])
        for h in range(num_heads):
            hs = h // per
            n = int(counts[b, hs])
            idx = indices[b, hs, :n].long()
            assert (idx < kl).all()
            mask[b, h, :, idx] = True
            if log_weights is not None:
                bias[b, h, :, idx] = log_weights[b, hs, :n].to(torch.float64)
        if causal:
            pos = torch.arange(kl - Sq, kl).unsqueeze(1)
            mask[b] &= (torch.arange(Skv).unsqueeze(0) <= pos).unsqueeze(0)
    return mask, bias


# ----------------------------------------------------------------------------- inputs / checks
def make_qkv(
    B: int,
    Hq: int,
    Hkv: int,
    Sq: int,
    Skv: int,
    D: int,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    q_lens: Sequence[int] | None = None,
    kv_lens: Sequence[int] | None = None,
    pad_scale: float = 50.0,
    Dv: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v (never zeros). Padded key/value positions (beyond kv_lens) hold large finite
    garbage (randn * pad_scale) so a kernel that reads padding gives a visibly wrong answer."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Sq, D, generator=g)
    k = torch.randn(B, Hkv, Skv, D, generator=g)
    v = torch.randn(B, Hkv, Skv, Dv or D, generator=g)
    if kv_lens is not None:
        for b, kl in enumerate(kv_lens):
            k[b, :, kl:] *= pad_scale
            v[b, :, kl:] *= pad_scale
    if q_lens is not None:
        for b, ql in enumerate(q_lens):
            q[b, :, ql:] *= pad_scale
    return q.to(dtype), k.to(dtype), v.to(dtype)


def assert_padding_rows(out: torch.Tensor, lse: torch.Tensor | None, q_lens: Sequence[int]) -> None:
    """Output rows beyond q_lens[b] are exactly 0 and their lse is -inf."""
    for b, ql in enumerate(q_lens):
        tail = out[b, :, ql:]
        assert torch.equal(tail, torch.zeros_like(tail)), f"padded query rows of batch row {b} are not 0"
        if lse is not None:
            lt = lse[b, :, ql:]
            assert bool((lt == NEG_INF).all()), f"padded query rows of batch row {b}: lse is not -inf"


def max_err(a: torch.Tensor, ref: torch.Tensor, where: torch.Tensor | None = None) -> float:
    """max |a - ref| over finite entries of ref (both upcast to float64); -inf == -inf counts as 0."""
    a64, r64 = a.to(torch.float64), ref.to(torch.float64)
    both_ninf = (a64 == NEG_INF) & (r64 == NEG_INF)
    diff = torch.where(both_ninf, torch.zeros((), dtype=torch.float64), (a64 - r64).abs())
    if where is not None:
        diff = diff[where]
    if diff.numel() == 0:
        return 0.0
    return float(diff.max())


def assert_close_lse(lse: torch.Tensor, ref: torch.Tensor, *, atol: float, rtol: float = 0.0) -> None:
    """lse equal to the reference; -inf exactly where the reference is -inf."""
    ninf_ref = ref == NEG_INF
    assert torch.equal(lse == NEG_INF, ninf_ref), "lse is -inf at different rows than the reference"
    torch.testing.assert_close(
        lse.to(torch.float64)[~ninf_ref], ref[~ninf_ref], atol=atol, rtol=rtol, msg=lambda m: "lse: " + m
    )


def peak_rss_kib() -> int:
    """VmHWM (peak resident set) of this process in KiB (Linux)."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

"""Correctness self-checks: a row is timed only after its kernel's output matched the float64
reference (a method that fails is reported ``failed-correctness`` without a time).

The tolerance is relative to the error of the same masked attention computed naively in the
benchmark's dtype (scores and PV in that dtype, softmax in fp32), at least a floor: 16x / 1e-5 for
fp32, 4x / 1e-3 for bf16 and fp16. Two kernels' outputs at the benchmark size (FlexAttention
against the sparse kernel) must agree within ``agree``.

Prefill and static-method checks run at a small shape (a dense float64 reference at 32k is out of
reach); a selection kernel is checked on the benchmark's own inputs against a float64 reference
over the selected keys only (gathered first, so the check costs what the selection does).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from . import harness

CHECK_SEED = 1234


@dataclass(frozen=True)
class Tolerance:
    factor: float  # times the naive low-precision attention's own error
    floor: float
    agree: float  # two kernels' outputs at the benchmark size


TOLERANCES = {
    torch.float32: Tolerance(16.0, 1e-5, 3.2e-4),
    torch.bfloat16: Tolerance(4.0, 1e-3, 5e-2),
    torch.float16: Tolerance(4.0, 1e-3, 5e-2),
}


def naive_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dtype: Any, bias: Any = None
) -> Any:
    """Dense masked attention with scores and PV in ``dtype`` (softmax in fp32, or fp64 for fp64);
    mask (and ``bias``, added to the scores) broadcastable to [B, Hq, Sq, Skv]; a row with no
    attended key gives 0. In float64 it is the reference of a biased selection (MagicPIG's weights)."""
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1).to(dtype)
    vv = v.repeat_interleave(group, dim=1).to(dtype)
    s = torch.matmul(q.to(dtype) * (1.0 / math.sqrt(q.shape[-1])), kk.transpose(-1, -2))
    s = s.to(torch.float64 if dtype == torch.float64 else torch.float32)
    if bias is not None:
        s = s + bias.to(s.device, s.dtype)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.matmul(p.to(dtype), vv)


def compare(
    outputs: Mapping[str, torch.Tensor], q: Any, k: Any, v: Any, mask: torch.Tensor, bias: Any = None
) -> dict[str, Any]:
    """Each output against the float64 reference with ``mask`` [B or 1, Hq, Sq, Skv] (and ``bias``
    added to the logits): ok, the worst error (NaN when an output has NaN), the tolerance and the
    low-precision yardstick."""
    from sparse_attn.reference import reference_attention

    mask = mask.to(q.device)
    if bias is None:
        ref, _ = reference_attention(q.double(), k.double(), v.double(), mask)
    else:
        ref = naive_attention(q.double(), k.double(), v.double(), mask, torch.float64, bias)
    base_err = _max_err(naive_attention(q, k, v, mask, q.dtype, bias), ref, nan=0.0)
    tol_rule = TOLERANCES[q.dtype]
    tol = max(tol_rule.factor * base_err, tol_rule.floor)
    errs = {name: _max_err(out, ref) for name, out in outputs.items()}
    worst = float("nan") if any(math.isnan(e) for e in errs.values()) else max(errs.values(), default=0.0)
    return {
        "ok": all(e <= tol for e in errs.values()),
        "shape": [q.shape[2], k.shape[2]],
        "max_abs_err": worst,
        "tol": tol,
        "base_err": base_err,
    }


def agreement(out: torch.Tensor, other: torch.Tensor, against: str) -> dict[str, Any]:
    """Two kernels' outputs at the benchmark size (``against`` names the other one)."""
    tol = TOLERANCES[out.dtype].agree
    err = _max_err(out, other)
    return {"ok": err <= tol, "against": against, "max_abs_err": err, "tol": tol}


def _max_err(out: torch.Tensor, ref: torch.Tensor, nan: float | None = None) -> float:
    diff = (out.double() - ref.double()).abs()
    if nan is not None:
        diff = diff.nan_to_num(nan)
    elif torch.isnan(diff).any():
        return float("nan")
    return float(diff.max()) if diff.numel() else 0.0


def check_dense(
    fn_for: Callable[[Any, Any, Any], Callable[[], torch.Tensor]], device: harness.Device, sq: int, skv: int
) -> dict[str, Any]:
    """A dense baseline at a small shape: causal for prefill (bottom-right aligned), every key for one
    decode query. ``fn_for(q, k, v)`` gives the call that is timed."""
    q, k, v = device.qkv(1, sq, skv, CHECK_SEED)
    i = torch.arange(sq).unsqueeze(1) + (skv - sq)
    mask = (torch.arange(skv).unsqueeze(0) <= i).expand(1, device.q_heads, sq, skv)
    return compare({"dense": fn_for(q, k, v)()}, q, k, v, mask)


def check_static(
    method: Any,
    fn_for: Callable[[Any, Any, Any, Any], Callable[[], torch.Tensor]],
    device: harness.Device,
    sq: int,
    skv: int,
) -> dict[str, Any]:
    """A static method at a small shape, against the reference with ``method.mask()``: the public
    ``sparse_attention`` and the timed kernel ``fn_for(q, k, v, layout)`` over ``method.plan()``."""
    import sparse_attn as sa

    q, k, v = device.qkv(1, sq, skv, CHECK_SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mask = method.mask(sq, skv, device.q_heads, device.kv_heads).unsqueeze(0)
        layout = method.plan(sq, skv, device.q_heads, device.kv_heads).to(device.type)
        outputs = {
            "sparse_attention": sa.sparse_attention(q, k, v, method),
            "kernel": fn_for(q, k, v, layout)(),
        }
    return {**compare(outputs, q, k, v, mask), "params": harness.method_params(method)}


def check_selection(out: torch.Tensor, q: Any, k: Any, v: Any, indices: Any, counts: Any) -> dict[str, Any]:
    """A kernel's output over a token selection (``indices`` [B, Hkv, K], ``counts`` [B, Hkv]; one
    query per row at the end of the cache) against the reference over the selected keys, gathered."""
    b, hkv, kmax = indices.shape
    idx = indices.long().unsqueeze(-1).expand(b, hkv, kmax, k.shape[-1])
    ks, vs = torch.gather(k, 2, idx), torch.gather(v, 2, idx)
    used = torch.arange(kmax, device=k.device) < counts.to(k.device).unsqueeze(-1)  # [B, Hkv, K]
    mask = used.repeat_interleave(q.shape[1] // hkv, dim=1).unsqueeze(2)  # [B, Hq, 1, K]
    return compare({"kernel": out}, q, ks, vs, mask)


def check_dynamic(method: Any, device: harness.Device, n: int) -> dict[str, Any]:
    """A content-based method's decode step at a small cache of ``n`` keys: the output of
    ``sparse_attention`` against the reference over the keys ``sparse_attn.select`` chose; with a
    budget that covers the row, against dense attention; for a method with side data, the store's
    step-by-step data against data computed from all keys at once."""
    import dataclasses

    import sparse_attn as sa
    from sparse_attn.side_data import ContiguousSideStore, compute_side_data

    q, k, v = device.qkv(1, 1, n, CHECK_SEED)
    sel = sa.select(method, q, k)
    mask = sel.to_dense_mask(n).to(q.device)  # [B, Hs, n]
    heads = device.q_heads // mask.shape[1]
    mask = mask.repeat_interleave(heads, dim=1).unsqueeze(2)
    bias = None
    if sel.log_weights is not None:  # MagicPIG's sample: each key's log-weight on its logit
        idx = sel.indices.masked_fill(~sel.used(), 0).to(torch.int64)
        weights = sel.log_weights.masked_fill(~sel.used(), 0).to(torch.float64)
        bias = torch.zeros(*sel.indices.shape[:2], n, dtype=torch.float64).scatter_(-1, idx.cpu(), weights.cpu())
        bias = bias.repeat_interleave(heads, dim=1).unsqueeze(2)
    selection = compare({"sparse_attention": sa.sparse_attention(q, k, v, method)}, q, k, v, mask, bias)
    checks: dict[str, Any] = {"selection": {**selection, "density": round(float(sel.density([n])), 5)}}
    full_budget = {"ok": True}
    if method.has_budget:  # a method whose sample size follows the data (MagicPIG) has no budget to fill
        full = dataclasses.replace(method, density=1.0, tokens=None)
        dense_mask = torch.ones(1, device.q_heads, 1, n, dtype=torch.bool)
        full_budget = compare({"sparse_attention": sa.sparse_attention(q, k, v, full)}, q, k, v, dense_mask)
        checks["full_budget_is_dense"] = full_budget
    side_ok = True
    if method.side_spec(device.head_dim) is not None:
        store = ContiguousSideStore(method)
        start = n - 40
        store.update(k[:, :, :start], torch.tensor([start]), new_tokens=start)
        for length in range(start + 1, n + 1):
            side = store.update(k[:, :, :length], torch.tensor([length]), new_tokens=1)
        want = compute_side_data(method, k, torch.tensor([n]))
        assert side is not None and want is not None
        units = want.shape[2]
        side_ok = bool(torch.equal(side[:, :, :units], want)) and store.rebuilds == 1
        checks["side_store_steps_equal_full_build"] = {"ok": side_ok, "steps": n - start}
    return {
        "ok": selection["ok"] and full_budget["ok"] and side_ok,
        "shape": [1, n],
        "params": harness.method_params(method),
        "checks": checks,
    }

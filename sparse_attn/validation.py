"""Argument checks shared by every entry point; each failure names the argument it is about."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ConfigError, DeviceError, DTypeError, ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class AttnShape:
    batch: int
    num_heads: int
    num_kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    v_head_dim: int

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


def check_qkv(q: object, k: object, v: object) -> AttnShape:
    """Check q [B, Hq, Sq, D], k [B, Hkv, Skv, D], v [B, Hkv, Skv, Dv] and return their sizes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise DTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ShapeError(
                f"{name} must have 4 dims [batch, heads, seq, head_dim], got shape {tuple(t.shape)}"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    assert isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise DTypeError(f"q, k and v must share a dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise DeviceError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    b, hq, sq, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ShapeError(f"batch size differs: q has {b}, k has {k.shape[0]}, v has {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ShapeError(f"k and v must have the same number of heads, got k={k.shape[1]}, v={v.shape[1]}")
    if v.shape[2] != k.shape[2]:
        raise ShapeError(f"k and v must have the same length, got k={k.shape[2]}, v={v.shape[2]}")
    if k.shape[3] != d:
        raise ShapeError(f"q and k must share head_dim, got q={d}, k={k.shape[3]}")
    hkv = k.shape[1]
    if hkv == 0 or hq % hkv != 0:
        raise ShapeError(f"q heads ({hq}) must be a positive multiple of k/v heads ({hkv})")
    return AttnShape(b, hq, hkv, sq, k.shape[2], d, v.shape[3])


def as_lengths(value: object, name: str, batch: int, default: int, upper: int) -> torch.Tensor:
    """Normalise an int, a sequence or a 1-D int tensor of per-row lengths to an int64 CPU tensor [batch]."""
    if value is None:
        return torch.full((batch,), default, dtype=torch.int64)
    if isinstance(value, bool):
        raise DTypeError(f"{name} must be an int or a [batch] integer sequence/tensor, got bool")
    if isinstance(value, int):
        lens = torch.full((batch,), value, dtype=torch.int64)
    elif isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.is_complex():
            raise DTypeError(f"{name} must be an integer tensor, got {value.dtype}")
        if value.dim() != 1 or value.shape[0] != batch:
            raise ShapeError(f"{name} must have shape [{batch}], got {tuple(value.shape)}")
        lens = value.detach().to("cpu", torch.int64)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise DTypeError(f"{name} must contain ints, got {list(value)!r}")
        if len(value) != batch:
            raise ShapeError(f"{name} must have {batch} entries (one per batch row), got {len(value)}")
        lens = torch.tensor(list(value), dtype=torch.int64)
    else:
        raise DTypeError(
            f"{name} must be an int or a [batch] integer sequence/tensor, got {type(value).__name__}"
        )
    if batch and (int(lens.min()) < 0 or int(lens.max()) > upper):
        raise ShapeError(f"{name} must lie in [0, {upper}], got {lens.tolist()}")
    return lens


def resolve_lengths(
    shape: AttnShape, q_lens: object, kv_lens: object, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (q_lens, kv_lens); q_lens defaults to min(Sq, kv_lens) (bottom-right aligned rows)."""
    if q_lens is None and kv_lens is None:
        # full rows (the common decode call): min(Sq, Skv) queries each, nothing to check
        b = shape.batch
        kvl = torch.full((b,), shape.kv_len, dtype=torch.int64)
        return torch.full((b,), min(shape.q_len, shape.kv_len), dtype=torch.int64), kvl
    kvl = as_lengths(kv_lens, "kv_lens", shape.batch, shape.kv_len, shape.kv_len)
    if q_lens is None:
        ql = torch.clamp(kvl, max=shape.q_len)
    else:
        ql = as_lengths(q_lens, "q_lens", shape.batch, shape.q_len, shape.q_len)
    if causal and bool((ql > kvl).any()):
        raise ShapeError(
            f"with causal=True every row needs q_lens <= kv_lens, got q_lens={ql.tolist()}, kv_lens={kvl.tolist()}"
        )
    return ql, kvl


def check_positive_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


def check_nonnegative_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name} must be a non-negative int, got {value!r}")
    return value


def check_scale(scale: object, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise DTypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)

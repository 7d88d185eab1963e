"""A float64 reference attention for whole-model checks of the HF integration.

Registered under its own attn_implementation name, it computes every layer's attention densely in
float64 with an explicit mask: per batch row, the method's own ``mask()`` (or the brute-force dense
mask for dense heads) over the row's real tokens, intersected with the model's sliding window. The
real tokens come from the padding the test built (``pads``), not from HF's 4D mask, so the reference
shares no mask reading with the code under test.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from bruteforce import dense_mask
from oracle import dense_attention

import sparse_attn

NAME = "sparse_attn_test_reference"
_ACTIVE: dict[str, Spec] = {}


@dataclass(frozen=True)
class Spec:
    config: sparse_attn.SparseAttentionConfig
    pads: tuple[int, ...]  # left padding of decoders, right padding of encoders
    causal: bool = True
    window: int | None = None


def _row_mask(spec: Spec, methods: list, q_len: int, kv_len: int, hq: int, hkv: int) -> torch.Tensor:
    per_method = {}
    heads = []
    for h, m in enumerate(methods):
        if m not in per_method:
            per_method[m] = (
                dense_mask(q_len, kv_len, hq, causal=spec.causal)
                if m is None
                else m.mask(q_len, kv_len, hq, hkv, causal=spec.causal)
            )
        heads.append(per_method[m][h])
    mask = torch.stack(heads)
    if spec.window is not None:
        p = torch.arange(q_len)[:, None] + kv_len - q_len
        j = torch.arange(kv_len)[None, :]
        mask = mask & (p - j < spec.window) & (j - p < spec.window)
    return mask


def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs: Any):
    spec = _ACTIVE["spec"]
    b_, hq, sq, _ = query.shape
    hkv, skv = key.shape[1], key.shape[2]
    methods = spec.config.methods_for_layer(module.layer_idx, hq)
    out = torch.zeros(b_, hq, sq, value.shape[-1], dtype=torch.float64)
    for b in range(b_):
        pad = spec.pads[b]
        if spec.causal:
            k0, k1 = pad, skv
            q0 = max(0, pad - (skv - sq))
            q1 = sq
        else:
            k0, k1, q0, q1 = 0, skv - pad, 0, sq - pad
        if q1 <= q0:
            continue
        mask = _row_mask(spec, methods, q1 - q0, k1 - k0, hq, hkv)
        o, _ = dense_attention(
            query[b : b + 1, :, q0:q1], key[b : b + 1, :, k0:k1], value[b : b + 1, :, k0:k1], mask[None],
            scale=scaling,
        )
        out[b, :, q0:q1] = o[0]
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@contextmanager
def reference(model, spec: Spec):
    """Run ``model`` with the reference attention inside the block."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    before = model.config._attn_implementation
    _ACTIVE["spec"] = spec
    model.set_attn_implementation(NAME)
    try:
        yield model
    finally:
        model.set_attn_implementation(before)
        _ACTIVE.pop("spec", None)

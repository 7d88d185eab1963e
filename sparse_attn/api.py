"""The functional API: plan (pattern -> format) and run (format -> attention) with backend dispatch."""

from __future__ import annotations

import importlib
import importlib.util
import logging

import torch
import torch.nn.functional as F

from .block_layout import BlockLayout
from .config import SparseAttentionConfig
from .env import BACKENDS, read_settings
from .errors import BackendError, ConfigError, LayoutError, ShapeError
from .fallback import GLOBAL_FALLBACKS
from .kernels import block_sparse_attention_torch, token_sparse_attention_torch
from .methods import Dense, DynamicMethod, Method
from .planning import dynamic_of, plan_heads, resolve_layer
from .side_data import check_side, compute_side_data
from .token_selection import TokenSelection
from .validation import AttnShape, check_qkv, check_scale, resolve_lengths

logger = logging.getLogger("sparse_attn")
_logged_choices: set[tuple[str, str]] = set()

Result = torch.Tensor | tuple[torch.Tensor, torch.Tensor]
Selection = TokenSelection | BlockLayout | None


def select_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """The kernel family for a call: "triton" for CUDA tensors when triton is installed, else "torch";
    ``backend`` or SPARSE_ATTN_BACKEND force one. Logged once per (choice, device type)."""
    if backend not in BACKENDS:
        raise BackendError(f"backend must be one of {BACKENDS}, got {backend!r}")
    settings = read_settings()
    choice = settings.backend if backend == "auto" else backend
    if choice == "auto":
        choice = (
            "triton" if device.type == "cuda" and importlib.util.find_spec("triton") is not None else "torch"
        )
    if choice == "triton":
        if device.type != "cuda" and not settings.triton_interpret:
            raise BackendError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1, for tests); got {device.type} "
                "tensors: use backend='torch' on CPU"
            )
        if importlib.util.find_spec("triton") is None:
            raise BackendError("backend='triton' needs the triton package: pip install 'sparse-attn[triton]'")
        if dtype == torch.float64:
            raise BackendError(
                "backend='triton' takes fp16/bf16/fp32 tensors; use backend='torch' for float64"
            )
    key = (choice, device.type)
    if key not in _logged_choices:
        _logged_choices.add(key)
        logger.info("sparse_attn: using the %s backend for %s tensors", choice, device.type)
    return choice


def _triton(module: str):
    return importlib.import_module(f"sparse_attn.triton_kernels.{module}")


def run_layout(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    scale: float,
    return_lse: bool,
    backend: str,
    block_table: torch.Tensor | None = None,
    page_size: int | None = None,
) -> Result:
    """Run a layout whose inputs were already checked (``block_sparse_attention`` is the public entry;
    this is the step the integrations call once per layer, with a layout they planned and validated
    for these shapes); with ``block_table``/``page_size`` (triton only) k/v are paged caches."""
    if backend == "triton":
        lay = layout.to(q.device)
        out, lse = _triton("block_sparse_fwd").block_sparse_fwd(
            q,
            k,
            v,
            lay.kv_indices,
            lay.kv_counts,
            lay.full,
            lay.q_lens,
            lay.kv_lens,
            block_q=lay.block_q,
            block_k=lay.block_k,
            causal=lay.causal,
            sink_tokens=lay.sink_tokens,
            window_tokens=lay.window_tokens,
            scale=scale,
            return_lse=return_lse,
            block_table=block_table,
            page_size=page_size,
        )
    elif q.shape[2] == 1 and block_table is None and layout.is_decode():
        # a decode step: the layout's keys as one gather per KV head (built once per layout, shared
        # by every layer of the step), not the prefill kernel's tile bookkeeping
        sel = layout.decode_selection()
        out, lse = token_sparse_attention_torch(
            q, k, v, sel, scale, layout.causal, layout.q_lens, layout.kv_lens, need_lse=return_lse
        )
    else:
        out, lse = block_sparse_attention_torch(q, k, v, layout, scale, need_lse=return_lse)
    return _finish(out, lse, return_lse)


def _finish(out: torch.Tensor, lse: torch.Tensor | None, return_lse: bool) -> Result:
    return (out, lse) if return_lse else out


def _dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: AttnShape,
    q_lens: torch.Tensor,
    kv_lens: torch.Tensor,
    causal: bool,
    scale: float,
    return_lse: bool,
    backend: str,
) -> Result:
    uniform = bool((q_lens == shape.q_len).all()) and bool((kv_lens == shape.kv_len).all())
    aligned = not causal or shape.q_len in (1, shape.kv_len)
    if uniform and aligned and not return_lse and shape.q_len and shape.kv_len:
        return F.scaled_dot_product_attention(
            q, k, v, is_causal=causal and shape.q_len > 1, scale=scale, enable_gqa=shape.group > 1
        )
    layout = Dense().plan(q_lens, kv_lens, shape.num_heads, shape.num_kv_heads, causal=causal)
    return run_layout(q, k, v, layout, scale, return_lse, backend)


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | SparseAttentionConfig | None,
    *,
    causal: bool = True,
    scale: float | None = None,
    return_lse: bool = False,
    q_lens: object = None,
    kv_lens: object = None,
    layer_idx: int = 0,
    side: torch.Tensor | None = None,
    backend: str = "auto",
) -> Result:
    """Sparse attention of q [B, Hq, Sq, D] over k, v [B, Hkv, Skv, D] with a pattern.

    ``method`` is a method config, a SparseAttentionConfig (resolved for ``layer_idx``) or None (dense).
    Causal alignment is bottom-right: query i of row b sits at position kv_lens[b] - q_lens[b] + i.
    Returns out [B, Hq, Sq, Dv] in q's dtype, and lse [B, Hq, Sq] when ``return_lse``. This plans on
    every call; to reuse a plan, call ``method.plan(...)`` once and ``block_sparse_attention`` many times.

    Dynamic methods (TopK, Quest) select from the content on every call: a call with one query per
    row (Sq == 1) is a decode step and runs a TokenSelection, a longer one a prefill. ``side`` passes
    precomputed side data (``sparse_attn.side_data``); without it it is computed from k.
    ``sparse_attn.select`` returns the selection this call makes.
    """
    shape = check_qkv(q, k, v)
    sc = check_scale(scale, shape.head_dim)
    ql, kvl = resolve_lengths(shape, q_lens, kv_lens, causal)
    chosen = select_backend(backend, q.device, q.dtype)
    methods = resolve_layer(method, layer_idx, shape.num_heads)
    if isinstance(method, SparseAttentionConfig) and shape.batch and int(kvl.max()) < method.min_seq_len:
        GLOBAL_FALLBACKS.record("min_seq_len", strict=method.strict)
        methods = [None] * shape.num_heads
    dynamic = dynamic_of(methods)
    if dynamic is not None:
        plan = _select(dynamic, q, k, shape, ql, kvl, causal, sc, side, chosen)
        if isinstance(plan, TokenSelection):
            # q, k, v and the lengths were checked above; a selector's output is valid by construction
            # (``built_for``), so this is a lookup, not a device-to-host check
            plan.validate(kvl)
            return run_token_selection(q, k, v, plan, sc, return_lse, causal, ql, kvl, chosen)
        layout = plan
    else:
        if side is not None:
            raise ConfigError("side: only dynamic methods (TopK, Quest, ...) take side data")
        layout = plan_heads(methods, ql, kvl, shape.num_kv_heads, causal)
    if layout is None:
        return _dense(q, k, v, shape, ql, kvl, causal, sc, return_lse, chosen)
    return run_layout(q, k, v, layout, sc, return_lse, chosen)


def select(
    method: DynamicMethod | SparseAttentionConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    q_lens: object = None,
    kv_lens: object = None,
    layer_idx: int = 0,
    side: torch.Tensor | None = None,
    backend: str = "auto",
) -> Selection:
    """The selection ``sparse_attention`` makes for a dynamic method (plan without running).

    Decode (Sq == 1): a TokenSelection [B, Hkv, k] (ascending key indices per KV head, shared by the
    GQA group). Prefill: the method's BlockLayout, the plan of its static ``prefill`` method, or None
    when its prefill is dense. Run them with ``token_sparse_attention`` / ``block_sparse_attention``.
    """
    shape = check_qkv(q, k, k)
    sc = check_scale(scale, shape.head_dim)
    ql, kvl = resolve_lengths(shape, q_lens, kv_lens, causal)
    dynamic = dynamic_of(resolve_layer(method, layer_idx, shape.num_heads))
    if dynamic is None:
        raise ConfigError(
            f"select needs a dynamic method (TopK, Quest, ...) for layer {layer_idx}, got {method!r}; "
            "static methods plan from lengths: method.plan(q_lens, kv_lens, num_heads, num_kv_heads)"
        )
    return _select(
        dynamic, q, k, shape, ql, kvl, causal, sc, side, select_backend(backend, q.device, q.dtype)
    )


def _select(
    method: DynamicMethod,
    q: torch.Tensor,
    k: torch.Tensor,
    shape: AttnShape,
    ql: torch.Tensor,
    kvl: torch.Tensor,
    causal: bool,
    scale: float,
    side: torch.Tensor | None,
    backend: str,
) -> Selection:
    method.check_fits(shape.num_heads, shape.num_kv_heads)
    if shape.q_len == 1:
        if side is None:
            side = compute_side_data(method, k, kvl)
        else:
            check_side(side, method, k)
        keys = k if method.needs_keys else None
        return method.select_decode(q, keys, side, kvl, ql, scale, causal, backend)
    if side is not None:
        check_side(side, method, k)
    layout = method.select_prefill(q, k, ql, kvl, scale, causal, backend)
    if layout is None and method.prefill is not None:
        layout = method.prefill.plan(ql, kvl, shape.num_heads, shape.num_kv_heads, causal=causal)
    return layout


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: BlockLayout,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Result:
    """Run attention over a planned BlockLayout (it carries causal, q_lens and kv_lens).

    q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D]; the layout's heads are 1, Hkv or Hq. Returns out
    [B, Hq, Sq, Dv] (and lse [B, Hq, Sq])."""
    shape = check_qkv(q, k, v)
    sc = check_scale(scale, shape.head_dim)
    if not isinstance(layout, BlockLayout):
        raise LayoutError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    layout.validate()
    layout.check_fits(shape.batch, shape.q_len, shape.kv_len, shape.num_heads, shape.num_kv_heads)
    chosen = select_backend(backend, q.device, q.dtype)
    return run_layout(q, k, v, layout, sc, return_lse, chosen)


def token_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: TokenSelection,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    causal: bool = True,
    q_lens: object = None,
    kv_lens: object = None,
    backend: str = "auto",
) -> Result:
    """Decode attention over a TokenSelection: each query attends to its head's selected keys.

    q [B, Hq, Sq, D] (Sq small: decode or speculative steps), k/v [B, Hkv, Skv, D]. Selected keys at
    positions after the query are dropped when causal. Combine with a dense part via merge_attention.
    """
    shape = check_qkv(q, k, v)
    sc = check_scale(scale, shape.head_dim)
    ql, kvl = resolve_lengths(shape, q_lens, kv_lens, causal)
    if not isinstance(selection, TokenSelection):
        raise LayoutError(f"selection must be a TokenSelection, got {type(selection).__name__}")
    if selection.batch_size != shape.batch:
        raise ShapeError(f"selection has batch {selection.batch_size}, q has {shape.batch}")
    if selection.num_heads not in (1, shape.num_kv_heads, shape.num_heads):
        raise ShapeError(
            f"selection has {selection.num_heads} heads; expected 1, num_kv_heads={shape.num_kv_heads} "
            f"or num_heads={shape.num_heads}"
        )
    selection.validate(kvl)
    if selection.indices.device != q.device and selection.indices.device.type != "cpu":
        raise LayoutError(f"selection is on {selection.indices.device}, q on {q.device}")
    chosen = select_backend(backend, q.device, q.dtype)
    return run_token_selection(q, k, v, selection, sc, return_lse, causal, ql, kvl, chosen)


def run_token_selection(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selection: TokenSelection,
    sc: float,
    return_lse: bool,
    causal: bool,
    ql: torch.Tensor,
    kvl: torch.Tensor,
    backend: str,
) -> Result:
    """Run a TokenSelection whose inputs were already checked (``token_sparse_attention`` is the
    public entry; this is the step the integrations call once per layer, without re-checking what
    their step already knows): ``backend`` is a ``select_backend`` choice."""
    if backend == "triton":
        out, lse = _triton("sparse_decode").token_decode(
            q,
            k,
            v,
            selection.indices.to(q.device),
            selection.counts.to(q.device),
            None if selection.log_weights is None else selection.log_weights.to(q.device, torch.float32),
            ql.to(q.device),
            kvl.to(q.device),
            causal=causal,
            scale=sc,
            return_lse=True,
        )
        return _finish(out, lse, return_lse)
    out, lse = token_sparse_attention_torch(q, k, v, selection, sc, causal, ql, kvl, need_lse=return_lse)
    return _finish(out, lse, return_lse)

"""Hugging Face transformers integration: ``patch(model, config)`` / ``unpatch(model)``.

Registration goes through transformers' own seams, never a copied forward: one attention function
under ``AttentionInterface`` (name "sparse_attn"), HF's ``sdpa_mask`` under the same name in
``AttentionMaskInterface`` (without it padding masks would reach the function as None), then
``model.set_attn_implementation("sparse_attn")``. Every model that routes attention through the
interface calls the function with q [B, Hq, Sq, D] and k/v [B, Hkv, Skv, D] after the cache update
and before any GQA repeat; the function returns ([B, Sq, Hq, D], None).

Per call: prefill vs decode follows from Sq vs Skv (bottom-right causal alignment, so a cached
decode step equals the matching row of a full forward); ``module.is_causal`` says causal (a None mask
then means plain causal); padding is read from the 4D mask (integrations/padding.py), left padding
is moved to the right for the kernels and back; a model's sliding window narrows the pattern
(methods/windowed.py). Plans are cached per patch and shared by every layer with the same methods
and lengths (plan once, run many). Anything the sparse path cannot express exactly runs the model's
original attention instead, counted per reason in ``stats(model)``; ``strict`` makes it an error.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import block_sparse_attention, run_layout, run_token_selection, select_backend
from ..artifact import ModelShape
from ..block_layout import BlockLayout
from ..config import SparseAttentionConfig
from ..errors import ConfigError
from ..fallback import FallbackCounter
from ..methods import Dense, DynamicMethod, StaticMethod
from ..methods.windowed import SinkOutsideWindowError, Windowed
from ..planning import dynamic_of, plan_heads
from ..presets import resolve_config
from ..side_data import ContiguousSideStore
from ..token_selection import TokenSelection
from ..validation import check_scale
from .padding import RowSpans, read_mask

ATTN_IMPLEMENTATION = "sparse_attn"
MIN_TRANSFORMERS = "5.0"

# model_type -> what was tested end to end (tests/test_hf_*.py). Other models that route attention
# through transformers' AttentionInterface can be tried with patch(..., allow_untested=True).
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "llama": "Llama 2/3, SmolLM2 (LlamaForCausalLM)",
    "mistral": "Mistral (sliding window)",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "gemma": "Gemma",
    "phi3": "Phi-3",
    "gpt_neox": "GPT-NeoX / Pythia",
    "bert": "BERT encoders (non-causal)",
}

# Attention kwargs whose non-default values change the math in ways the sparse kernels do not model.
UNSUPPORTED_KWARGS = ("softcap", "s_aux", "sinks", "position_bias")
PLAN_CACHE_SIZE = 64
MASK_CACHE_SIZE = 8

_PATCHES: weakref.WeakKeyDictionary[torch.nn.Module, SparsePatch] = weakref.WeakKeyDictionary()
_MODELS: weakref.WeakKeyDictionary[torch.nn.Module, SparsePatch] = weakref.WeakKeyDictionary()


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "sparse_attn.patch needs Hugging Face transformers: pip install 'sparse-attn[hf]'"
        ) from exc
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ImportError(
            f"sparse_attn.patch needs transformers >= {MIN_TRANSFORMERS} (AttentionInterface and "
            f"AttentionMaskInterface), found {transformers.__version__}"
        )
    return transformers


def register() -> None:
    """Register the attention and mask functions under "sparse_attn" (idempotent)."""
    _require_transformers()
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


@dataclass
class LayerState:
    """What the patch keeps for one layer: call counts, the last layout or decode selection (with the
    key counts it was made for, in right-padded row coordinates), a dynamic method's side-data
    ``store`` and ``data`` for methods that carry other state between calls; freed with the patch."""

    calls: int = 0
    sparse_calls: int = 0
    dense_crossovers: int = 0
    last_dense: bool = False
    last_layout: BlockLayout | None = None
    last_selection: TokenSelection | None = None
    last_kv_lens: torch.Tensor | None = None
    store: ContiguousSideStore | None = None
    data: dict[str, Any] = field(default_factory=dict)

    def density(self) -> float | None:
        """Measured density of the last call: 1 when it crossed over to dense, else its selection's,
        else its layout's."""
        if self.last_dense:
            return 1.0
        if self.last_selection is not None and self.last_kv_lens is not None:
            return self.last_selection.density(self.last_kv_lens)
        return None if self.last_layout is None else self.last_layout.density()


@dataclass(frozen=True)
class _ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int


class SparsePatch:
    """The handle ``patch`` returns; also a context manager that unpatches on exit."""

    def __init__(
        self, model: torch.nn.Module, config: SparseAttentionConfig, shape: _ModelShape, strict: bool
    ) -> None:
        self._model = weakref.ref(model)
        self.config = config
        self.shape = shape
        self.strict = strict
        self.original_implementation: str = model.config._attn_implementation
        self.fallbacks = FallbackCounter()
        self.calls: Counter[str] = Counter()
        self.layers: dict[int, LayerState] = {}
        self.active = False
        self._plans: OrderedDict[tuple[Any, ...], BlockLayout] = OrderedDict()
        self._masks: OrderedDict[tuple[Any, ...], tuple[Any, Any, RowSpans | str]] = OrderedDict()
        self._backends: dict[tuple[torch.device, torch.dtype], str] = {}
        # the config is frozen: each layer's methods are resolved (and checked) once per patch
        self._layer_methods: dict[tuple[int, int], list[Any] | None] = {}
        self._original_fn: Callable[..., Any] | None = None
        # crossover decisions depend only on the method (or plan) and the rows' lengths: made once per
        # forward, not once per layer
        self._crossings: OrderedDict[tuple[Any, ...], bool] = OrderedDict()

    # context manager --------------------------------------------------------------------------------
    def __enter__(self) -> SparsePatch:
        return self

    def __exit__(self, *exc: object) -> None:
        model = self._model()
        if model is not None and self.active:
            unpatch(model)

    @contextmanager
    def paused(self) -> Iterator[SparsePatch]:
        """Inside the block the model runs its own attention, as if unpatched, while this patch keeps
        its plans, side data and counts for when the block ends: A/B runs (dense next to sparse in
        one process, e.g. ``bench throughput --model``'s paired timing) without re-patching."""
        model = self._model()
        if model is None or not self.active:
            raise ConfigError("paused() needs an active patch: the model was unpatched or freed")
        model.set_attn_implementation(self.original_implementation)
        try:
            yield self
        finally:
            if self.active:
                model.set_attn_implementation(ATTN_IMPLEMENTATION)

    # stats ------------------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {
            "sparse_calls": self.calls["sparse"],
            "dense_calls": self.calls["dense"],
            "fallbacks": self.fallbacks.counts(),
            "prefill_by_design": self.calls["prefill_by_design"],
            "dense_crossover": self.calls["dense_crossover"],
            "layers": {
                i: {
                    "calls": s.calls,
                    "sparse_calls": s.sparse_calls,
                    "dense_crossovers": s.dense_crossovers,
                    "density": s.density(),
                    **({} if s.store is None else {"side_rebuilds": s.store.rebuilds}),
                }
                for i, s in sorted(self.layers.items())
            },
        }

    # the attention call -----------------------------------------------------------------------------
    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, None]:
        layer_idx = self._layer_of(module)
        state = self.layers.setdefault(layer_idx, LayerState())
        state.calls += 1
        methods = self._methods(layer_idx, query.shape[1])
        if methods is None:
            self.calls["dense"] += 1
            return self._original(module, query, key, value, attention_mask, dropout, scaling, kwargs)
        reason = _unsupported(dropout, kwargs)
        if reason is not None:
            return self._fallback(reason, module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if query.shape[2] == 1 and self._short(key.shape[2]):
            # no row holds more keys than the cache is long: cross over before reading the mask
            return self._dense_crossover(state, module, query, key, value, attention_mask, dropout, scaling, kwargs)
        is_causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        window = int(window) if window else None
        spans = self._spans(attention_mask, query, key, causal, window, kwargs.get("position_ids"))
        if isinstance(spans, str):
            return self._fallback(spans, module, query, key, value, attention_mask, dropout, scaling, kwargs)
        if spans.max_kv_len < self.config.min_seq_len:
            return self._fallback(
                "min_seq_len", module, query, key, value, attention_mask, dropout, scaling, kwargs
            )
        dynamic = dynamic_of(methods)
        if dynamic is not None:
            if window is not None and spans.max_kv_len > window:
                return self._fallback(
                    "dynamic_window", module, query, key, value, attention_mask, dropout, scaling, kwargs
                )
            args = (module, query, key, value, attention_mask, dropout, scaling, kwargs)
            return self._attend_dynamic(dynamic, state, spans, causal, args)
        if window is not None:
            block = next(m.block_size for m in methods if m is not None)
            methods = [Windowed(Dense(block_size=block) if m is None else m, window) for m in methods]
        try:
            layout = self._plan(methods, spans, key.shape[1], causal, query.device)
        except SinkOutsideWindowError:
            return self._fallback(
                "sink_outside_window", module, query, key, value, attention_mask, dropout, scaling, kwargs
            )
        if query.shape[2] == 1 and self._layout_crosses_over(layout, methods, spans, key.shape[1], causal):
            return self._dense_crossover(state, module, query, key, value, attention_mask, dropout, scaling, kwargs)
        q, k, v = spans.to_right_padded(query, key, value)
        # the layout was planned (and validated) for these spans: no second check per layer
        sc = check_scale(scaling, query.shape[-1])
        out = run_layout(q, k, v, layout, sc, False, self._backend(query))
        assert isinstance(out, torch.Tensor)
        out = spans.from_right_padded(out, query.shape[2])
        self.calls["sparse"] += 1
        state.sparse_calls += 1
        state.last_layout, state.last_dense = layout, False
        return out.transpose(1, 2).contiguous(), None

    def _attend_dynamic(
        self,
        method: DynamicMethod,
        state: LayerState,
        spans: RowSpans,
        causal: bool,
        args: tuple[Any, ...],
    ) -> tuple[torch.Tensor, Any]:
        """A content-based layer: decode selects from the side data (kept in the layer's store) or the
        keys; prefill runs the method's prefill selector, its static ``prefill`` method or the model's
        own attention (dense by design, counted as ``prefill_by_design``, not as a fallback)."""
        _, query, key, value, _, _, scaling, _ = args
        decode = query.shape[2] == 1
        if decode and self._crosses_over_at(method, spans):
            # the side data is left as it is: the first sparse step finds it stale and rebuilds it
            return self._dense_crossover(state, *args)
        sc = check_scale(scaling, query.shape[-1])
        backend = self._backend(query)
        q, k, v = spans.to_right_padded(query, key, value)
        if state.store is None or state.store.method != method:
            state.store = ContiguousSideStore(method)
        state.last_dense = False
        if decode:
            side = state.store.update(k, spans.kv_lens, new_tokens=1)
            keys = k if method.needs_keys else None
            sel = method.select_decode(q, keys, side, spans.kv_lens, spans.q_lens, sc, causal, backend)
            sel.validate(spans.kv_lens)  # a lookup: the selector built it for these lengths
            out = run_token_selection(q, k, v, sel, sc, False, causal, spans.q_lens, spans.kv_lens, backend)
            state.last_selection, state.last_kv_lens, state.last_layout = sel, spans.kv_lens, None
        else:
            # the next decode step rebuilds the side data from this prefill's keys
            state.store.reset()
            layout = method.select_prefill(q, k, spans.q_lens, spans.kv_lens, sc, causal, backend)
            if layout is None and method.prefill is not None:
                layout = self._plan(
                    [method.prefill] * query.shape[1], spans, key.shape[1], causal, query.device
                )
            if layout is None:
                self.calls["prefill_by_design"] += 1
                return self._original(*args)
            out = block_sparse_attention(q, k, v, layout.to(query.device), scale=sc)
            state.last_layout, state.last_selection = layout, None
        assert isinstance(out, torch.Tensor)
        out = spans.from_right_padded(out, query.shape[2])
        self.calls["sparse"] += 1
        state.sparse_calls += 1
        return out.transpose(1, 2).contiguous(), None

    def _backend(self, query: torch.Tensor) -> str:
        """The kernel family for this device and dtype, chosen once per patch (SPARSE_ATTN_BACKEND is
        read when a patch first meets them)."""
        key = (query.device, query.dtype)
        chosen = self._backends.get(key)
        if chosen is None:
            chosen = self._backends[key] = select_backend("auto", query.device, query.dtype)
        return chosen

    def _methods(self, layer_idx: int, num_heads: int) -> list[Any] | None:
        """The layer's method per query head, or None when the config keeps every head dense."""
        key = (layer_idx, num_heads)
        if key not in self._layer_methods:
            methods = self.config.methods_for_layer(layer_idx, num_heads)
            self._layer_methods[key] = None if all(m is None for m in methods) else methods
        return self._layer_methods[key]

    def _crosses_over(self, kept: torch.Tensor, spans: RowSpans) -> bool:
        """Whether a decode step keeping ``kept`` [B, H] of the rows' keys runs dense instead: every
        row shorter than ``dense_below``, or the batch's selected keys (its busiest head per row) above
        ``dense_above`` of its keys."""
        if self._short(spans.max_kv_len):
            return True
        limit = self.config.dense_above
        if limit is None or self.strict:
            return False
        total = sum(spans.lengths_key[1])
        return total > 0 and int(kept.amax(dim=1).sum()) > limit * total

    def _layout_crosses_over(
        self, layout: BlockLayout, methods: list[Any], spans: RowSpans, num_kv_heads: int, causal: bool
    ) -> bool:
        """``_crosses_over`` for a planned layout's decode selection (the plan is shared by the layers
        that plan alike, and so is the decision)."""
        return self._remember(
            ("layout", tuple(methods), num_kv_heads, causal, spans.lengths_key),
            lambda: self._crosses_over(layout.decode_selection().counts, spans),
        )

    def _crosses_over_at(self, method: DynamicMethod, spans: RowSpans) -> bool:
        """``_crosses_over`` for a dynamic method's budget (computed only when ``dense_above`` is set)."""
        if self._short(spans.max_kv_len):
            return True
        if self.config.dense_above is None or self.strict:
            return False
        return self._remember(
            ("budget", method, spans.lengths_key),
            lambda: self._crosses_over(method.budget(spans.kv_lens)[:, None], spans),
        )

    def _remember(self, key: tuple[Any, ...], decide: Callable[[], bool]) -> bool:
        hit = self._crossings.get(key)
        if hit is None:
            hit = self._crossings[key] = decide()
            while len(self._crossings) > PLAN_CACHE_SIZE:
                self._crossings.popitem(last=False)
        return hit

    def _short(self, max_kv_len: int) -> bool:
        """Whether rows of at most ``max_kv_len`` keys are below ``dense_below`` (never in strict mode)."""
        below = self.config.dense_below
        return bool(below) and not self.strict and max_kv_len < below

    def _dense_crossover(self, state: LayerState, *args: Any) -> tuple[torch.Tensor, Any]:
        self.calls["dense_crossover"] += 1
        state.dense_crossovers += 1
        state.last_dense = True
        return self._original(*args)

    def _layer_of(self, module: torch.nn.Module) -> int:
        layer_idx = getattr(module, "layer_idx", None)
        if isinstance(layer_idx, int) and not isinstance(layer_idx, bool):
            return layer_idx
        cfg = self.config
        if cfg.layers or cfg.heads or cfg.dense_layers:
            raise ConfigError(
                f"{type(module).__name__} has no layer_idx, so per-layer settings of the config cannot be "
                "applied to it; use a config with a single default method"
            )
        return 0

    def _spans(
        self,
        mask: torch.Tensor | None,
        query: torch.Tensor,
        key: torch.Tensor,
        causal: bool,
        window: int | None,
        position_ids: torch.Tensor | None,
    ) -> RowSpans | str:
        # Every layer of one forward gets the same mask object: read it once.
        cache_key = (id(mask), id(position_ids), causal, window, query.shape[2], key.shape[2])
        hit = self._masks.get(cache_key)
        if hit is not None and hit[0] is mask and hit[1] is position_ids:
            return hit[2]
        spans = read_mask(
            mask, query.shape[0], query.shape[2], key.shape[2], causal=causal, window=window,
            position_ids=position_ids,
        )
        self._masks[cache_key] = (mask, position_ids, spans)
        while len(self._masks) > MASK_CACHE_SIZE:
            self._masks.popitem(last=False)
        return spans

    def _plan(
        self,
        methods: list[StaticMethod | None] | list[StaticMethod],
        spans: RowSpans,
        num_kv_heads: int,
        causal: bool,
        device: torch.device,
    ) -> BlockLayout:
        key = (tuple(methods), num_kv_heads, causal, device, spans.lengths_key)
        layout = self._plans.get(key)
        if layout is not None:
            self._plans.move_to_end(key)
            return layout
        planned = plan_heads(methods, spans.q_lens, spans.kv_lens, num_kv_heads, causal)
        assert planned is not None  # at least one head is sparse
        layout = planned.validate().to(device)
        self._plans[key] = layout
        while len(self._plans) > PLAN_CACHE_SIZE:
            self._plans.popitem(last=False)
        return layout

    def _fallback(self, reason: str, *args: Any) -> tuple[torch.Tensor, Any]:
        self.fallbacks.record(reason, strict=self.strict)
        return self._original(*args)

    def _original(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        dropout: float,
        scaling: float | None,
        kwargs: dict[str, Any],
    ) -> tuple[torch.Tensor, Any]:
        """The model's own attention (the implementation it had before patching)."""
        fn = self._original_fn
        if fn is None:
            fn, mask = _original_function(
                self.original_implementation, module, mask, query.dtype, query.shape[2], key.shape[2]
            )
            if _is_registered(self.original_implementation):
                # a registered implementation takes the mask as it is: look it up once per patch
                self._original_fn = fn
        return fn(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _original_function(
    implementation: str,
    module: torch.nn.Module,
    mask: torch.Tensor | None,
    dtype: torch.dtype,
    q_len: int,
    kv_len: int,
) -> tuple[Callable[..., Any], torch.Tensor | None]:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _is_registered(implementation):
        return ALL_ATTENTION_FUNCTIONS[implementation], mask
    # "eager" lives in the model's own module and adds the mask to the scores: it needs the additive
    # form of the boolean mask that sdpa_mask built for us, and an explicit causal mask where
    # sdpa_mask returned None (sdpa's is_causal flag has no eager counterpart).
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        return ALL_ATTENTION_FUNCTIONS["sdpa"], mask
    if mask is None and getattr(module, "is_causal", True) and q_len > 1:
        pos = torch.arange(q_len)[:, None] + (kv_len - q_len)
        device = next(module.parameters()).device
        mask = (torch.arange(kv_len)[None, :] <= pos)[None, None].to(device)
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    return eager, mask


def _is_registered(implementation: str) -> bool:
    """Whether ``implementation`` is one of transformers' registered attention functions (not eager,
    which lives in each model's module, and not ours)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return implementation in ALL_ATTENTION_FUNCTIONS and implementation != ATTN_IMPLEMENTATION


def _unsupported(dropout: float, kwargs: dict[str, Any]) -> str | None:
    if dropout:
        return "dropout"
    if kwargs.get("output_attentions"):
        return "output_attentions"
    for name in UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return name
    return None


def sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """The function registered as attn_implementation "sparse_attn" (transformers' signature)."""
    patch_ = _PATCHES.get(module)
    if patch_ is None or not patch_.active:
        raise ConfigError(
            f"{type(module).__name__} uses attn_implementation='sparse_attn' but its model is not patched: "
            "call sparse_attn.patch(model, config) instead of setting the implementation by hand"
        )
    return patch_.attend(module, query, key, value, attention_mask, dropout, scaling, kwargs)


def _model_shape(model: torch.nn.Module) -> _ModelShape:
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if not isinstance(layers, int) or not isinstance(heads, int):
        raise ConfigError(
            f"cannot read num_hidden_layers / num_attention_heads from {type(cfg).__name__}"
        )
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return _ModelShape(layers, heads, int(kv_heads))


def _check_config(config: SparseAttentionConfig, shape: _ModelShape, model_shape: ModelShape) -> None:
    n = shape.num_layers
    if config.num_layers is not None and config.num_layers != n:
        raise ConfigError(f"config is for num_layers={config.num_layers}, the model has {n} layers")
    named = set(config.layers) | set(config.heads) | set(config.dense_layers)
    beyond = sorted(i for i in named if i >= n)
    if beyond:
        raise ConfigError(f"config names layers {beyond}, but the model has {n} layers (0..{n - 1})")
    for layer in range(n):
        for method in config.methods_for_layer(layer, shape.num_heads):
            if method is not None:
                method.check_fits(shape.num_heads, shape.num_kv_heads)
            if isinstance(method, DynamicMethod):
                method.check_model(model_shape)


def _check_architecture(model: torch.nn.Module, allow_untested: bool) -> None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise ConfigError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    model_type = getattr(model.config, "model_type", None)
    supported = ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())
    interface = bool(getattr(model, "_supports_attention_backend", False))
    if not interface or not model._can_set_attn_implementation():
        raise ConfigError(
            f"{type(model).__name__} (model_type={model_type!r}) does not route attention through "
            f"transformers' AttentionInterface, so it cannot be patched. Supported: {supported}"
        )
    if model_type not in SUPPORTED_ARCHITECTURES and not allow_untested:
        raise ConfigError(
            f"model_type {model_type!r} is not a supported architecture. Supported: {supported}. "
            "It does use transformers' AttentionInterface: pass allow_untested=True to try it."
        )


def patch(
    model: torch.nn.Module,
    method_or_config: object,
    *,
    strict: bool | None = None,
    allow_untested: bool = False,
) -> SparsePatch:
    """Make ``model`` use sparse attention in forward and generate; returns a handle (a context
    manager that unpatches on exit).

    ``method_or_config``: a method (``sparse_attn.S2()``), a SparseAttentionConfig, a preset name
    (see ``sparse_attn.presets.PRESETS``) or the path of a saved config .json. ``strict`` overrides the
    config's ``strict`` (any dense fallback raises DenseFallbackError). Patching an already patched
    model with an equal config returns the existing handle; with a different one it raises ConfigError
    (call ``unpatch`` first).
    """
    _require_transformers()
    config = resolve_config(method_or_config)
    _check_architecture(model, allow_untested)
    shape = _model_shape(model)
    _check_config(config, shape, ModelShape.from_hf_config(model.config))
    strict_mode = config.strict if strict is None else bool(strict)
    existing = _MODELS.get(model)
    if existing is not None and existing.active:
        if existing.config == config and existing.strict == strict_mode:
            return existing
        raise ConfigError("model is already patched with another config: call sparse_attn.unpatch(model) first")
    register()
    handle = SparsePatch(model, config, shape, strict_mode)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    for module in model.modules():
        _PATCHES[module] = handle
    _MODELS[model] = handle
    handle.active = True
    return handle


def unpatch(model: torch.nn.Module) -> None:
    """Restore the attention implementation the model had before ``patch``; ConfigError if unpatched."""
    handle = _MODELS.get(model)
    if handle is None or not handle.active:
        raise ConfigError("model is not patched with sparse_attn")
    model.set_attn_implementation(handle.original_implementation)
    for module in model.modules():
        if _PATCHES.get(module) is handle:
            del _PATCHES[module]
    del _MODELS[model]
    handle.active = False


def stats(model: torch.nn.Module) -> dict[str, Any]:
    """Call counts of a patched model: sparse calls, dense calls (layers the config keeps dense),
    fallbacks per reason, and per layer its calls and the density of its last layout."""
    handle = _MODELS.get(model)
    if handle is None:
        raise ConfigError("model is not patched with sparse_attn")
    return handle.stats()

"""sparse_attn: sparse attention for long-context LLM serving.

Patterns (S2, SinkLocal, MoA, BlockSparse, Dense) and content-based methods (TopK, Quest, Loki, MagicPIG) compile to two sparse formats (BlockLayout for
prefill, TokenSelection for decode) that the kernels execute. Importing this package has no side
effects: no CUDA calls, no environment writes, no optional dependency imports.
"""

from typing import Any

from .api import block_sparse_attention, select, sparse_attention, token_sparse_attention
from .block_layout import BlockLayout
from .config import SparseAttentionConfig
from .errors import (
    BackendError,
    ConfigError,
    CoverageWarning,
    DenseFallbackError,
    DeviceError,
    DTypeError,
    LayoutError,
    PlanFileError,
    ShapeError,
    SparseAttnError,
)
from .fallback import fallback_counts, reset_fallback_counts
from .merge import merge_attention
from .methods import (
    S2,
    BlockSparse,
    Dense,
    DynamicMethod,
    Loki,
    MagicPIG,
    MoA,
    Quest,
    SideSpec,
    SinkLocal,
    StaticMethod,
    TopK,
)
from .token_selection import TokenSelection

__version__ = "0.1.0"

__all__ = [
    "S2",
    "BackendError",
    "BlockLayout",
    "BlockSparse",
    "ConfigError",
    "CoverageWarning",
    "DTypeError",
    "Dense",
    "DenseFallbackError",
    "DeviceError",
    "DynamicMethod",
    "LayoutError",
    "Loki",
    "MagicPIG",
    "MoA",
    "PlanFileError",
    "Quest",
    "ShapeError",
    "SideSpec",
    "SinkLocal",
    "SparseAttentionConfig",
    "SparseAttnError",
    "StaticMethod",
    "TokenSelection",
    "TopK",
    "block_sparse_attention",
    "fallback_counts",
    "merge_attention",
    "patch",
    "reset_fallback_counts",
    "select",
    "sparse_attention",
    "stats",
    "token_sparse_attention",
    "unpatch",
]


def patch(model: Any, method_or_config: object, *, strict: bool | None = None, allow_untested: bool = False) -> Any:
    """Make a transformers model use sparse attention (see ``sparse_attn.integrations.hf.patch``).

    Needs transformers (``pip install 'sparse-attn[hf]'``), imported only when this is called."""
    from .integrations.hf import patch as _patch

    return _patch(model, method_or_config, strict=strict, allow_untested=allow_untested)


def unpatch(model: Any) -> None:
    """Restore a patched model's original attention (see ``sparse_attn.integrations.hf.unpatch``)."""
    from .integrations.hf import unpatch as _unpatch

    _unpatch(model)


def stats(model: Any) -> dict[str, Any]:
    """Sparse / dense / fallback call counts of a patched model (see ``sparse_attn.integrations.hf.stats``)."""
    from .integrations.hf import stats as _stats

    return _stats(model)

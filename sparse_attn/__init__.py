"""sparse_attn: sparse attention for long-context LLM serving.

Patterns (S2, SinkLocal, MoA, BlockSparse, Dense) compile to two sparse formats (BlockLayout for
prefill, TokenSelection for decode) that the kernels execute. Importing this package has no side
effects: no CUDA calls, no environment writes, no optional dependency imports.
"""

from .api import block_sparse_attention, sparse_attention, token_sparse_attention
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
from .methods import S2, BlockSparse, Dense, MoA, SinkLocal, StaticMethod
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
    "LayoutError",
    "MoA",
    "PlanFileError",
    "ShapeError",
    "SinkLocal",
    "SparseAttentionConfig",
    "SparseAttnError",
    "StaticMethod",
    "TokenSelection",
    "block_sparse_attention",
    "fallback_counts",
    "merge_attention",
    "reset_fallback_counts",
    "sparse_attention",
    "token_sparse_attention",
]

"""Typed errors: every bad input raises a subclass of ValueError or TypeError naming the argument."""

from __future__ import annotations


class SparseAttnError(Exception):
    """Base class of every error raised by sparse_attn."""


class ShapeError(SparseAttnError, ValueError):
    """A tensor has the wrong rank or a dimension that does not match another argument."""


class DTypeError(SparseAttnError, TypeError):
    """An argument has the wrong type or dtype."""


class DeviceError(SparseAttnError, ValueError):
    """Tensors that must live together are on different devices."""


class LayoutError(SparseAttnError, ValueError):
    """A BlockLayout or TokenSelection is malformed or does not fit the tensors."""


class ConfigError(SparseAttnError, ValueError):
    """A method configuration or SparseAttentionConfig is invalid."""


class PlanFileError(ConfigError):
    """A plan/calibration file (e.g. a MoA plan) is missing, unreadable or has the wrong shapes."""


class DenseFallbackError(SparseAttnError, RuntimeError):
    """Raised in strict mode where sparse attention would have fallen back to dense."""


class BackendError(SparseAttnError, ValueError):
    """An unknown or unavailable kernel backend was requested."""


class CoverageWarning(UserWarning):
    """A sharded pattern (S2) leaves some key blocks unseen by every head."""

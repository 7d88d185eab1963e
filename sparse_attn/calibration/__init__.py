"""Calibration of content-based methods from a model's keys (Loki bases; key means for MagicPIG).

Everything here imports transformers lazily: only a calibration run needs it."""

from .keys import KeyStats, collect_key_stats, key_means
from .loki import calibrate_loki, loki_tensors, principal_directions, token_windows

__all__ = [
    "KeyStats",
    "calibrate_loki",
    "collect_key_stats",
    "key_means",
    "loki_tensors",
    "principal_directions",
    "token_windows",
]

"""Calibration of content-based methods from a model's keys (Loki bases, MagicPIG centres).

Everything here imports transformers lazily: only a calibration run needs it."""

from .keys import KeyStats, collect_key_stats, collect_windows, key_means, token_windows
from .loki import calibrate_loki, loki_tensors, principal_directions
from .magicpig import calibrate_magicpig

__all__ = [
    "KeyStats",
    "calibrate_loki",
    "calibrate_magicpig",
    "collect_key_stats",
    "collect_windows",
    "key_means",
    "loki_tensors",
    "principal_directions",
    "token_windows",
]

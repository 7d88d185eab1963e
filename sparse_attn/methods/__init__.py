"""The pattern library: one module per method, all compiling to the shared sparse formats."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import StaticMethod
from .block_sparse import BlockSparse
from .dense import Dense
from .dynamic import DynamicMethod, SideSpec
from .loki import Loki
from .magicpig import MagicPIG
from .moa import MoA
from .quest import Quest
from .s2 import S2
from .sink_local import SinkLocal
from .topk import TopK

Method = StaticMethod | DynamicMethod

METHODS: dict[str, type[StaticMethod] | type[DynamicMethod]] = {
    cls.name: cls for cls in (Dense, SinkLocal, S2, MoA, BlockSparse, TopK, Quest, Loki, MagicPIG)
}


def method_from_dict(data: dict[str, Any]) -> Method:
    """Rebuild a method from ``to_dict()`` output; ConfigError for unknown names or parameters."""
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"a method entry must be an object with a 'method' key, got {data!r}")
    params = dict(data)
    name = params.pop("method")
    cls = METHODS.get(name)
    if cls is None:
        raise ConfigError(f"unknown method {name!r}; known methods: {sorted(METHODS)}")
    try:
        return cls.from_dict(params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for method {name!r}: {exc}") from exc


__all__ = [
    "METHODS",
    "S2",
    "BlockSparse",
    "Dense",
    "DynamicMethod",
    "Loki",
    "MagicPIG",
    "Method",
    "MoA",
    "Quest",
    "SideSpec",
    "SinkLocal",
    "StaticMethod",
    "TopK",
    "method_from_dict",
]

"""SparseAttentionConfig: which method each layer and head uses, with JSON save/load."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .methods import DynamicMethod, Method, StaticMethod, method_from_dict

SCHEMA_VERSION = 1


def _check_method(value: object, where: str) -> Method | None:
    if value is None or isinstance(value, (StaticMethod, DynamicMethod)):
        return value
    raise ConfigError(
        f"{where} must be a method config (S2, SinkLocal, TopK, Quest, ...) or None for dense, got {value!r}"
    )


def _check_index(value: object, where: str, limit: int | None) -> int:
    if isinstance(value, str) and value.lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where} must be a non-negative int, got {value!r}")
    if limit is not None and value >= limit:
        raise ConfigError(f"{where} is {value}, outside num_layers={limit}")
    return value


@dataclass(frozen=True)
class SparseAttentionConfig:
    """Per-layer, per-head choice of sparse method.

    Static methods mix freely across the heads of a layer; a dynamic method (TopK, Quest) serves
    every head of its layer (ConfigError otherwise) and mixes with static methods across layers.

    Resolution for (layer, head): a ``heads`` override, else a ``layers`` override, else dense when the
    layer is in ``dense_layers``, else ``default``. None means dense. Sequences shorter than
    ``min_seq_len`` keys run dense and count as a fallback; ``strict`` turns fallbacks into errors.

    ``dense_above`` is the decode crossover of the Hugging Face patch: a decode step whose plan keeps
    more than this fraction of a row's keys (a static layout's keys, a dynamic method's budget) runs
    the model's dense attention instead. It is exact (dense attends a superset) and, at such a
    density, faster: a gather over half the keys costs about what dense attention over all of them
    does. ``dense_below`` is its length twin: a decode step whose rows all hold fewer keys runs dense
    too, for the methods whose selection has a cost of its own (TopK's and Loki's scoring and top-k
    cost more than dense attention over a short row; see ``presets``). Both are counted per layer
    (``dense_crossover`` in ``stats``) and never apply in strict mode; None / 0: never.
    """

    default: Method | None = None
    layers: Mapping[int, Method | None] = field(default_factory=dict)
    heads: Mapping[int, Mapping[int, Method | None]] = field(default_factory=dict)
    dense_layers: tuple[int, ...] = ()
    min_seq_len: int = 0
    strict: bool = False
    num_layers: int | None = None
    dense_above: float | None = None
    dense_below: int = 0

    def __post_init__(self) -> None:
        n = self.num_layers
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n <= 0):
            raise ConfigError(f"num_layers must be a positive int or None, got {n!r}")
        _check_method(self.default, "default")
        if not isinstance(self.layers, Mapping):
            raise ConfigError(f"layers must be a mapping layer -> method, got {type(self.layers).__name__}")
        if not isinstance(self.heads, Mapping):
            raise ConfigError(
                f"heads must be a mapping layer -> {{head: method}}, got {type(self.heads).__name__}"
            )
        layers = {
            _check_index(k, "layers key", n): _check_method(m, f"layers[{k}]") for k, m in self.layers.items()
        }
        heads: dict[int, dict[int, Method | None]] = {}
        for k, per_head in self.heads.items():
            layer = _check_index(k, "heads key", n)
            if not isinstance(per_head, Mapping):
                raise ConfigError(f"heads[{k}] must be a mapping head -> method")
            heads[layer] = {
                _check_index(h, f"heads[{k}] key", None): _check_method(m, f"heads[{k}][{h}]")
                for h, m in per_head.items()
            }
        dense = tuple(_check_index(x, "dense_layers entry", n) for x in self.dense_layers)
        if (
            isinstance(self.min_seq_len, bool)
            or not isinstance(self.min_seq_len, int)
            or self.min_seq_len < 0
        ):
            raise ConfigError(f"min_seq_len must be a non-negative int, got {self.min_seq_len!r}")
        if not isinstance(self.strict, bool):
            raise ConfigError(f"strict must be a bool, got {self.strict!r}")
        d = self.dense_above
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 < d <= 1.0):
            raise ConfigError(f"dense_above must be a fraction in (0, 1] or None, got {d!r}")
        n = self.dense_below
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ConfigError(f"dense_below must be a non-negative int (keys), got {n!r}")
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "heads", heads)
        object.__setattr__(self, "dense_layers", dense)

    def method_for(self, layer_idx: int, head_idx: int) -> Method | None:
        per_head = self.heads.get(layer_idx, {})
        if head_idx in per_head:
            method = per_head[head_idx]
        elif layer_idx in self.layers:
            method = self.layers[layer_idx]
        elif layer_idx in self.dense_layers:
            method = None
        else:
            method = self.default
        return None if method is None else method.for_layer(layer_idx)

    def methods_for_layer(self, layer_idx: int, num_heads: int) -> list[Method | None]:
        """One entry per query head of the layer (None = dense)."""
        _check_index(layer_idx, "layer_idx", self.num_layers)
        extra = [h for h in self.heads.get(layer_idx, {}) if h >= num_heads]
        if extra:
            raise ConfigError(
                f"heads[{layer_idx}] names heads {extra}, but the layer has num_heads={num_heads}"
            )
        methods = [self.method_for(layer_idx, h) for h in range(num_heads)]
        dynamic = {m for m in methods if isinstance(m, DynamicMethod)}
        if dynamic and (len(dynamic) > 1 or any(m not in dynamic for m in methods)):
            raise ConfigError(
                f"layer {layer_idx} mixes a dynamic method ({sorted(m.name for m in dynamic)}) with other "
                "methods or dense heads: a dynamic method selects per KV head and keeps per-layer side "
                "data, so it must serve every head of its layer (mix methods across layers instead)"
            )
        return methods

    # JSON ---------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def enc(m: Method | None) -> dict[str, Any] | None:
            return None if m is None else m.to_dict()

        return {
            "schema_version": SCHEMA_VERSION,
            "default": enc(self.default),
            "layers": {str(k): enc(m) for k, m in self.layers.items()},
            "heads": {str(k): {str(h): enc(m) for h, m in v.items()} for k, v in self.heads.items()},
            "dense_layers": list(self.dense_layers),
            "min_seq_len": self.min_seq_len,
            "strict": self.strict,
            "num_layers": self.num_layers,
            "dense_above": self.dense_above,
            "dense_below": self.dense_below,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SparseAttentionConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"a config must be a JSON object, got {type(data).__name__}")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(f"schema_version must be {SCHEMA_VERSION}, got {version!r}")
        known = {
            "schema_version",
            "default",
            "layers",
            "heads",
            "dense_layers",
            "min_seq_len",
            "strict",
            "num_layers",
            "dense_above",
            "dense_below",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; expected some of {sorted(known)}")

        def dec(m: Any) -> Method | None:
            return None if m is None else method_from_dict(m)

        layers = data.get("layers", {}) or {}
        heads = data.get("heads", {}) or {}
        if not isinstance(layers, Mapping) or not isinstance(heads, Mapping):
            raise ConfigError("layers and heads must be JSON objects")
        for k, v in heads.items():
            if not isinstance(v, Mapping):
                raise ConfigError(f"heads[{k}] must be a JSON object head -> method")
        return cls(
            default=dec(data.get("default")),
            layers={k: dec(m) for k, m in layers.items()},
            heads={k: {h: dec(m) for h, m in v.items()} for k, v in heads.items()},
            dense_layers=tuple(data.get("dense_layers", ()) or ()),
            min_seq_len=data.get("min_seq_len", 0),
            strict=data.get("strict", False),
            num_layers=data.get("num_layers"),
            dense_above=data.get("dense_above"),
            dense_below=data.get("dense_below", 0),
        )

    def to_json(self, **kwargs: Any) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text: str) -> SparseAttentionConfig:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json(indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SparseAttentionConfig:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc}") from exc
        return cls.from_json(text)

"""Calibration artifacts (Loki bases, MagicPIG centres, Seer gates): safetensors + a JSON sidecar.

An artifact ``NAME`` is two files: ``NAME.safetensors`` (the tensors) and ``NAME.json`` (what they
are: the ``kind``, the model they were made for, the command that made them and method-specific
metadata). Loading checks the kind and, when the caller knows the model, its shape: an artifact made
for another model is a ``PlanFileError`` naming both. Never pickles: safetensors holds plain tensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, PlanFileError

FORMAT_VERSION = 1


@dataclass(frozen=True)
class ModelShape:
    """What an artifact must match: the architecture's attention shape."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelShape:
        """From a transformers config (its text config for multimodal models)."""
        cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
        layers = getattr(cfg, "num_hidden_layers", None)
        heads = getattr(cfg, "num_attention_heads", None)
        if not isinstance(layers, int) or not isinstance(heads, int):
            raise ConfigError(
                f"cannot read num_hidden_layers / num_attention_heads from {type(cfg).__name__}"
            )
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(str(getattr(cfg, "model_type", "")), layers, heads, kv_heads, int(head_dim))

    def describe(self) -> str:
        return (
            f"{self.model_type or 'model'} ({self.num_layers} layers, {self.num_heads} heads, "
            f"{self.num_kv_heads} KV heads, head_dim {self.head_dim})"
        )

    def key(self) -> str:
        """A short hash of the shape, for file names and quick comparisons."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True, eq=False)
class Artifact:
    """A loaded artifact: its tensors, the model it was made for and its sidecar metadata."""

    kind: str
    tensors: dict[str, torch.Tensor]
    model: ModelShape
    meta: dict[str, Any]
    path: Path


def resolve_artifact(name_or_path: str | Path, shipped: Mapping[str, str]) -> Path:
    """The .safetensors path of an artifact: a name in ``shipped`` (name -> file stem in
    ``sparse_attn/data``) or a path, with or without the .safetensors suffix, resolved."""
    if isinstance(name_or_path, str) and name_or_path in shipped:
        return (Path(__file__).resolve().parent / "data" / shipped[name_or_path]).with_suffix(".safetensors")
    path = Path(name_or_path).expanduser()
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    return path.resolve()


def _paths(path: str | Path) -> tuple[Path, Path]:
    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    return base.with_suffix(".safetensors"), base.with_suffix(".json")


def save_artifact(
    path: str | Path,
    kind: str,
    tensors: dict[str, torch.Tensor],
    model: ModelShape,
    command: str,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Write ``path``.safetensors and ``path``.json; returns the .safetensors path."""
    from safetensors.torch import save_file

    st_path, json_path = _paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(st_path))
    sidecar = {
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "model": asdict(model),
        "command": command,
        "tensors": {k: list(v.shape) for k, v in tensors.items()},
        "meta": meta or {},
    }
    json_path.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return st_path


def load_artifact(path: str | Path, kind: str, expect: ModelShape | None = None) -> Artifact:
    """Read an artifact written by ``save_artifact``; PlanFileError when a file is missing or
    malformed, when it holds another ``kind`` or (with ``expect``) was made for another model."""
    st_path, json_path = _paths(path)
    for p in (st_path, json_path):
        if not p.is_file():
            raise PlanFileError(f"{kind} artifact file not found: {p}")
    try:
        sidecar = json.loads(json_path.read_text())
        model = ModelShape(**sidecar["model"])
        found_kind = sidecar["kind"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise PlanFileError(f"{json_path} is not a sparse_attn artifact sidecar: {exc}") from exc
    if found_kind != kind:
        raise PlanFileError(f"{json_path} holds a {found_kind!r} artifact, expected {kind!r}")
    if expect is not None:
        check_model(model, expect, json_path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(st_path))
    except (SafetensorError, OSError) as exc:
        raise PlanFileError(f"cannot read {st_path}: {exc}") from exc
    return Artifact(found_kind, tensors, model, dict(sidecar.get("meta", {})), st_path)


def check_model(made_for: ModelShape, model: ModelShape, where: str | Path) -> None:
    """PlanFileError naming both shapes unless the artifact at ``where`` fits ``model`` (the
    model_type is compared only when both are known)."""
    same_type = not made_for.model_type or not model.model_type or made_for.model_type == model.model_type
    same_shape = (made_for.num_layers, made_for.num_heads, made_for.num_kv_heads, made_for.head_dim) == (
        model.num_layers,
        model.num_heads,
        model.num_kv_heads,
        model.head_dim,
    )
    if not (same_type and same_shape):
        raise PlanFileError(
            f"{where} was made for {made_for.describe()}, but the model is {model.describe()}"
        )

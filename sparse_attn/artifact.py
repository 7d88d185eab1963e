"""Calibration artifacts (Loki bases, MagicPIG centres, Seer gates): safetensors + a JSON sidecar.

An artifact ``NAME`` is two files: ``NAME.safetensors`` (the tensors) and ``NAME.json`` (what they
are: the ``kind``, the model they were made for, the command that made them and method-specific
metadata). Loading checks the kind and, when the caller knows the model, its shape: an artifact made
for another model is a ``PlanFileError`` naming both. Never pickles: safetensors holds plain tensors.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
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
    # what a method derives from the tensors once per loaded file (e.g. a layer's slice on a device)
    derived: dict[Any, Any] = field(default_factory=dict, repr=False)


def resolve_artifact(name_or_path: str | Path, shipped: Mapping[str, str]) -> Path:
    """The .safetensors path of an artifact: a name in ``shipped`` (name -> file stem in
    ``sparse_attn/data``) or a path, with or without the .safetensors suffix, resolved."""
    if isinstance(name_or_path, str) and name_or_path in shipped:
        return (Path(__file__).resolve().parent / "data" / shipped[name_or_path]).with_suffix(".safetensors")
    path = Path(name_or_path).expanduser()
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    return path.resolve()


_LOADED: dict[tuple[str, str], tuple[int, Artifact]] = {}  # (kind, path) -> (mtime, artifact)
_LOADED_LOCK = threading.Lock()


def load_cached(
    name_or_path: str | Path,
    shipped: Mapping[str, str],
    kind: str,
    check: Callable[[Artifact], None] | None = None,
) -> Artifact:
    """The ``kind`` artifact named by ``name_or_path`` (``resolve_artifact``), read once per file
    version (path and modification time) and shared by every method instance that names it; ``check``
    (the method's test of its tensors) runs once per read. PlanFileError naming the path when the file
    is missing or malformed. Callers check the model with ``check_model(art.model, ...)``."""
    path = resolve_artifact(name_or_path, shipped)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError as exc:
        raise PlanFileError(f"{kind} artifact file not found: {path}") from exc
    key = (kind, str(path))
    with _LOADED_LOCK:
        hit = _LOADED.get(key)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    art = load_artifact(path, kind)
    if check is not None:
        check(art)
    with _LOADED_LOCK:
        _LOADED[key] = (mtime, art)  # replaces an older version of the same file
    return art


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

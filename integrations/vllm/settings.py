"""Where the vLLM plugin finds its sparse config (vLLM-free, so the main test suite covers it).

``--additional-config '{"sparse_attn": SPEC}'`` (``LLM(additional_config=...)``) first, else the
``SPARSE_ATTN_CONFIG`` environment variable. SPEC is a config object (``SparseAttentionConfig.to_dict()``;
``schema_version`` may be left out), one method object (``{"method": "sink_local", ...}``: every layer
and head), a preset name or the path of a saved config; the environment variable may also hold the
JSON text itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache

from ...config import SCHEMA_VERSION, SparseAttentionConfig
from ...env import read_settings
from ...errors import ConfigError
from ...methods import method_from_dict
from ...presets import resolve_config

CONFIG_KEY = "sparse_attn"


def config_spec(vllm_config: object) -> object | None:
    """The raw sparse config of a vLLM config (or the environment), or None when there is none."""
    additional = getattr(vllm_config, "additional_config", None)
    if isinstance(additional, Mapping) and additional.get(CONFIG_KEY) is not None:
        return additional[CONFIG_KEY]
    return read_settings().vllm_config


def sparse_config(vllm_config: object) -> SparseAttentionConfig | None:
    """The parsed sparse config, or None (dense deployment: the plugin changes nothing)."""
    spec = config_spec(vllm_config)
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return _parse(json.dumps(spec, sort_keys=True))
    if isinstance(spec, str):
        return _parse(spec)
    raise ConfigError(
        f"additional_config[{CONFIG_KEY!r}] must be a config object, a preset name or a .json path, "
        f"got {type(spec).__name__}"
    )


@lru_cache(maxsize=16)
def _parse(text: str) -> SparseAttentionConfig:
    # Every attention layer asks; parse each distinct spec once per process.
    stripped = text.strip()
    if not stripped.startswith("{"):
        return resolve_config(stripped)
    try:
        data = json.loads(stripped)
    except ValueError as exc:
        raise ConfigError(f"the sparse_attn config is not valid JSON: {exc}") from exc
    if "method" in data:  # shorthand: one method for every layer and head
        return SparseAttentionConfig(default=method_from_dict(data))
    return SparseAttentionConfig.from_dict({"schema_version": SCHEMA_VERSION, **data})

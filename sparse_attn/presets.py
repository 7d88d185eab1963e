"""Named configurations for ``sparse_attn.patch(model, "<name>")`` (the defaults of each method)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .config import SparseAttentionConfig
from .errors import ConfigError
from .methods import S2, BlockSparse, Dense, DynamicMethod, Quest, SinkLocal, StaticMethod, TopK

# Decode crossovers of the presets (SparseAttentionConfig.dense_above), from the per-layer decode cost
# measured on the project's 2-core CPU: a static layout's gather + attention pays against dense SDPA
# below ~40% of the keys at 2k; Quest's selection (~1.5-2 ms per layer) only below ~15%.
STATIC_CROSSOVER = 0.4
QUEST_CROSSOVER = 0.15
# TopK scores every key before it attends its selection, so its decode step costs about what dense
# attention does plus a top-k: on that CPU it breaks even near 8k keys and pays from ~16k (kernel
# benchmark, "5% exact scores + top-k" decode rows); below, the preset runs dense (dense_below).
TOPK_CROSSOVER_TOKENS = 16384
# Quest's block bounds and top blocks likewise: its 5% decode rows read 0.65-1.06x dense at 8k and
# 1.1-2.3x at 16k (throughput-cpu-2026-11-30-dynamic-decode*.json, -2026-12-01-b/-c.json), and the
# SmolLM2 rows at 8,000 decoded at 0.90x (preset) and 0.85x (384 tokens) in the paired run.
QUEST_CROSSOVER_TOKENS = 16384

PRESETS: dict[str, Callable[[], SparseAttentionConfig]] = {
    # Every key through the sparse kernels: the dense-equivalent check of an integration.
    "dense": lambda: SparseAttentionConfig(default=Dense()),
    # StreamingLLM: 4 sink tokens + 1020-token window.
    "sink_local": lambda: SparseAttentionConfig(default=SinkLocal(), dense_above=STATIC_CROSSOVER),
    # S2-Attention at its defaults (16 local blocks, vertical stride 8), meant for models trained with it.
    "s2": lambda: SparseAttentionConfig(default=S2(), dense_above=STATIC_CROSSOVER),
    # Block-granular A-shape: the first block plus 16 local blocks of 64 keys.
    "a_shape": lambda: SparseAttentionConfig(
        default=BlockSparse(sink_blocks=1, local_blocks=16), dense_above=STATIC_CROSSOVER
    ),
    # Exact top-k at 5% of the keys (the accuracy ceiling of content-based selection), dense on rows
    # too short for its selection to pay.
    "topk": lambda: SparseAttentionConfig(default=TopK(), dense_below=TOPK_CROSSOVER_TOKENS),
    # Quest: 16-key blocks, 1024-token budget, dense prefill; dense decode on rows too short to pay.
    "quest": lambda: SparseAttentionConfig(
        default=Quest(), dense_above=QUEST_CROSSOVER, dense_below=QUEST_CROSSOVER_TOKENS
    ),
}


def resolve_config(spec: object) -> SparseAttentionConfig:
    """A SparseAttentionConfig from a config, a method, a preset name, a JSON file path or a dict."""
    if isinstance(spec, SparseAttentionConfig):
        return spec
    if isinstance(spec, (StaticMethod, DynamicMethod)):
        return SparseAttentionConfig(default=spec)
    if isinstance(spec, dict):
        return SparseAttentionConfig.from_dict(spec)
    if isinstance(spec, Path) or (isinstance(spec, str) and (spec.endswith(".json") or Path(spec).is_file())):
        return SparseAttentionConfig.load(spec)
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(
                f"unknown preset {spec!r}; presets are {sorted(PRESETS)} (or pass a method, a "
                "SparseAttentionConfig or the path of a saved config .json)"
            )
        return PRESETS[spec]()
    raise ConfigError(
        "expected a method (e.g. sparse_attn.S2()), a SparseAttentionConfig, a preset name "
        f"{sorted(PRESETS)} or a config .json path, got {type(spec).__name__}"
    )

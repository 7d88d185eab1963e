"""The benchmark's cases: which method configs are timed, on every device.

A case is a recipe: it builds a method config for any length, so the self-check can use the same
recipe at a small length (a sparse pattern there too) as well as the benchmarked config itself.
Adding a case here adds its rows to the CPU and the GPU runs alike.

The prefill patterns are SinkLocal, S2 and BlockSparse A-shape at each target density (the fraction
of causal pairs attended) and MoA at ~10%. ``PrefillRecipe`` holds the few knobs in which the two
devices' committed runs differ (the GPU's Llama-like shape uses a 64-token sink and sparser S2
shards), so a new run stays comparable with the committed ones of its device.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Case:
    method: str  # method name in the rows
    label: str  # short description for the tables
    target_density: float | None  # None: the method's selection size follows the data (MagicPIG)
    build: Callable[[int, int], Any]  # (kv length, block size) -> method config


def window_fraction(density: float) -> float:
    """Fraction x of N for a causal band of width xN with the given density (d = 2x - x^2)."""
    d = min(max(density, 0.0), 1.0)
    return 1.0 - math.sqrt(1.0 - d)


def n_blocks(n: int, block: int) -> int:
    return max(1, -(-n // block))


def cpu_s2_stride(density: float) -> int:
    """S2's vertical stride on CPU: 32/16/8 at 5/10/25% (shards take ~5/8 of the density)."""
    return next((vs for vs in (4, 8, 16, 32, 64, 128, 256) if 1.0 / vs <= 0.625 * density + 1e-12), 256)


def gpu_s2_stride(density: float) -> int:
    """S2's vertical stride on GPU: the smallest whose shards take at most a third of the target
    density (the local band takes the rest): 128 at 3%, 32 at 10%, 16 at 25%, 8 at 50%."""
    return next((vs for vs in (4, 8, 16, 32, 64, 128, 256) if 1.0 / vs <= density / 3 + 1e-12), 256)


@dataclass(frozen=True)
class PrefillRecipe:
    densities: tuple[float, ...]
    sink_tokens: int  # SinkLocal's sink
    s2_stride: Callable[[float], int]
    band_round_up: bool  # local bands of S2 / A-shape rounded up to whole blocks (CPU) or to nearest


CPU_PREFILL = PrefillRecipe((0.05, 0.10, 0.25), sink_tokens=4, s2_stride=cpu_s2_stride, band_round_up=True)
GPU_PREFILL = PrefillRecipe(
    (0.03, 0.10, 0.25, 0.50), sink_tokens=64, s2_stride=gpu_s2_stride, band_round_up=False
)
MOA_DENSITY = 0.10
LOKI_RANK = 24


def prefill_cases(
    recipe: PrefillRecipe, q_heads: int, densities: Sequence[float] | None = None
) -> list[Case]:
    """SinkLocal, S2 and BlockSparse A-shape at each density (default: the recipe's), then MoA."""
    import sparse_attn as sa

    ds = tuple(densities) if densities is not None else recipe.densities
    bias = 0.5 if recipe.band_round_up else 0.0

    def band(x: float, n: int, block: int) -> int:
        return max(1, round(x * n_blocks(n, block) + bias))

    def sink_local(d: float) -> Case:
        x = window_fraction(d)
        return Case(
            "sink_local",
            f"~{d:.0%} sink={recipe.sink_tokens} window={x:.4f}N",
            d,
            lambda n, block: sa.SinkLocal(
                sink_tokens=recipe.sink_tokens, window_tokens=max(1, round(x * n)), block_size=block
            ),
        )

    def s2(d: float) -> Case:
        vs = recipe.s2_stride(d)
        xr = window_fraction(max(0.0, (d - 1.0 / vs) / (1.0 - 1.0 / vs)))  # the band beside the shards
        return Case(
            "s2",
            f"~{d:.0%} vert_stride={vs}",
            d,
            lambda n, block: sa.S2(block_size=block, local_blocks=band(xr, n, block), vert_stride=vs),
        )

    def a_shape(d: float) -> Case:
        x = window_fraction(d)
        return Case(
            "block_sparse",
            f"~{d:.0%} A-shape sink_blocks=1",
            d,
            lambda n, block: sa.BlockSparse(block_size=block, sink_blocks=1, local_blocks=band(x, n, block)),
        )

    cases = [family(d) for family in (sink_local, s2, a_shape) for d in ds]
    # MoA: one layer, per-head spans alpha + beta*N spread around the ~10% band (length-elastic: the
    # same config at every length)
    x = window_fraction(MOA_DENSITY)
    betas = tuple(round(x * (0.6 + 0.8 * h / (q_heads - 1)), 5) for h in range(q_heads))
    alphas = tuple(64.0 for _ in range(q_heads))
    cases.append(
        Case(
            "moa",
            "~10% per-head spans",
            MOA_DENSITY,
            lambda n, block: sa.MoA(
                alphas=(alphas,), betas=(betas,), sink_tokens=64, min_span=64, block_size=block
            ).for_layer(0),
        )
    )
    return cases


def decode_cases(fraction: float) -> list[Case]:
    """The static methods planned to select ``fraction`` (1/m) of a decode cache."""
    import sparse_attn as sa

    m = round(1 / fraction)
    # S2 selects ~ L + (nb - L) / vs blocks: shards of stride 2m take half the budget, L = nb / (2m - 1)
    return [
        Case(
            "sink_local",
            f"1/{m} sink=4 window=N/{m}",
            fraction,
            lambda n, block: sa.SinkLocal(
                sink_tokens=4, window_tokens=max(1, round(n * fraction)), block_size=block
            ),
        ),
        Case(
            "s2",
            f"1/{m} vert_stride={2 * m} local=N/{2 * m - 1}",
            fraction,
            lambda n, block: sa.S2(
                block_size=block,
                local_blocks=max(1, round(n_blocks(n, block) / (2 * m - 1))),
                vert_stride=2 * m,
            ),
        ),
    ]


@functools.lru_cache(maxsize=4)
def loki_basis(kv_heads: int, head_dim: int) -> str:
    """A Loki artifact for the benchmark's random keys, written once per run to a temporary folder:
    the identity basis (random keys have no principal subspace, so every basis of one rank costs the
    same; the rows time Loki's work, not its accuracy). One layer of the benchmark's heads."""
    import tempfile

    import torch

    from sparse_attn.artifact import ModelShape, save_artifact

    eye = torch.eye(head_dim).expand(1, kv_heads, head_dim, head_dim)
    explained = (torch.arange(1, head_dim + 1) / head_dim).expand(1, kv_heads, head_dim)
    path = Path(tempfile.mkdtemp(prefix="sparse-attn-bench-")) / "loki_identity"
    shape = ModelShape("bench", 1, kv_heads, kv_heads, head_dim)
    command = "bench.cases.loki_basis (identity, for timing on random keys)"
    return str(save_artifact(path, "loki", {"basis": eye, "explained": explained}, shape, command))


def dynamic_cases(density: float, kv_heads: int, head_dim: int) -> list[Case]:
    """The content-based methods at ``density``, their selection inside every timed decode step."""
    import sparse_attn as sa

    return [
        Case(
            "topk", f"{density:.0%} exact scores + top-k", density, lambda n, block: sa.TopK(density=density)
        ),
        Case(
            "quest",
            f"{density:.0%} block bounds, 16-key blocks",
            density,
            lambda n, block: sa.Quest(density=density, block_size=16),
        ),
        # Loki at the rank SmolLM2's heads need for 90% of their key energy (median 24-26 of 64)
        Case(
            "loki",
            f"{density:.0%} low-rank scores (rank {LOKI_RANK} of 64) + top-k",
            density,
            lambda n, block: sa.Loki(density=density, rank=LOKI_RANK, basis=loki_basis(kv_heads, head_dim)).for_layer(0),
        ),
        # MagicPIG at the paper's defaults: its sample's size follows the data (density measured)
        Case(
            "magicpig",
            "K=10 L=150 LSH sample + 4 sinks + 64 local",
            None,
            lambda n, block: sa.MagicPIG(),
        ),
    ]

"""S2-Attention: per-head strided vertical shards plus a local band of blocks.

Query block i, key block j, KV head h (every query head of a GQA group shares its KV head's row, so
unvisited KV can be dropped), ``s = max(1, vert_stride // num_kv_heads)``: the block is visible iff
``i - j < local_blocks`` or ``(j + h*s + head_offset) % vert_stride == 0``, inside causal. The shards
of all heads together cover the full context only when the offsets ``h*s + head_offset`` hit every
residue mod vert_stride (or some heads are dense): ``covers_full_context`` says so, and planning
warns with CoverageWarning otherwise.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError, CoverageWarning
from ..validation import check_nonnegative_int, check_positive_int
from .base import StaticMethod


@dataclass(frozen=True)
class S2(StaticMethod):
    name: ClassVar[str] = "s2"
    block_size: int = 64
    local_blocks: int = 16
    vert_stride: int = 8
    head_offset: int = 0
    homo_head: bool = False
    num_dense_heads: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.block_size, "block_size")
        check_nonnegative_int(self.local_blocks, "local_blocks")
        check_positive_int(self.vert_stride, "vert_stride")
        check_nonnegative_int(self.head_offset, "head_offset")
        check_nonnegative_int(self.num_dense_heads, "num_dense_heads")
        if not isinstance(self.homo_head, bool):
            raise ConfigError(f"homo_head must be a bool, got {self.homo_head!r}")

    def stride(self, num_kv_heads: int) -> int:
        return max(1, self.vert_stride // num_kv_heads)

    def head_offsets(self, num_kv_heads: int) -> torch.Tensor:
        """Residue offset of each KV head's vertical shard, [num_kv_heads]."""
        h = torch.zeros(num_kv_heads, dtype=torch.int64) if self.homo_head else torch.arange(num_kv_heads)
        return (h * self.stride(num_kv_heads) + self.head_offset) % self.vert_stride

    def uncovered_residues(self, num_kv_heads: int) -> tuple[int, ...]:
        """Key-block residues (mod vert_stride) that no head's shard reaches beyond the local band."""
        check_positive_int(num_kv_heads, "num_kv_heads")
        if self.num_dense_heads > 0:
            return ()
        seen = {(-int(o)) % self.vert_stride for o in self.head_offsets(num_kv_heads)}
        return tuple(r for r in range(self.vert_stride) if r not in seen)

    def covers_full_context(self, num_kv_heads: int) -> bool:
        """True iff the union over heads sees every causal key block at any length."""
        return not self.uncovered_residues(num_kv_heads)

    def pattern_heads(self, num_heads: int, num_kv_heads: int) -> int:
        return num_kv_heads

    def check_fits(self, num_heads: int, num_kv_heads: int) -> None:
        if self.num_dense_heads > num_kv_heads:
            raise ConfigError(
                f"num_dense_heads ({self.num_dense_heads}) exceeds num_kv_heads ({num_kv_heads})"
            )
        missing = self.uncovered_residues(num_kv_heads)
        if missing:
            warnings.warn(
                f"S2 with vert_stride={self.vert_stride}, head_offset={self.head_offset}, "
                f"homo_head={self.homo_head} over {num_kv_heads} KV heads leaves key blocks with residues "
                f"{list(missing)} (mod vert_stride) unseen by every head outside the local band",
                CoverageWarning,
                stacklevel=3,
            )

    def block_visibility(
        self,
        q_blocks: torch.Tensor,
        kv_blocks: torch.Tensor,
        *,
        num_heads: int,
        num_kv_heads: int,
        kv_len: int,
        causal: bool,
        batch_index: int,
    ) -> torch.Tensor:
        diff = q_blocks[:, None] - kv_blocks[None, :]  # [nq, nk]
        local = (diff < self.local_blocks) if causal else (diff.abs() < self.local_blocks)
        offsets = self.head_offsets(num_kv_heads)[:, None, None]  # [Hkv, 1, 1]
        vertical = (kv_blocks[None, None, :] + offsets) % self.vert_stride == 0  # [Hkv, 1, nk]
        dense = torch.arange(num_kv_heads) >= num_kv_heads - self.num_dense_heads
        return local[None] | vertical | dense[:, None, None]

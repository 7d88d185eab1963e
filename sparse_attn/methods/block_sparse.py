"""Block-sparse attention from an explicit block layout, a block-level ``mask_fn``, and/or block sinks
plus a local band of blocks (the block-granular A-shape). Visibility is their union, inside causal."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import ConfigError, LayoutError
from ..validation import check_nonnegative_int, check_positive_int
from .base import StaticMethod

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class BlockSparse(StaticMethod):
    """``layout``: bool [n_q_blocks, n_kv_blocks] or [H, n_q_blocks, n_kv_blocks] over absolute blocks
    (H = num_heads or num_kv_heads). ``mask_fn(b, h, q_block, kv_block)`` receives broadcastable int64
    tensors (h a query head) and returns bool, like FlexAttention's mask_mod at block granularity."""

    name: ClassVar[str] = "block_sparse"
    block_size: int = 64
    layout: torch.Tensor | None = None
    mask_fn: MaskFn | None = None
    sink_blocks: int = 0
    local_blocks: int = 0

    def __post_init__(self) -> None:
        check_positive_int(self.block_size, "block_size")
        check_nonnegative_int(self.sink_blocks, "sink_blocks")
        check_nonnegative_int(self.local_blocks, "local_blocks")
        if self.layout is not None:
            lay = self.layout
            if not isinstance(lay, torch.Tensor):
                lay = torch.as_tensor(lay)
            if lay.dtype != torch.bool or lay.dim() not in (2, 3):
                raise ConfigError(
                    f"layout must be a bool tensor [n_q_blocks, n_kv_blocks] or [H, n_q_blocks, n_kv_blocks], "
                    f"got {lay.dtype} with shape {tuple(lay.shape)}"
                )
            object.__setattr__(self, "layout", lay.detach().cpu())
        if self.mask_fn is not None and not callable(self.mask_fn):
            raise ConfigError("mask_fn must be callable (b, h, q_block, kv_block) -> bool tensor")
        if self.layout is None and self.mask_fn is None and not self.sink_blocks and not self.local_blocks:
            raise ConfigError("BlockSparse needs a layout, a mask_fn, sink_blocks or local_blocks")

    def _key(self) -> tuple[object, ...]:
        lay = None if self.layout is None else (tuple(self.layout.shape), self.layout.numpy().tobytes())
        return (self.block_size, self.sink_blocks, self.local_blocks, self.mask_fn, lay)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BlockSparse) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def to_dict(self) -> dict[str, Any]:
        if self.mask_fn is not None:
            raise ConfigError("a BlockSparse with a mask_fn cannot be serialised; use an explicit layout")
        return super().to_dict() | {"mask_fn": None}

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> BlockSparse:
        params = dict(params)
        if params.get("layout") is not None:
            params["layout"] = torch.tensor(params["layout"], dtype=torch.bool)
        return cls(**params)

    def _layout_heads(self) -> int:
        return 1 if self.layout is None or self.layout.dim() == 2 else int(self.layout.shape[0])

    def pattern_heads(self, num_heads: int, num_kv_heads: int) -> int:
        if self.mask_fn is not None:
            return num_heads
        return self._layout_heads()

    def check_fits(self, num_heads: int, num_kv_heads: int) -> None:
        if self._layout_heads() not in (1, num_kv_heads, num_heads):
            raise ConfigError(
                f"layout has {self._layout_heads()} heads; expected num_heads={num_heads} or "
                f"num_kv_heads={num_kv_heads} (or a 2-D layout shared by all heads)"
            )

    def _batch_dependent(self) -> bool:
        return self.mask_fn is not None

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
        h = self.pattern_heads(num_heads, num_kv_heads)
        vis = torch.zeros(h, len(q_blocks), len(kv_blocks), dtype=torch.bool)
        if self.layout is not None:
            lay = self.layout if self.layout.dim() == 3 else self.layout[None]
            nq, nk = lay.shape[-2:]
            if len(q_blocks) and (int(q_blocks.max()) >= nq or int(kv_blocks.max()) >= nk):
                raise LayoutError(
                    f"layout covers {nq} x {nk} blocks of {self.block_size}; the lengths need "
                    f"{int(q_blocks.max()) + 1} x {int(kv_blocks.max()) + 1}"
                )
            sub = lay[:, q_blocks][:, :, kv_blocks]
            if sub.shape[0] != h:
                sub = (
                    sub.repeat_interleave(h // sub.shape[0], dim=0)
                    if sub.shape[0] > 1
                    else sub.expand(h, -1, -1)
                )
            vis |= sub
        if self.mask_fn is not None:
            res = self.mask_fn(
                torch.tensor(batch_index),
                torch.arange(num_heads)[:, None, None],
                q_blocks[None, :, None],
                kv_blocks[None, None, :],
            )
            if not isinstance(res, torch.Tensor) or res.dtype != torch.bool:
                raise ConfigError("mask_fn must return a bool tensor")
            vis |= torch.broadcast_to(res, vis.shape)
        diff = q_blocks[:, None] - kv_blocks[None, :]
        if self.sink_blocks:
            vis |= (kv_blocks < self.sink_blocks)[None, None, :]
        if self.local_blocks:
            local = (diff >= 0) & (diff < self.local_blocks) if causal else diff.abs() < self.local_blocks
            vis |= local[None]
        return vis

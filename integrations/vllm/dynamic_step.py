"""One step of a layer that runs a dynamic method (TopK, Quest, ...) over the paged cache, without vLLM.

Unlike static plans, which depend on lengths alone and are shared by every layer of a step, a
dynamic selection depends on the layer's queries and keys: it is made per layer and per row group,
never cached on the step. A selection is per KV head (the GQA group shares it), so a rank of a
tensor-parallel model selects on its own KV heads and their query heads directly; that equals the
unsharded layer as long as every rank holds whole GQA groups (``check_shard``).

- decode rows: ``select_decode`` from the paged side data (gathered through the block table) or,
  for methods that read the keys (TopK), from the rows' keys; then the token-sparse paged kernel.
- prefill rows (whole, chunked, and the one-token last chunk of a prompt, which vLLM tells apart
  from a decode by ``is_prefilling``): ``select_prefill`` on the chunk's queries and the row's keys
  when the method has a prefill selector, else its static ``prefill`` plan (dense when None),
  shared across layers like any static plan.
- rows shorter than ``min_seq_len``: dense, as for static methods.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ...api import select_backend
from ...block_layout import BlockLayout
from ...errors import ConfigError
from ...methods import DynamicMethod
from ...paged import gather_rows
from ...paged_side import PagedSideStore
from ...token_selection import TokenSelection
from .step import HeadShard, PagedStep, RowGroup, run_plan


class Observer(Protocol):
    """Called with every selection or plan a dynamic layer runs, and how it was made (the method's
    name for a decode selection, ``prefill_label()`` for a prefill)."""

    def __call__(self, group: RowGroup, plan: TokenSelection | BlockLayout, label: str) -> None: ...


def check_shard(method: DynamicMethod, shard: HeadShard) -> None:
    """ConfigError when tensor parallelism splits a GQA group across ranks (fewer KV heads than
    ranks, each KV head replicated): a rank would then select from part of the group's queries."""
    if shard.num_kv_heads < shard.world_size:
        raise ConfigError(
            f"{method.name} selects keys per KV head from its whole GQA group, but tensor_parallel_size="
            f"{shard.world_size} exceeds num_kv_heads={shard.num_kv_heads} (KV heads replicated, groups "
            "split across ranks); use tensor_parallel_size <= num_kv_heads for dynamic layers"
        )


def attend_dynamic(
    query: torch.Tensor,  # [T, Hq_local, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv_local, D]
    value_cache: torch.Tensor,
    step: PagedStep,
    method: DynamicMethod,
    shard: HeadShard,
    scale: float,
    output: torch.Tensor,  # [T, Hq_local, Dv]
    side: PagedSideStore | None,
    backend: str = "auto",
    observe: Observer | None = None,
) -> None:
    """One dynamic layer for every request of the step (its side data already written)."""
    check_shard(method, shard)
    method.check_fits(query.shape[1], key_cache.shape[2])
    if method.side_spec(key_cache.shape[-1]) is not None:
        if side is None:
            raise ConfigError(f"side: {method.name} selects from side data, but no side store was given")
        side.check_cache(key_cache)
    chosen = select_backend(backend, query.device, query.dtype)
    for gi, g in enumerate(step.groups()):
        tokens, keep = step.token_index(gi)
        q = query[tokens].permute(0, 2, 1, 3)  # [G, Hq, Sq, D]
        table = step.table(gi)
        plan: TokenSelection | BlockLayout
        if g.dense:
            plan = step.plan(gi, (None,) * shard.num_heads, shard)
        elif g.decode:
            plan = _select_decode(method, q, key_cache, table, g, side, scale, chosen)
        else:
            plan = _prefill_plan(method, q, key_cache, table, g, gi, step, shard, scale, chosen)
        if observe is not None and not g.dense:
            observe(g, plan, method.name if g.decode else method.prefill_label())
        out = run_plan(q, key_cache, value_cache, table, plan, g, scale, backend)
        output[tokens[keep]] = out.permute(0, 2, 1, 3)[keep].to(output.dtype)


def _select_decode(
    method: DynamicMethod,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    table: torch.Tensor,
    g: RowGroup,
    side: PagedSideStore | None,
    scale: float,
    backend: str,
) -> TokenSelection:
    keys = gather_rows(key_cache, table, g.kv_lens) if method.needs_keys else None
    data = side.gather(table, g.kv_lens) if side is not None else None
    return method.select_decode(q, keys, data, g.kv_lens, g.q_lens, scale, True, backend)


def _prefill_plan(
    method: DynamicMethod,
    q: torch.Tensor,
    key_cache: torch.Tensor,
    table: torch.Tensor,
    g: RowGroup,
    gi: int,
    step: PagedStep,
    shard: HeadShard,
    scale: float,
    backend: str,
) -> BlockLayout | TokenSelection:
    if method.has_prefill_selector:
        keys = gather_rows(key_cache, table, g.kv_lens)
        layout = method.select_prefill(q, keys, g.q_lens, g.kv_lens, scale, True, backend)
        if layout is not None:
            return layout.to(q.device).validate()
    # a static prefill plan depends on lengths only: shared by every layer of the step
    return step.plan(gi, (method.prefill,) * shard.num_heads, shard)


@dataclass
class DynamicStats:
    """What dynamic layers did in this process: decode selections (row x layer), the keys they kept
    and could have kept (their ratio is the measured decode density), prefill rows by how they ran."""

    decode_selections: int = 0
    selected_keys: int = 0
    candidate_keys: int = 0
    prefill_rows: dict[str, int] = field(default_factory=dict)  # how they ran -> rows x layers
    side_bytes: int = 0  # allocated side stores (kept by reset: they stay allocated)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, group: RowGroup, plan: TokenSelection | BlockLayout, label: str) -> None:
        rows = int(group.rows.numel())
        with self._lock:
            if group.decode and isinstance(plan, TokenSelection):
                self.decode_selections += rows
                self.selected_keys += int(plan.counts.sum())
                self.candidate_keys += int(group.kv_lens.sum()) * plan.num_heads
            else:
                self.prefill_rows[label] = self.prefill_rows.get(label, 0) + rows

    def add_side_bytes(self, nbytes: int) -> None:
        with self._lock:
            self.side_bytes += nbytes

    def as_dict(self) -> dict[str, object]:
        with self._lock:
            density = self.selected_keys / self.candidate_keys if self.candidate_keys else None
            return {
                "decode_selections": self.decode_selections,
                "selected_keys": self.selected_keys,
                "candidate_keys": self.candidate_keys,
                "decode_density": density,
                "prefill_rows": dict(self.prefill_rows),
                "side_bytes": self.side_bytes,
            }

    def reset(self) -> None:
        with self._lock:
            self.decode_selections = self.selected_keys = self.candidate_keys = 0
            self.prefill_rows = {}

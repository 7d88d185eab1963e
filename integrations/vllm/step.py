"""One scheduler step of vLLM over the paged cache, without vLLM: rows, plans and the attention call.

vLLM packs every scheduled request's new tokens into one flat batch: request r owns query tokens
``query_start[r]:query_start[r+1]`` and, after the cache write, ``seq_lens[r]`` keys (its context
plus the new tokens). A request with one new token is a decode; more is a (possibly chunked) prefill
whose queries sit at the end of its keys, which is the bottom-right alignment of the sparse formats.
Rows are split into decodes and prefills and into sparse and dense-fallback rows (shorter than
``min_seq_len``); each part is planned once per step and per distinct head-method list (layers with
the same methods share a plan), then run on the paged cache. Layers with a dynamic method select
per layer instead (``dynamic_step``).

A row with one query is a decode unless vLLM says it is still prefilling (``prefilling``: the last
chunk of a prompt may be one token): a dynamic method treats the prompt's queries as prefill
wherever the chunks fall, as the Hugging Face path does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ...block_layout import BlockLayout
from ...methods import Dense, Method
from ...paged import paged_block_sparse_attention, paged_token_sparse_attention
from ...planning import dynamic_of, plan_heads
from ...token_selection import TokenSelection

if TYPE_CHECKING:
    from ...paged_side import PagedSideStore
    from .dynamic_step import Observer

HeadMethods = tuple[Method | None, ...]


@dataclass(frozen=True)
class HeadShard:
    """The model's heads and which of them this tensor-parallel rank holds (vLLM's split: query heads
    in equal contiguous slices; KV heads likewise, or one replicated KV head per rank when there are
    fewer KV heads than ranks)."""

    num_heads: int  # query heads of the whole model layer
    num_kv_heads: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.num_heads % self.world_size or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"num_heads={self.num_heads} must split evenly over world_size={self.world_size} "
                f"(rank {self.rank})"
            )
        kv, ws = self.num_kv_heads, self.world_size
        if (kv >= ws and kv % ws) or (kv < ws and ws % kv):
            raise ValueError(f"num_kv_heads={kv} cannot be split or replicated over world_size={ws}")

    @property
    def local_heads(self) -> int:
        return self.num_heads // self.world_size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.world_size)

    def q_slice(self) -> slice:
        n = self.local_heads
        return slice(self.rank * n, (self.rank + 1) * n)

    def kv_slice(self) -> slice:
        if self.num_kv_heads >= self.world_size:
            n = self.local_kv_heads
            return slice(self.rank * n, (self.rank + 1) * n)
        first = self.rank * self.num_kv_heads // self.world_size
        return slice(first, first + 1)

    def local_layout(self, layout: BlockLayout) -> BlockLayout:
        """This rank's heads of a layout planned for all of the model's heads."""
        if self.world_size == 1 or layout.num_heads == 1:
            return layout
        cut = self.q_slice() if layout.num_heads == self.num_heads else self.kv_slice()

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[:, cut].contiguous()

        return replace(
            layout,
            kv_indices=take(layout.kv_indices),
            kv_counts=take(layout.kv_counts),
            full=take(layout.full),
            sink_tokens=take(layout.sink_tokens),
            window_tokens=take(layout.window_tokens),
        )


@dataclass(frozen=True)
class RowGroup:
    """Requests of one step that run together: all decodes or all prefills, sparse or dense."""

    rows: torch.Tensor  # [G] request indices (host, int64)
    q_lens: torch.Tensor  # [G] host
    kv_lens: torch.Tensor  # [G] host
    tokens: torch.Tensor  # [G, max q_len] flat token index of each query (-1: none)
    decode: bool
    dense: bool


@dataclass
class PagedStep:
    """The requests of one step (host lengths; the block table on the cache's device) and the plans
    made for them so far."""

    query_start: torch.Tensor  # [R+1] int64, host
    seq_lens: torch.Tensor  # [R] int64, host
    block_table: torch.Tensor  # [R, max_pages]
    min_seq_len: int = 0
    prefilling: torch.Tensor | None = None  # [R] bool, host: still in the prompt (None: q_len > 1)
    _groups: list[RowGroup] | None = field(default=None, repr=False)
    _plans: dict[tuple[int, HeadMethods], BlockLayout | TokenSelection] = field(default_factory=dict, repr=False)
    _tables: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)
    _tokens: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def q_lens(self) -> torch.Tensor:
        return self.query_start[1:] - self.query_start[:-1]

    @property
    def num_fallback_rows(self) -> int:
        """Requests that run dense because they are shorter than min_seq_len."""
        return sum(int(g.rows.numel()) for g in self.groups() if g.dense)

    def groups(self) -> list[RowGroup]:
        if self._groups is None:
            q_lens, kv_lens = self.q_lens, self.seq_lens
            active = q_lens > 0
            decode = q_lens == 1
            if self.prefilling is not None:
                decode = decode & ~self.prefilling.to(torch.bool)
            dense = kv_lens < self.min_seq_len
            groups = []
            for is_decode in (True, False):
                for is_dense in (False, True):
                    sel = active & (decode == is_decode) & (dense == is_dense)
                    rows = sel.nonzero().flatten()
                    if rows.numel():
                        groups.append(self._group(rows, is_decode, is_dense))
            self._groups = groups
        return self._groups

    def _group(self, rows: torch.Tensor, decode: bool, dense: bool) -> RowGroup:
        q_lens = self.q_lens[rows]
        width = int(q_lens.max())
        offs = torch.arange(width, dtype=torch.int64)
        tokens = torch.where(offs < q_lens[:, None], self.query_start[rows][:, None] + offs, -1)
        return RowGroup(rows, q_lens, self.seq_lens[rows], tokens, decode, dense)

    def table(self, gi: int) -> torch.Tensor:
        """The block table rows of group ``gi`` (one gather per step, shared by every layer)."""
        if gi not in self._tables:
            rows = self.groups()[gi].rows.to(self.block_table.device)
            self._tables[gi] = self.block_table.index_select(0, rows)
        return self._tables[gi]

    def token_index(self, gi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat token index [G, max q_len] clamped to >= 0, which entries are real queries), on the
        cache's device, once per step."""
        if gi not in self._tokens:
            tokens = self.groups()[gi].tokens.to(self.block_table.device)
            self._tokens[gi] = (tokens.clamp(min=0), tokens >= 0)
        return self._tokens[gi]

    def plan(self, gi: int, methods: HeadMethods, shard: HeadShard) -> BlockLayout | TokenSelection:
        """The plan of group ``gi`` for a layer whose model-wide query heads use ``methods``: planned for
        all heads (so head-dependent patterns match the unsharded model), cut to this rank's heads."""
        key = (gi, methods)
        if key not in self._plans:
            g = self.groups()[gi]
            layout = plan_heads(list(methods), g.q_lens, g.kv_lens, shard.num_kv_heads, causal=True)  # type: ignore[arg-type]
            if layout is None:
                layout = Dense().plan(g.q_lens, g.kv_lens, shard.num_heads, shard.num_kv_heads)
            layout = shard.local_layout(layout)
            plan = layout.decode_selection() if g.decode else layout
            dev = self.block_table.device
            if isinstance(plan, TokenSelection):
                plan = TokenSelection(plan.indices.to(dev), plan.counts.to(dev))
            else:
                plan = plan.to(dev).validate()
            self._plans[key] = plan
        return self._plans[key]


def run_plan(
    q: torch.Tensor,  # [G, Hq, Sq, D]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    table: torch.Tensor,
    plan: BlockLayout | TokenSelection,
    group: RowGroup,
    scale: float,
    backend: str,
) -> torch.Tensor:
    """Run one row group's plan on the paged cache: out [G, Hq, Sq, Dv]."""
    if isinstance(plan, TokenSelection):
        return paged_token_sparse_attention(
            q,
            key_cache,
            value_cache,
            table,
            plan,
            kv_lens=group.kv_lens,
            q_lens=group.q_lens,
            scale=scale,
            backend=backend,
        )
    return paged_block_sparse_attention(q, key_cache, value_cache, table, plan, scale=scale, backend=backend)


def attend(
    query: torch.Tensor,  # [T, Hq_local, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv_local, D]
    value_cache: torch.Tensor,  # [num_pages, page_size, Hkv_local, Dv]
    step: PagedStep,
    methods: HeadMethods,
    shard: HeadShard,
    scale: float,
    output: torch.Tensor,  # [T, Hq_local, Dv], written for every scheduled query token
    backend: str = "auto",
    side: PagedSideStore | None = None,
    observe: Observer | None = None,
) -> None:
    """Sparse attention of one layer for every request of the step (dense-fallback rows densely).

    ``methods`` are the model-wide query heads' methods. A dynamic layer selects from its queries,
    keys and ``side`` (the layer's paged side data, written for this step's keys); ``observe`` sees
    each of its selections."""
    dynamic = dynamic_of(methods)
    if dynamic is not None:
        from .dynamic_step import attend_dynamic

        attend_dynamic(
            query, key_cache, value_cache, step, dynamic, shard, scale, output, side, backend, observe
        )
        return
    dense_methods: HeadMethods = (None,) * len(methods)
    for gi, g in enumerate(step.groups()):
        plan = step.plan(gi, dense_methods if g.dense else methods, shard)
        tokens, keep = step.token_index(gi)
        q = query[tokens].permute(0, 2, 1, 3)  # [G, Hq, Sq, D]
        out = run_plan(q, key_cache, value_cache, step.table(gi), plan, g, scale, backend)
        output[tokens[keep]] = out.permute(0, 2, 1, 3)[keep].to(output.dtype)

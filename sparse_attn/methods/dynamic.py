"""The protocol of content-based (dynamic) methods: budget, side data, selection, prefill behaviour.

A static method plans from lengths alone. A dynamic method chooses keys from the content: queries,
side data computed from every cached key (its ``aux``: Quest's block min/max, Loki's projected keys,
...) and sometimes the keys themselves. One implementation serves the functional API, Hugging Face
and vLLM, because a method only ever sees plain tensors:

- **budget**: ``density`` (a fraction of the row's keys, in (0, 1]) or ``tokens`` (a count). The
  budget counts every selected key, the always-kept ones included: the first ``sink_tokens`` keys,
  the last ``local_tokens`` keys and, for block methods, the current (last, partly filled) block. The
  always-kept keys are kept even when they alone exceed the budget. A budget that covers the row
  selects every key, so the result equals dense attention exactly.
- **side data** (``side_spec``): per token or per block of ``block_size`` keys, a tensor of
  ``shape`` per KV head. ``compute_side`` is a pure function of the keys, so side data of a
  prefix-cached page is valid for every request sharing it, and block data can be recomputed for the
  blocks a step touched (idempotent under chunked prefill and rollback).
- **select_decode**: queries + side data (+ keys when ``needs_keys``) -> a ``TokenSelection`` per KV
  head (shared by the GQA group), ascending key indices. ``backend`` ("torch" or "triton", the
  dispatch's choice for the call) says where the scoring runs; the result is the same.
- **select_prefill**: a ``BlockLayout`` for prefill, or None when the method has no prefill
  selector; the prefill then runs ``prefill`` (a static method, or dense when None). That is the
  method's design, reported in stats as such, never counted as a dense fallback.

Heads of one layer run one dynamic method: selection is per KV head and the side data is per layer,
so a layer cannot mix a dynamic method with static ones or with dense heads (``SparseAttentionConfig``
refuses such a config with a ``ConfigError``); mixing across layers is free.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..artifact import ModelShape
from ..block_layout import BlockLayout
from ..errors import ConfigError, ShapeError
from ..token_selection import TokenSelection
from ..validation import check_nonnegative_int
from .base import StaticMethod, check_heads


@dataclass(frozen=True)
class SideSpec:
    """What a method keeps next to the KV cache, per KV head: ``shape`` per token (``level="token"``,
    ``block_size`` 1) or per block of ``block_size`` keys (``level="block"``), in ``dtype`` (None:
    the keys' dtype)."""

    level: str
    block_size: int
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.level not in ("token", "block"):
            raise ConfigError(f"level must be 'token' or 'block', got {self.level!r}")
        if self.level == "token" and self.block_size != 1:
            raise ConfigError(f"token-level side data has block_size 1, got {self.block_size}")

    def units(self, num_keys: int) -> int:
        """Side-data entries that cover ``num_keys`` keys."""
        return -(-num_keys // self.block_size)

    def dtype_for(self, key_dtype: torch.dtype) -> torch.dtype:
        return key_dtype if self.dtype is None else self.dtype

    def bytes_per_unit(self, num_kv_heads: int, key_dtype: torch.dtype) -> int:
        elems = num_kv_heads * math.prod(self.shape)
        return elems * torch.empty((), dtype=self.dtype_for(key_dtype)).element_size()


class DynamicMethod:
    """Base of the content-based methods (frozen dataclasses with ``density``, ``tokens``,
    ``sink_tokens``, ``local_tokens`` and ``prefill`` fields)."""

    name: ClassVar[str]
    default_density: ClassVar[float | None] = None
    default_tokens: ClassVar[int | None] = None
    needs_keys: ClassVar[bool] = False
    # False for a method whose selection size follows the data (MagicPIG's sample): density and
    # tokens do not apply, and sweeps over budgets run it once
    has_budget: ClassVar[bool] = True
    density: float | None
    tokens: int | None
    sink_tokens: int
    local_tokens: int
    prefill: StaticMethod | None

    # validation --------------------------------------------------------------------------------------
    def _check_budget(self) -> None:
        density, tokens = self.density, self.tokens
        if density is None and tokens is None:
            object.__setattr__(self, "density", self.default_density)
            object.__setattr__(self, "tokens", self.default_tokens)
            density, tokens = self.density, self.tokens
        if density is not None and tokens is not None:
            raise ConfigError(
                f"give a budget as density or as tokens, not both (density={density}, tokens={tokens})"
            )
        if density is not None:
            if isinstance(density, bool) or not isinstance(density, (int, float)):
                raise ConfigError(f"density must be a fraction in (0, 1], got {density!r}")
            if not (0.0 < float(density) <= 1.0):
                raise ConfigError(f"density must be a fraction in (0, 1], got {density!r}")
            object.__setattr__(self, "density", float(density))
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0):
            raise ConfigError(f"tokens must be a positive int (keys per row), got {tokens!r}")
        check_nonnegative_int(self.sink_tokens, "sink_tokens")
        check_nonnegative_int(self.local_tokens, "local_tokens")
        if self.prefill is not None and not isinstance(self.prefill, StaticMethod):
            raise ConfigError(
                f"prefill must be a static method (SinkLocal, S2, ...) or None for dense, got {self.prefill!r}"
            )

    # budget -------------------------------------------------------------------------------------------
    def budget(self, kv_lens: torch.Tensor) -> torch.Tensor:
        """Keys to select per row (int64 [B], host), the always-kept ones included, at most kv_len."""
        # per row in Python: a decode step asks once per layer, and a few ints cost less than the
        # tensor ops on a CPU (the same float64 ceil as before)
        lens = [int(n) for n in kv_lens.tolist()]
        if self.tokens is not None:
            want = [min(self.tokens, n) for n in lens]
        else:
            assert self.density is not None
            want = [min(math.ceil(n * self.density), n) for n in lens]
        return torch.tensor(want, dtype=torch.int64)

    # hooks ---------------------------------------------------------------------------------------------
    def side_spec(self, head_dim: int) -> SideSpec | None:
        """The side data this method keeps, or None (it reads the keys)."""
        return None

    def compute_side(self, keys: torch.Tensor, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Side data of ``keys`` [..., n, D]: [..., ceil(n / block_size), *shape].

        Without ``kv_lens`` every key is present and a last partial unit holds the keys left over (a
        decode step's current block). With it (broadcast against the leading dims; n a whole number
        of units) keys at or past it are absent (right-padded rows)."""
        raise NotImplementedError(f"{self.name} keeps no side data")

    def select_decode(
        self,
        q: torch.Tensor,  # [B, Hq, Sq, D]
        k: torch.Tensor | None,  # [B, Hkv, Skv, D] when needs_keys
        side: torch.Tensor | None,  # [B, Hkv, units, *shape]
        kv_lens: torch.Tensor,  # [B] host
        q_lens: torch.Tensor,  # [B] host
        scale: float,
        causal: bool,
        backend: str = "torch",
    ) -> TokenSelection:
        raise NotImplementedError

    def select_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        q_lens: torch.Tensor,
        kv_lens: torch.Tensor,
        scale: float,
        causal: bool,
        backend: str = "torch",
    ) -> BlockLayout | None:
        """A prefill layout chosen from the content, or None: the prefill runs ``prefill``."""
        return None

    @property
    def has_prefill_selector(self) -> bool:
        return type(self).select_prefill is not DynamicMethod.select_prefill

    def prefill_label(self) -> str:
        """How this method's prefill runs, for stats."""
        if self.has_prefill_selector:
            return self.name
        return "dense" if self.prefill is None else self.prefill.name

    def for_layer(self, layer_idx: int) -> DynamicMethod:
        return self

    def for_kv_heads(self, first: int, count: int) -> DynamicMethod:
        """The method for a tensor-parallel rank that holds the layer's KV heads [first, first +
        count): methods with per-head calibration (MagicPIG's centres) keep those heads' part."""
        return self

    def check_model(self, model: ModelShape) -> None:
        """Raise PlanFileError when this method's calibration artifact was made for another model
        (the integrations call it once when they bind the method to a model); no-op without one."""

    def check_fits(self, num_heads: int, num_kv_heads: int) -> None:
        check_heads(num_heads, num_kv_heads)
        if self.prefill is not None:
            self.prefill.check_fits(num_heads, num_kv_heads)

    # serialisation -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.name}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, StaticMethod) else value
        return out

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> DynamicMethod:
        params = dict(params)
        prefill = params.get("prefill")
        if isinstance(prefill, dict):
            from . import method_from_dict

            params["prefill"] = method_from_dict(prefill)
        return cls(**params)


# ------------------------------------------------------------------------------------------------------
# shared selection helpers


def always_kept(kv_lens: torch.Tensor, n: int, sink: int, local: int, device: torch.device) -> torch.Tensor:
    """bool [B, n]: the first ``sink`` and the last ``local`` keys of each row (within kv_len)."""
    j = torch.arange(n, device=device)
    kvl = kv_lens.to(device)[:, None]
    return (j < kvl) & ((j < sink) | (j >= kvl - local))


def top_by_score(
    score: torch.Tensor,  # [B, H, N] float, higher is better; -inf = not a candidate
    forced: torch.Tensor,  # [B, H, N] bool, always selected
    count: torch.Tensor,  # int64, broadcasts to [B, H]: entries to select (forced ones included)
) -> torch.Tensor:
    """bool [B, H, N]: the forced entries plus the best-scoring others, ``count`` in all per row (more
    when the forced ones exceed it). Ties go to the lower index (as a stable descending sort would),
    found with a partial selection (``topk``), in O(N) rather than a full sort."""
    b, h, n = score.shape
    if n == 0:
        return torch.zeros_like(forced)
    keyed = torch.where(forced, torch.full_like(score, float("inf")), score)
    candidate = forced | (score > float("-inf"))
    limit = count.to(score.device).expand(b, h)[..., None].clamp(0, n)  # [B, H, 1]
    k_max = int(limit.max())
    if k_max == 0:
        return forced.clone()
    # The count-th largest value t (a partial selection, not a full sort): everything above t is in,
    # and of the entries equal to t the lowest-indexed ones fill what is left, as a stable sort would.
    if bool((limit == k_max).all()):
        # one count for every row (a decode step's budget): t is the smallest of the top k_max,
        # which needs no ordering of them
        t = torch.topk(keyed, k_max, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # [B, H, 1]
    else:
        top = torch.topk(keyed, k_max, dim=-1, sorted=True).values
        t = top.gather(-1, (limit - 1).clamp(min=0))  # [B, H, 1]
    above = keyed > t
    tied = keyed == t
    room = limit - above.sum(-1, keepdim=True)
    take = above | (tied & (torch.cumsum(tied, dim=-1) <= room))
    return candidate & ((take & (limit > 0)) | forced)


def mask_to_selection(mask: torch.Tensor) -> TokenSelection:
    """A TokenSelection (ascending indices) from bool [B, H, N], in O(N) (a scan, no sort)."""
    b, h, n = mask.shape
    counts = mask.sum(-1)
    k_max = int(counts.max()) if counts.numel() else 0
    slot = torch.cumsum(mask, dim=-1) - 1  # target slot of every selected position
    slot = torch.where(mask, slot, torch.full_like(slot, k_max))  # others go to a spare slot
    pos = torch.arange(n, device=mask.device).expand(b, h, n)
    indices = torch.zeros(b, h, k_max + 1, dtype=torch.int64, device=mask.device).scatter_(-1, slot, pos)
    return TokenSelection(indices[..., :k_max], counts.to(torch.int64))


def check_decode_inputs(q: torch.Tensor, k_or_side: torch.Tensor, name: str) -> tuple[int, int, int]:
    """(B, Hkv, group) of a decode selection call; ShapeError when ``name`` does not fit q."""
    b, hq = q.shape[0], q.shape[1]
    if k_or_side.shape[0] != b:
        raise ShapeError(f"{name} has batch {k_or_side.shape[0]}, q has {b}")
    hkv = k_or_side.shape[1]
    if hkv == 0 or hq % hkv:
        raise ShapeError(f"{name} has {hkv} KV heads, which does not divide q's {hq} heads")
    return b, hkv, hq // hkv


def group_log_mass(
    scores: torch.Tensor,  # [B, Hkv, G*Sq, N] scaled logits, -inf where not allowed
) -> torch.Tensor:
    """log of the GQA group's attention mass per key: softmax over keys per query row, summed over
    the group's query heads and queries, kept in the log domain (no underflow for far-off keys) ->
    [B, Hkv, N]; -inf where no row may attend the key.

    Why the sum of probabilities and not the max logit: it ranks keys by the attention mass the
    group's heads would give them, so the kept keys lose the least mass, and each head's logits count
    relative to its own normaliser (a head with flat attention does not outvote a peaked one)."""
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    lse = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    return torch.logsumexp(scores - lse, dim=2)


def top_tokens_of_full_rows(
    scores: torch.Tensor,  # [B, Hkv, G, N] scaled logits of each row's one query per query head
    kv_lens: torch.Tensor,
    q_lens: torch.Tensor,
    budget: Callable[[torch.Tensor], torch.Tensor],
    sink: int,
    local: int,
) -> TokenSelection | None:
    """The common decode step of a token-level selector (one query per row, every row holding all N
    keys, one budget) in a dozen ops: the group's attention mass in the linear domain (the order of
    ``group_log_mass`` without its logsumexps, which cost more than the scores' matmul on a CPU), the
    always-kept keys ranked first, one partial ``topk``, its indices sorted. None (the caller's
    general path, ``group_log_mass`` + ``top_by_score``, decides) when the rows are not full, the
    always-kept keys fill the budget, or a mass ties the cut (the general path breaks ties by index;
    a mass that underflowed to 0 ties too)."""
    b, hkv, _, n = scores.shape
    if any(x != n for x in kv_lens.tolist()) or any(x != 1 for x in q_lens.tolist()):
        return None
    count = int(budget(kv_lens[:1])[0])
    sink, local = min(sink, n), min(local, n)
    if count >= n or sink + local >= count:
        return None
    e = (scores - scores.amax(-1, keepdim=True)).exp_()
    keyed = e.div_(e.sum(-1, keepdim=True)).sum(2)  # [B, Hkv, N]
    keyed[..., :sink] = float("inf")
    keyed[..., n - local :] = float("inf")
    top = torch.topk(keyed, count, dim=-1, sorted=False)
    cut = top.values.amin(-1, keepdim=True)  # [B, Hkv, 1]
    # no other key has as much mass as the last one taken (else the tie rule applies), and every
    # taken key has some (none: underflow, or no key at all)
    if bool(((keyed >= cut).sum(-1) != count).any()) or bool((cut <= 0).any()):
        return None
    indices = top.indices.sort(dim=-1).values
    counts = torch.full((b, hkv), count, dtype=torch.int64, device=scores.device)
    return TokenSelection(indices, counts).built_for(kv_lens.to("cpu", torch.int64))


def top_tokens_by_scores(
    scores: torch.Tensor,  # [B, Hkv, G*Sq, N] scaled logits, -inf where not allowed
    kv_lens: torch.Tensor,
    q_lens: torch.Tensor,
    budget: Callable[[torch.Tensor], torch.Tensor],
    sink: int,
    local: int,
) -> TokenSelection:
    """A token-level selector's decode selection from its scores (TopK's exact ones, Loki's low-rank
    ones): the group's attention mass per key, the first ``sink`` and last ``local`` keys always
    kept, the best others up to the budget (ties to the earlier key). The full-row fast path where it
    applies, else ``group_log_mass`` + ``top_by_score``."""
    fast = top_tokens_of_full_rows(scores, kv_lens, q_lens, budget, sink, local)
    if fast is not None:
        return fast
    score = group_log_mass(scores)  # [B, Hkv, N]
    b, hkv, n = score.shape
    forced = always_kept(kv_lens, n, sink, local, score.device)
    chosen = top_by_score(score, forced[:, None].expand(b, hkv, n), budget(kv_lens)[:, None])
    return mask_to_selection(chosen).built_for(kv_lens.to("cpu", torch.int64))

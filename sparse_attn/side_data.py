"""Side data of dynamic methods next to a contiguous KV cache (functional API, Hugging Face).

A dynamic method's side data (``DynamicMethod.side_spec``) is a pure function of the keys, stored per
layer as ``[B, Hkv, units, *shape]`` for right-padded keys ``[B, Hkv, Skv, D]`` (a unit is a token or a
block of ``block_size`` keys). ``compute_side_data`` builds it from K in one pass; the store keeps it
across decode steps and writes only what a step touched: the new tokens, or the blocks that hold
them (the last, partly filled block is recomputed, so block data stays exact).

Stale data must never be used. The store trusts its data only for the exact continuation of what it
covered: same batch size, heads, head dim, dtype and device, and every row's key count grown by the
step's new tokens. Beyond that it checks the keys themselves, cheaply: every store keeps a one-number
fingerprint per covered key (a fixed random projection over heads and channels) and, before reusing
data, recomputes it for every key written by earlier decode steps (where beam search reorders rows
and generations diverge) and for ``PROBES`` random keys of the rest (a new prompt or a reordered batch
differs almost everywhere). When rows that cover the same positions only traded places (beam
search's reorder), the stored rows follow them (``reorders``); any other mismatch, or any other doubt,
rebuilds the layer's side data from K (``rebuilds``). A new prefill call always rebuilds.
"""

from __future__ import annotations

import torch

from .errors import ShapeError
from .methods.dynamic import DynamicMethod, SideSpec

PROBES = 32  # random covered keys re-fingerprinted before side data is reused
FINGERPRINT_RTOL = 1e-4


def compute_side_data(method: DynamicMethod, k: torch.Tensor, kv_lens: torch.Tensor) -> torch.Tensor | None:
    """Side data of every key of right-padded k [B, Hkv, Skv, D]: [B, Hkv, units, *shape] (None when
    the method keeps none). Keys at or past a row's kv_len are left out."""
    spec = method.side_spec(k.shape[-1])
    if spec is None:
        return None
    return _side_for(method, spec, k, kv_lens.to(k.device), 0, k.shape[2])


def _side_for(
    method: DynamicMethod,
    spec: SideSpec,
    k: torch.Tensor,
    kv_lens: torch.Tensor,
    start: int,
    stop: int,
    full_rows: bool = False,
) -> torch.Tensor:
    """Side data of the units covering key positions [start, stop) (start on a unit boundary);
    ``full_rows``: every row holds every key of the range (no padding to leave out)."""
    bs = spec.block_size
    keys = k[:, :, start:stop]
    if full_rows:
        return method.compute_side(keys).to(spec.dtype_for(k.dtype))
    stop_pad = -(-stop // bs) * bs
    if stop_pad > stop:
        pad = keys.new_zeros(*keys.shape[:2], stop_pad - stop, keys.shape[-1])
        keys = torch.cat((keys, pad), dim=2)
    lens = (kv_lens - start).clamp(min=0)[:, None]  # [B, 1] against [B, Hkv]
    side = method.compute_side(keys, lens)
    return side.to(spec.dtype_for(k.dtype))


def check_side(side: object, method: DynamicMethod, k: torch.Tensor) -> torch.Tensor:
    """ShapeError unless ``side`` is ``method``'s side data for k [B, Hkv, Skv, D]."""
    spec = method.side_spec(k.shape[-1])
    if spec is None:
        raise ShapeError(f"side: {method.name} keeps no side data, got {type(side).__name__}")
    if not isinstance(side, torch.Tensor):
        raise ShapeError(f"side must be a torch.Tensor, got {type(side).__name__}")
    b, hkv, skv = k.shape[0], k.shape[1], k.shape[2]
    want = (b, hkv, spec.units(skv), *spec.shape)
    if tuple(side.shape) != want:
        raise ShapeError(
            f"side has shape {tuple(side.shape)}, but {method.name} side data for keys {tuple(k.shape)} "
            f"is {want} ([B, Hkv, units of {spec.block_size} keys, *{spec.shape}])"
        )
    if side.device != k.device:
        raise ShapeError(f"side is on {side.device}, the keys on {k.device}")
    return side


class ContiguousSideStore:
    """One layer's side data for a contiguous cache, grown step by step, never stale (see module doc)."""

    def __init__(self, method: DynamicMethod, seed: int = 0) -> None:
        self.method = method
        self.seed = seed
        self.rebuilds = 0
        self.updates = 0
        self.reorders = 0
        self._side: torch.Tensor | None = None
        self._lens: list[int] | None = None  # keys covered per row
        self._fingerprints: torch.Tensor | None = None  # [B, capacity] float32
        self._since: list[int] | None = None  # per row: keys below this came from a rebuild
        self._signature: tuple[object, ...] | None = None
        self._projection: torch.Tensor | None = None
        self._rng = torch.Generator().manual_seed(seed)

    @property
    def side(self) -> torch.Tensor | None:
        """The stored side data: [B, Hkv, capacity units, *shape] (capacity grows by doubling)."""
        return self._side

    def reset(self) -> None:
        self._side = self._lens = self._fingerprints = self._since = self._signature = None

    def update(self, k: torch.Tensor, kv_lens: torch.Tensor, new_tokens: int) -> torch.Tensor | None:
        """Side data for right-padded k [B, Hkv, Skv, D] whose rows hold ``kv_lens`` keys, the last
        ``new_tokens`` of them new in this call. Returns [B, Hkv, units, *shape] (None: no side data)."""
        spec = self.method.side_spec(k.shape[-1])
        if spec is None:
            return None
        kvl = [int(n) for n in kv_lens.tolist()]
        if self._can_extend(k, kvl, new_tokens):
            self._extend(spec, k, kvl)
            self.updates += 1
        else:
            self._rebuild(spec, k, kvl)
            self.rebuilds += 1
        assert self._side is not None
        return self._side[:, :, : spec.units(k.shape[2])]

    # internals ---------------------------------------------------------------------------------------
    # A decode step runs this once per layer: lengths stay Python ints, and the common case (rows of
    # one length, nothing moved) costs a handful of small ops.
    def _sig(self, k: torch.Tensor) -> tuple[object, ...]:
        return (k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)

    def _can_extend(self, k: torch.Tensor, kvl: list[int], new_tokens: int) -> bool:
        if self._side is None or self._signature != self._sig(k) or new_tokens <= 0:
            return False
        assert self._lens is not None
        if [n - new_tokens for n in kvl] != self._lens:
            return False
        sources = self._row_sources(k)
        if sources is None:
            return False
        if sources != list(range(len(sources))):
            self._take_rows(sources)
        return True

    def _fingerprint(self, keys: torch.Tensor) -> torch.Tensor:
        """One float32 per key: keys [B, Hkv, n, D] -> [B, n]."""
        proj = self._projection
        if proj is None or proj.shape != (keys.shape[1], keys.shape[3]) or proj.device != keys.device:
            gen = torch.Generator().manual_seed(self.seed)
            proj = self._projection = torch.randn(keys.shape[1], keys.shape[3], generator=gen).to(keys.device)
        if keys.shape[2] > 256:  # a rebuild: no temporary the size of K
            return torch.einsum("bhnd,hd->bn", keys.to(torch.float32), proj)
        # a step's few keys: two small ops instead of einsum's reshapes (the per-step cost)
        return (keys.to(torch.float32) * proj[None, :, None, :]).sum(dim=(1, 3))

    def _row_sources(self, k: torch.Tensor) -> list[int] | None:
        """For every row of k, the stored row whose covered keys it still holds (itself when nothing
        moved; another row after a beam-search reorder), or None when some row matches none.

        Rows may trade places only with rows that cover the same positions (the beams of one prompt);
        each such group is checked on shared probe positions: every key written since the group's
        last rebuild and ``PROBES`` random older ones."""
        assert self._lens is not None and self._fingerprints is not None and self._since is not None
        fps = self._fingerprints
        sources = list(range(k.shape[0]))
        groups: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(zip(self._lens, self._since)):
            groups.setdefault(key, []).append(row)
        for (n, since), members in groups.items():
            cols = torch.arange(since, n)
            if since:
                cols = torch.cat((cols, torch.randint(0, since, (PROBES,), generator=self._rng)))
            if cols.numel() == 0:
                continue
            cols = cols.to(k.device)
            if len(members) == k.shape[0]:  # one group: all rows (a batch of one length)
                keys, before = k.index_select(2, cols), fps.index_select(1, cols.to(fps.device))
            else:
                rows = torch.tensor(members, device=k.device)
                keys = k.index_select(0, rows).index_select(2, cols)  # [g, Hkv, W, D]
                before = fps.index_select(0, rows.to(fps.device)).index_select(1, cols.to(fps.device))
            now = self._fingerprint(keys).to(fps.device)  # [g, W]
            if bool(_close(now, before).all()):  # nothing moved
                continue
            if len(members) == 1:
                return None
            match = _close(now[:, None], before[None]).all(-1)  # [new row, stored row] of the group
            if not bool(match.any(-1).all()):
                return None
            first = match.to(torch.int8).argmax(-1).tolist()  # first matching stored row
            for row, src in zip(members, first):
                sources[row] = members[src]
        return sources

    def _take_rows(self, sources: list[int]) -> None:
        """Reorder the stored rows (beam search moved the cache's rows)."""
        assert self._side is not None and self._fingerprints is not None
        self._side = self._side.index_select(0, torch.tensor(sources, device=self._side.device))
        self._fingerprints = self._fingerprints.index_select(
            0, torch.tensor(sources, device=self._fingerprints.device)
        )
        self.reorders += 1

    def _rebuild(self, spec: SideSpec, k: torch.Tensor, kvl: list[int]) -> None:
        lens = torch.tensor(kvl, device=k.device)
        self._side = _side_for(self.method, spec, k, lens, 0, k.shape[2])
        self._fingerprints = self._fingerprint(k)
        self._lens = list(kvl)
        self._since = list(kvl)
        self._signature = self._sig(k)

    def _extend(self, spec: SideSpec, k: torch.Tensor, kvl: list[int]) -> None:
        assert self._side is not None and self._lens is not None and self._fingerprints is not None
        bs = spec.block_size
        old = min(self._lens)
        start = old // bs * bs  # first unit any row touches
        stop = max(kvl)  # positions past every row's keys (a preallocated cache's tail) stay as they are
        full_rows = min(kvl) >= stop
        lens = None if full_rows else torch.tensor(kvl, device=k.device)
        fresh = _side_for(self.method, spec, k, lens, start, stop, full_rows)  # type: ignore[arg-type]
        first = start // bs
        self._side = _with_capacity(self._side, 2, spec.units(k.shape[2]))
        self._side[:, :, first : first + fresh.shape[2]] = fresh
        self._fingerprints = _with_capacity(self._fingerprints, 1, k.shape[2])
        self._fingerprints[:, old:stop] = self._fingerprint(k[:, :, old:stop])
        self._lens = list(kvl)


def _close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.isclose(a, b, rtol=FINGERPRINT_RTOL, atol=FINGERPRINT_RTOL)


def _with_capacity(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` with at least ``size`` entries along ``dim``; grown by doubling, so a step's append
    copies the stored data only O(log N) times over a generation."""
    have = t.shape[dim]
    if have >= size:
        return t
    shape = list(t.shape)
    shape[dim] = max(size, 2 * have)
    grown = t.new_zeros(shape)
    grown.narrow(dim, 0, have).copy_(t)
    return grown

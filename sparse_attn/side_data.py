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
    method: DynamicMethod, spec: SideSpec, k: torch.Tensor, kv_lens: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """Side data of the units covering key positions [start, stop) (start on a unit boundary)."""
    bs = spec.block_size
    stop_pad = -(-stop // bs) * bs
    keys = k[:, :, start:stop]
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
        self._lens: torch.Tensor | None = None  # [B] host: keys covered per row
        self._fingerprints: torch.Tensor | None = None  # [B, capacity] float32
        self._since: torch.Tensor | None = None  # [B] host: keys below this came from a rebuild
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
        kvl = kv_lens.to("cpu", torch.int64)
        if self._can_extend(k, kvl, new_tokens):
            self._extend(spec, k, kvl)
            self.updates += 1
        else:
            self._rebuild(spec, k, kvl)
            self.rebuilds += 1
        assert self._side is not None
        return self._side[:, :, : spec.units(k.shape[2])]

    # internals ---------------------------------------------------------------------------------------
    def _sig(self, k: torch.Tensor) -> tuple[object, ...]:
        return (k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)

    def _can_extend(self, k: torch.Tensor, kvl: torch.Tensor, new_tokens: int) -> bool:
        if self._side is None or self._signature != self._sig(k) or new_tokens <= 0:
            return False
        assert self._lens is not None and self._fingerprints is not None and self._since is not None
        if not torch.equal(kvl - new_tokens, self._lens):
            return False
        sources = self._row_sources(k)
        if sources is None:
            return False
        if not torch.equal(sources, torch.arange(len(sources))):
            self._take_rows(sources)
        return True

    def _fingerprint(self, keys: torch.Tensor) -> torch.Tensor:
        """One float32 per key: keys [B, Hkv, n, D] -> [B, n]."""
        if self._projection is None or self._projection.shape != (keys.shape[1], keys.shape[3]):
            gen = torch.Generator().manual_seed(self.seed)
            self._projection = torch.randn(keys.shape[1], keys.shape[3], generator=gen)
        proj = self._projection.to(keys.device)
        if keys.shape[2] > 256:  # a rebuild: no temporary the size of K
            return torch.einsum("bhnd,hd->bn", keys.to(torch.float32), proj)
        # a step's few keys: two small ops instead of einsum's reshapes (the per-step cost)
        return (keys.to(torch.float32) * proj[None, :, None, :]).sum(dim=(1, 3))

    def _row_sources(self, k: torch.Tensor) -> torch.Tensor | None:
        """For every row of k, the stored row whose covered keys it still holds (itself when nothing
        moved; another row after a beam-search reorder), or None when some row matches none.

        Rows may trade places only with rows that cover the same positions (the beams of one prompt);
        each such group is checked on shared probe positions: every key written since the group's
        last rebuild and ``PROBES`` random older ones."""
        assert self._lens is not None and self._fingerprints is not None and self._since is not None
        fps = self._fingerprints
        sources = torch.arange(k.shape[0])
        groups: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(zip(self._lens.tolist(), self._since.tolist())):
            groups.setdefault(key, []).append(row)
        for (n, since), members in groups.items():
            recent = torch.arange(since, n)
            probes = torch.randint(0, since, (PROBES,), generator=self._rng) if since else recent[:0]
            cols = torch.cat((recent, probes))
            if cols.numel() == 0:
                continue
            rows = torch.tensor(members)
            keys = k[rows.to(k.device)[:, None], :, cols.to(k.device)[None, :]]  # [g, W, Hkv, D]
            now = self._fingerprint(keys.transpose(1, 2)).to(fps.device)  # [g, W]
            before = fps[rows.to(fps.device)[:, None], cols.to(fps.device)[None, :]]  # [g, W]
            match = _close(now[:, None], before[None]).all(-1)  # [new row, stored row] of the group
            if bool(match.diagonal().all()):
                continue
            if not bool(match.any(-1).all()):
                return None
            sources[rows] = rows[match.to(torch.int8).argmax(-1).cpu()]  # first matching stored row
        return sources

    def _take_rows(self, sources: torch.Tensor) -> None:
        """Reorder the stored rows (beam search moved the cache's rows)."""
        assert self._side is not None and self._fingerprints is not None
        self._side = self._side.index_select(0, sources.to(self._side.device))
        self._fingerprints = self._fingerprints.index_select(0, sources.to(self._fingerprints.device))
        self.reorders += 1

    def _rebuild(self, spec: SideSpec, k: torch.Tensor, kvl: torch.Tensor) -> None:
        self._side = _side_for(self.method, spec, k, kvl.to(k.device), 0, k.shape[2])
        self._fingerprints = self._fingerprint(k)
        self._lens = kvl.clone()
        self._since = kvl.clone()
        self._signature = self._sig(k)

    def _extend(self, spec: SideSpec, k: torch.Tensor, kvl: torch.Tensor) -> None:
        assert self._side is not None and self._lens is not None and self._fingerprints is not None
        bs = spec.block_size
        start = int(self._lens.min()) // bs * bs  # first unit any row touches
        stop = k.shape[2]
        fresh = _side_for(self.method, spec, k, kvl.to(k.device), start, stop)
        units = spec.units(stop)
        first = start // bs
        self._side = _with_capacity(self._side, 2, units)
        self._side[:, :, first:units] = fresh
        old = int(self._lens.min())
        self._fingerprints = _with_capacity(self._fingerprints, 1, stop)
        self._fingerprints[:, old:stop] = self._fingerprint(k[:, :, old:stop])
        self._lens = kvl.clone()


def _close(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs() <= FINGERPRINT_RTOL * (a.abs() + b.abs() + 1.0)


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

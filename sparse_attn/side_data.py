"""Side data of dynamic methods next to a contiguous KV cache (functional API, Hugging Face).

A dynamic method's side data (``DynamicMethod.side_spec``) is a pure function of the keys, stored per
layer as ``[B, Hkv, units, *shape]`` for right-padded keys ``[B, Hkv, Skv, D]`` (a unit is a token or a
block of ``block_size`` keys). ``compute_side_data`` builds it from K in one pass; the store keeps it
across decode steps and writes only what a step touched: the new tokens, or the blocks that hold
them (the last, partly filled block is recomputed, so block data stays exact).

Stale data must never be used. The store trusts its data only for the exact continuation of what it
covered: same batch size, heads, head dim, dtype and device, and every row's key count grown by the
step's new tokens. Beyond that it checks the keys themselves, exactly and cheaply: it keeps a copy of
the keys at a few check positions per row (``PROBES`` random positions of what its last rebuild
covered, drawn then, and the ``RECENT`` newest keys, where beam search reorders rows and
generations diverge: at a rebuild the prefix's last ones, then each step's new keys in turn) and, before reusing data, compares them with the cache (one
gather and one comparison in the common case). When rows that cover the same positions only traded
places (beam search's reorder), the stored rows follow them (``reorders``); any other mismatch, or
any other doubt, rebuilds the layer's side data from K (``rebuilds``). A new prefill call always
rebuilds. The check copies stay bounded: ``PROBES + RECENT`` keys per row and KV head.
"""

from __future__ import annotations

import torch

from .errors import ShapeError
from .methods.dynamic import DynamicMethod, SideSpec

PROBES = 32  # random keys of the rebuilt prefix, compared before side data is reused
RECENT = 64  # newest keys written by decode steps, compared likewise


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
        self._since: list[int] | None = None  # per row: keys below this came from a rebuild
        self._check_pos: torch.Tensor | None = None  # [B, W] int64 check positions per row
        self._check_keys: torch.Tensor | None = None  # [B, Hkv, W, D] the keys seen there
        self._ring = 0  # the next of the RECENT check slots a new key takes
        self._signature: tuple[object, ...] | None = None
        self._rng = torch.Generator().manual_seed(seed)

    @property
    def side(self) -> torch.Tensor | None:
        """The stored side data: [B, Hkv, capacity units, *shape] (capacity grows by doubling)."""
        return self._side

    def reset(self) -> None:
        self._side = self._lens = self._since = self._check_pos = self._check_keys = None
        self._signature = None

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
        assert self._lens is not None and self._check_keys is not None
        if [n - new_tokens for n in kvl] != self._lens:
            return False
        now = _gather_rows(k, self._check_pos)
        if torch.equal(now, self._check_keys):  # nothing moved
            return True
        sources = self._row_sources(now)
        if sources is None:
            return False
        self._take_rows(sources)
        return True

    def _row_sources(self, now: torch.Tensor) -> list[int] | None:
        """For every row, the stored row whose check keys it holds now (after a beam-search reorder),
        or None when some row matches none. Rows may trade places only with rows that cover the same
        positions (the beams of one prompt), whose check positions are the same."""
        assert self._lens is not None and self._since is not None and self._check_keys is not None
        stored = self._check_keys
        sources = list(range(now.shape[0]))
        groups: dict[tuple[int, int], list[int]] = {}
        for row, key in enumerate(zip(self._lens, self._since)):
            groups.setdefault(key, []).append(row)
        for members in groups.values():
            rows = torch.tensor(members, device=now.device)
            a, b = now.index_select(0, rows), stored.index_select(0, rows)
            match = (a[:, None] == b[None]).flatten(2).all(-1)  # [new row, stored row] of the group
            if not bool(match.any(-1).all()):
                return None
            first = match.to(torch.int8).argmax(-1).tolist()  # first matching stored row
            for row, src in zip(members, first):
                sources[row] = members[src]
        return sources

    def _take_rows(self, sources: list[int]) -> None:
        """Reorder the stored rows (beam search moved the cache's rows)."""
        assert self._side is not None and self._check_keys is not None
        rows = torch.tensor(sources, device=self._side.device)
        self._side = self._side.index_select(0, rows)
        self._check_keys = self._check_keys.index_select(0, rows.to(self._check_keys.device))
        self.reorders += 1

    def _rebuild(self, spec: SideSpec, k: torch.Tensor, kvl: list[int]) -> None:
        lens = torch.tensor(kvl, device=k.device)
        full_rows = min(kvl, default=0) >= k.shape[2]  # no padding: the plain, fast reduction
        self._side = _side_for(self.method, spec, k, lens, 0, k.shape[2], full_rows)
        # PROBES positions per row below its length, one draw for all rows, so rows of one length
        # (beams) are checked at the same positions (position 0 of an empty row: the rows stay one
        # tensor; the slot's content only decides whether that row is rebuilt once more)
        frac = torch.rand(1, PROBES, generator=self._rng)
        lens_host = torch.tensor(kvl, dtype=torch.int64)[:, None]
        probes = (frac * lens_host.to(torch.float64)).to(torch.int64)
        # the RECENT slots start with the prefix's last keys; decode steps overwrite them in turn
        recent = (lens_host - RECENT + torch.arange(RECENT)).clamp(min=0)
        self._check_pos = torch.cat((probes, recent), dim=1).to(k.device)
        self._check_keys = _gather_rows(k, self._check_pos)
        self._ring = 0
        self._lens = list(kvl)
        self._since = list(kvl)
        self._signature = self._sig(k)

    def _extend(self, spec: SideSpec, k: torch.Tensor, kvl: list[int]) -> None:
        assert self._side is not None and self._lens is not None
        assert self._check_pos is not None and self._check_keys is not None
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
        # the new keys replace the oldest recent check keys, in place (the check tensors keep their
        # shape: no copy of them per step)
        new = min(kvl[0] - self._lens[0], RECENT)
        first_new = [n - new for n in kvl]
        slots = [PROBES + (self._ring + j) % RECENT for j in range(new)]
        self._ring = (self._ring + new) % RECENT
        if new == 1 and len(set(kvl)) == 1:  # a decode step of rows alike: two slot writes
            self._check_pos[:, slots[0]] = first_new[0]
            self._check_keys[:, :, slots[0]] = k[:, :, first_new[0]]
            self._lens = list(kvl)
            return
        pos = torch.tensor(first_new, device=k.device)[:, None] + torch.arange(new, device=k.device)  # [B, new]
        where = torch.tensor(slots, device=k.device)
        self._check_pos.index_copy_(1, where, pos)
        self._check_keys.index_copy_(2, where.to(self._check_keys.device), _gather_rows(k, pos))
        self._lens = list(kvl)


def _gather_rows(k: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """k [B, H, S, D] at per-row positions pos [B, W] -> [B, H, W, D] (a copy)."""
    b, h, _, d = k.shape
    if b == 1:
        return k.index_select(2, pos[0])
    return torch.gather(k, 2, pos[:, None, :, None].expand(b, h, pos.shape[1], d))


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

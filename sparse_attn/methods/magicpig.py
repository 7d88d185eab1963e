"""MagicPIG: LSH sampling for decode attention (Chen et al., 2024), built to run on the CPU.

Hashing. Keys are centred by a per-layer, per-KV-head mean ``c`` from calibration (a ``"magicpig"``
artifact, ``sparse_attn.artifact``, holding ``centres`` [layers, Hkv, D], made by ``sparse-attn
calibrate magicpig``; ``centres="smollm2"`` names the one shipped for SmolLM2-135M; ``centres=None``
skips centring). The paper centres by the mean of the current prompt's keys; a fixed calibrated centre
keeps the side data a pure function of the key, so a prefix-cached page's codes stay valid for
every request that shares it. Each centred key is hashed with SimHash ``sign((k - c) W)``, ``W`` ~
N(0, 1) of shape D x (K*L), seeded and identical on every device; the K bits of table t (columns
``t*K .. t*K+K-1``, bit b set when column ``t*K+b`` is positive) are packed into one integer, so the
side data is ``[Hkv, L]`` per token, int16 for K <= 16 (the default K = 10), int32 up to 32 bits.
The query is hashed as it is: centring only moves the
keys, and ``q.(k - c) = q.k - q.c`` changes every logit of a query by the same constant, so the
softmax over the real keys is unchanged; attention itself uses the real keys.

Sampling. Per query head, a key is a candidate when its code equals the query's in at least 2 of
the L tables. Its sampling probability is ``u = 1 - (1-p)^L - L p (1-p)^(L-1)`` with ``p = (1 -
theta/pi)^K``, theta the angle between the query and the centred key, and its logit gets
``log_weight = -log(u + 1e-4)``: the softmax over the sample is then the self-normalised importance
estimate of the paper. The first ``sink_tokens`` and last ``local_tokens`` keys are always attended
exactly (log-weight 0), in the same softmax, which is their log-sum-exp merge with the sample.

The selection is per query head (a TokenSelection with Hq heads): every query head of a GQA group
hashes its own query, so its candidates and their weights differ. A union per KV head could not
carry them, since the weights of one key differ between the heads of the group; the kernels take
per-query-head selections (the general path, with log-weights) as they are.

Budget. MagicPIG has no budget: the sample size follows the data, set by ``bits`` and ``tables``,
so ``density`` and ``tokens`` must stay None, and the density a selection reports is the measured
one. ``budget`` gives the keys always kept (the lower bound of every selection), which is what the
Hugging Face decode crossover (``dense_above``) compares. Dense layers (the paper keeps layers 0 and
16 of Llama dense) are ``SparseAttentionConfig(default=MagicPIG(...), dense_layers=(0, 16))``.

Cost. Side data is L int16 per token and KV head (300 bytes at L = 150, K <= 16), written once per
token.
The collision count compares the query's L codes with every key's, vectorised in chunks of keys
(O(N*L) codes, no hash tables; ``backend="triton"`` counts with the kernel of
``triton_kernels/simhash.py``); theta needs the candidates' keys only (``needs_keys``: the keys are
read for the sample, never scored in full). The vLLM step still gathers every key of the rows from
the paged cache before selecting (what ``needs_keys`` means there): a copy per layer and step that
reading the sample's keys through the page table would avoid. ``magicpig_reference`` beside it is
the plain-loop reference the tests compare with.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..artifact import Artifact, ModelShape, check_model, load_cached, resolve_artifact, save_artifact
from ..errors import ConfigError, PlanFileError, ShapeError
from ..kernels.token_decode import key_rows
from ..token_selection import TokenSelection
from ..validation import check_nonnegative_int
from .base import StaticMethod
from .dynamic import DynamicMethod, SideSpec, always_kept, check_decode_inputs, mask_to_selection

ARTIFACT_KIND = "magicpig"
# Centres shipped in the package, by name (sparse_attn/data/<file>.{safetensors,json}).
SHIPPED_CENTRES = {"smollm2": "magicpig_smollm2"}
MAX_BITS = 32  # K bits of a table are packed into one int16 (K <= 16) or int32
U_FLOOR = 1e-4  # the paper's floor in -log(u + 1e-4): bounds the weight of a key sampled by luck
# Elements of a temporary (projections, code comparisons) made at once; bounds them at ~32 MiB.
CHUNK_ELEMENTS = 1 << 22
# Codes compared with a query at once (8 MiB of int16): large enough that per-chunk op overhead is small.
COUNT_CHUNK = 1 << 22

_LOCK = threading.Lock()
_PROJECTIONS: dict[tuple[int, int, int, int, torch.device], torch.Tensor] = {}


@dataclass(frozen=True)
class MagicPIG(DynamicMethod):
    """MagicPIG sampling: ``bits`` (K, 1..32) per table, ``tables`` (L, >= 2), ``seed`` of W, the
    always-kept ``sink_tokens`` and ``local_tokens``, ``centres`` (path of a ``"magicpig"`` artifact,
    a shipped name such as ``"smollm2"``, or None), ``layer`` (the layer whose centre applies; ``for_layer`` sets it), ``kv_heads``
    ((first, count) of the centres' KV heads a tensor-parallel rank holds; ``for_kv_heads`` sets it)
    and ``prefill`` (a static method, or dense when None). ``density`` and ``tokens`` must stay None
    (no budget)."""

    name: ClassVar[str] = "magicpig"
    needs_keys: ClassVar[bool] = True
    has_budget: ClassVar[bool] = False
    bits: int = 10
    tables: int = 150
    seed: int = 0
    sink_tokens: int = 4
    local_tokens: int = 64
    centres: str | None = None
    layer: int | None = None
    kv_heads: tuple[int, int] | None = None
    prefill: StaticMethod | None = None
    density: float | None = None
    tokens: int | None = None

    def __post_init__(self) -> None:
        if self.density is not None or self.tokens is not None:
            raise ConfigError(
                f"MagicPIG has no budget (density={self.density!r}, tokens={self.tokens!r}): it samples the "
                "keys that collide with the query, a data-dependent number set by bits and tables"
            )
        k = self.bits
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_BITS:
            raise ConfigError(f"bits (K) must be an int in [1, {MAX_BITS}] (packed into one int), got {k!r}")
        n = self.tables
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ConfigError(f"tables (L) must be an int >= 2 (a key is sampled in >= 2 tables), got {n!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ConfigError(f"seed must be an int in [0, 2**63), got {s!r}")
        check_nonnegative_int(self.sink_tokens, "sink_tokens")
        check_nonnegative_int(self.local_tokens, "local_tokens")
        if isinstance(self.centres, os.PathLike):
            object.__setattr__(self, "centres", os.fspath(self.centres))
        if self.centres is not None and not isinstance(self.centres, str):
            raise ConfigError(
                f"centres must be the path of a magicpig artifact, a shipped name {sorted(SHIPPED_CENTRES)} "
                f"or None, got {self.centres!r}"
            )
        if self.layer is not None:
            check_nonnegative_int(self.layer, "layer")
        if self.kv_heads is not None:
            heads = self.kv_heads
            if (
                not isinstance(heads, (tuple, list))
                or len(heads) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) for x in heads)
                or heads[0] < 0
                or heads[1] < 1
            ):
                raise ConfigError(f"kv_heads must be (first, count) of the centres' KV heads, got {heads!r}")
            object.__setattr__(self, "kv_heads", tuple(heads))
        if self.prefill is not None and not isinstance(self.prefill, StaticMethod):
            raise ConfigError(
                f"prefill must be a static method (SinkLocal, S2, ...) or None for dense, got {self.prefill!r}"
            )

    # budget -------------------------------------------------------------------------------------------
    def budget(self, kv_lens: torch.Tensor) -> torch.Tensor:
        """The keys always kept per row (sinks + local window, at most kv_len): the lower bound of a
        selection, whose sample on top of them follows the data."""
        kvl = kv_lens.to("cpu", torch.int64)
        return torch.minimum(torch.full_like(kvl, self.sink_tokens + self.local_tokens), kvl)

    # binding ------------------------------------------------------------------------------------------
    def for_layer(self, layer_idx: int) -> MagicPIG:
        if self.centres is None or layer_idx == self.layer:
            return self
        bound = self.__dict__.setdefault("_bound", {})
        out = bound.get(layer_idx)
        if out is None:
            out = bound[layer_idx] = dataclasses.replace(self, layer=layer_idx)
        return out

    def for_kv_heads(self, first: int, count: int) -> MagicPIG:
        if self.centres is None:
            return self
        return dataclasses.replace(self, kv_heads=(first, count))

    def check_model(self, model: ModelShape) -> None:
        if self.centres is None:
            return
        tensors = _load_centres(self.centres, model)
        want = (model.num_layers, model.num_kv_heads, model.head_dim)
        got = tuple(tensors["centres"].shape)
        if got != want:
            raise PlanFileError(
                f"{self.centres}: centres have shape {list(got)}, but {model.describe()} needs "
                f"[layers, KV heads, head_dim] = {list(want)}"
            )

    # hashing ------------------------------------------------------------------------------------------
    def projection(self, head_dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """W [D, K*L] float32: drawn on the CPU from ``seed`` (so identical on every device), cached."""
        return simhash_projection(self.seed, head_dim, self.bits, self.tables, torch.device(device))

    def centre(self, num_kv_heads: int, head_dim: int, device: torch.device) -> torch.Tensor | None:
        """This layer's key centre [Hkv, D] float32 on ``device``, or None without centring."""
        if self.centres is None:
            return None
        if self.layer is None:
            raise ConfigError(
                "MagicPIG(centres=...) holds one centre per layer: bind one with .for_layer(layer_idx) "
                "(SparseAttentionConfig, the patch and sparse_attention(layer_idx=...) do)"
            )
        # kept on this (layer-bound) instance: a decode step asks twice per layer, and the file
        # cache's key costs a stat of the artifact
        bound: dict[torch.device, torch.Tensor] = self.__dict__.setdefault("_centre_on", {})
        c = bound.get(device)
        if c is None:
            c = bound[device] = _layer_centre(self.centres, self.layer, device)
        if self.kv_heads is not None:  # a tensor-parallel rank's KV heads
            c = c[self.kv_heads[0] : self.kv_heads[0] + self.kv_heads[1]]
        if tuple(c.shape) != (num_kv_heads, head_dim):
            raise ShapeError(
                f"{self.centres}: layer {self.layer}'s centre has shape {list(c.shape)}, the keys have "
                f"{num_kv_heads} KV heads of head_dim {head_dim}"
            )
        return c

    @property
    def code_dtype(self) -> torch.dtype:
        """int16 for K <= 16 bits (half the side data and of the comparisons' memory traffic), else
        int32."""
        return code_dtype(self.bits)

    def side_spec(self, head_dim: int) -> SideSpec:
        return SideSpec("token", 1, (self.tables,), dtype=self.code_dtype)

    def compute_side(self, keys: torch.Tensor, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Packed codes of the centred keys: keys [..., Hkv, n, D] -> [..., Hkv, n, L] (``code_dtype``);
        keys at or past ``kv_lens`` get code 0 (they are never read)."""
        if keys.dim() < 3:
            raise ShapeError(f"keys must have shape [..., Hkv, n, D], got {tuple(keys.shape)}")
        hkv, n, d = keys.shape[-3:]
        x = keys.to(torch.float32)
        c = self.centre(hkv, d, keys.device)
        if c is not None:
            x = x - c[:, None, :]
        codes = simhash_codes(x, self.projection(d, keys.device), self.bits, self.tables)
        if kv_lens is not None:
            present = torch.arange(n, device=keys.device) < kv_lens.to(keys.device)[..., None]
            codes = codes.masked_fill(~present[..., None], 0)
        return codes

    # decode -------------------------------------------------------------------------------------------
    def select_decode(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        side: torch.Tensor | None,
        kv_lens: torch.Tensor,
        q_lens: torch.Tensor,
        scale: float,
        causal: bool,
        backend: str = "torch",
    ) -> TokenSelection:
        assert k is not None and side is not None, (
            "MagicPIG selects from its codes and reads the sample's keys"
        )
        b, hkv, g = check_decode_inputs(q, side, "side")
        if q.shape[2] != 1:
            raise ShapeError(f"MagicPIG selects for one query per row (decode), got q with Sq={q.shape[2]}")
        hq, d, n = q.shape[1], q.shape[3], side.shape[2]
        if k.shape[2] < n:
            raise ShapeError(f"k covers {k.shape[2]} keys, the side data {n}")
        dev = q.device
        kvl = kv_lens.to("cpu", torch.int64)
        codes_q = simhash_codes(q[:, :, 0].to(torch.float32), self.projection(d, dev), self.bits, self.tables)
        codes_q = codes_q.view(b, hkv, g, self.tables)
        if backend == "triton":
            from ..api import _triton

            hits = _triton("simhash").collision_counts(codes_q, side).view(b, hq, n)
        else:
            hits = collision_counts(codes_q, side).view(b, hq, n)  # [B, Hq, N]
        forced = always_kept(kvl, n, self.sink_tokens, self.local_tokens, dev)  # [B, N]
        present = torch.arange(n, device=dev) < kvl.to(dev)[:, None]
        sampled = (hits >= 2) & (present & ~forced)[:, None]  # [B, Hq, N]
        sel = mask_to_selection(sampled | forced[:, None])
        weights = self._log_weights(q, k, sel, sampled)
        return TokenSelection(sel.indices, sel.counts, weights).built_for(kvl)

    def _log_weights(
        self, q: torch.Tensor, k: torch.Tensor, sel: TokenSelection, sampled: torch.Tensor
    ) -> torch.Tensor:
        """-log(u + 1e-4) for the sampled keys of the selection, 0 for the exact ones and empty slots:
        [B, Hq, k_max] float32. Reads the selected keys only."""
        b, hq, km = sel.indices.shape
        hkv, d = k.shape[1], k.shape[3]
        g = hq // hkv
        dev = q.device
        if km == 0:
            return torch.zeros(b, hq, 0, dtype=torch.float32, device=dev)
        used = sel.used()
        idx = sel.indices.masked_fill(~used, 0)
        is_sample = sampled.gather(-1, idx) & used  # [B, Hq, km]
        k_rows, (rb, rh) = key_rows(k)  # no copy of a sliced cache
        head = torch.arange(hq, device=dev) // g
        rows = (torch.arange(b, device=dev)[:, None] * rb + head[None, :] * rh)[..., None] + idx
        keys = k_rows.index_select(0, rows.flatten()).view(b, hq, km, d).to(torch.float64)
        c = self.centre(hkv, d, dev)
        if c is not None:
            keys = keys - c.to(torch.float64).repeat_interleave(g, dim=0)[None, :, None, :]
        qv = q[:, :, 0].to(torch.float64)  # [B, Hq, D]
        dot = torch.einsum("bhkd,bhd->bhk", keys, qv)
        norm = keys.norm(dim=-1) * qv.norm(dim=-1)[..., None]
        cos = torch.where(norm > 0, dot / norm.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        u = sampling_probability(torch.arccos(cos.clamp(-1.0, 1.0)), self.bits, self.tables)
        return torch.where(is_sample, -torch.log(u + U_FLOOR), 0.0).to(torch.float32)


# ------------------------------------------------------------------------------------------------------
# hashing and counting


def simhash_projection(
    seed: int, head_dim: int, bits: int, tables: int, device: torch.device
) -> torch.Tensor:
    """W [D, K*L] ~ N(0, 1), float32: drawn on the CPU with a generator seeded by ``seed`` (the same
    W for a (seed, D, K, L) on every device), cached per device."""
    key = (seed, head_dim, bits, tables, device)
    w = _PROJECTIONS.get(key)
    if w is None:
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(head_dim, bits * tables, generator=gen, dtype=torch.float32).to(device)
        with _LOCK:
            _PROJECTIONS[key] = w
    return w


def code_dtype(bits: int) -> torch.dtype:
    """The integer type that holds ``bits`` packed bits: int16 up to 16, else int32."""
    return torch.int16 if bits <= 16 else torch.int32


def simhash_codes(x: torch.Tensor, w: torch.Tensor, bits: int, tables: int) -> torch.Tensor:
    """Packed SimHash codes: x [..., D] float32, w [D, K*L] -> [..., L] (``code_dtype(bits)``); bit b
    of table t is ``(x @ w)[..., t*K + b] > 0``. Computed in chunks of rows (no K*L x N temporary at
    once)."""
    lead, d = x.shape[:-1], x.shape[-1]
    flat = x.reshape(-1, d)
    rows = flat.shape[0]
    dtype = code_dtype(bits)
    width = 16 if dtype == torch.int16 else 32
    shifts = torch.arange(bits, device=x.device, dtype=torch.int64)
    out = torch.empty(rows, tables, dtype=dtype, device=x.device)
    step = max(1, CHUNK_ELEMENTS // max(bits * tables, 1))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        positive = (flat[r0:r1] @ w > 0).view(r1 - r0, tables, bits)
        packed = (positive.to(torch.int64) << shifts).sum(-1)  # [rows, L] in [0, 2^K)
        if bits == width:  # the top bit is the sign bit: wrap, as an unsigned -> signed view would
            packed = torch.where(packed >= 2 ** (width - 1), packed - 2**width, packed)
        out[r0:r1] = packed.to(dtype)
    return out.view(*lead, tables)


def collision_counts(codes_q: torch.Tensor, codes_k: torch.Tensor) -> torch.Tensor:
    """Tables in which each query's code equals each key's: codes_q [B, Hkv, G, L], codes_k
    [B, Hkv, N, L] -> [B, Hkv, G, N] (uint8 for L <= 255, else int16). Vectorised over the batch,
    keys and tables; one KV head, one chunk of keys and one query head of the group at a time.

    Why this shape of loop: the comparison's bytes are summed as uint8 (the reduction vectorises in
    bytes, where a sum into int16/int64 widens first), comparing one query head at a time avoids a
    [G, N, L] temporary, and int16 codes (K <= 16) halve the bytes read."""
    b, hkv, g, n_tables = codes_q.shape
    n = codes_k.shape[2]
    acc = torch.uint8 if n_tables <= 255 else torch.int16
    out = torch.empty(b, hkv, g, n, dtype=acc, device=codes_k.device)
    codes_q = codes_q.to(codes_k.dtype)
    step = max(1, COUNT_CHUNK // max(b * n_tables, 1))
    for h in range(hkv):
        for j0 in range(0, n, step):
            j1 = min(n, j0 + step)
            keys = codes_k[:, h, j0:j1]  # [B, chunk, L]
            for gi in range(g):
                eq = keys == codes_q[:, h, gi, None, :]  # [B, chunk, L]
                out[:, h, gi, j0:j1] = eq.view(torch.uint8).sum(-1, dtype=acc)
    return out


def sampling_probability(theta: torch.Tensor, bits: int, tables: int) -> torch.Tensor:
    """u = P(collide in >= 2 of L tables) = 1 - (1-p)^L - L p (1-p)^(L-1), p = (1 - theta/pi)^K."""
    p = (1.0 - theta / math.pi).clamp(0.0, 1.0) ** bits
    miss = torch.log1p(-p.clamp(max=1.0 - 1e-16))  # log(1 - p), finite at p = 1
    u = 1.0 - torch.exp(tables * miss) - tables * p * torch.exp((tables - 1) * miss)
    return u.clamp(0.0, 1.0)


# ------------------------------------------------------------------------------------------------------
# calibration artifacts


def save_centres(
    path: str | Path, centres: torch.Tensor, model: ModelShape, command: str, meta: dict | None = None
) -> Path:
    """Write a ``"magicpig"`` artifact holding ``centres`` [layers, Hkv, D] (the key means)."""
    want = (model.num_layers, model.num_kv_heads, model.head_dim)
    if tuple(centres.shape) != want:
        raise ShapeError(
            f"centres must have shape [layers, KV heads, head_dim] = {list(want)}, got {list(centres.shape)}"
        )
    return save_artifact(path, ARTIFACT_KIND, {"centres": centres.to(torch.float32)}, model, command, meta)


def resolve_centres(centres: str | Path) -> Path:
    """The artifact path of ``centres``: a shipped name (``"smollm2"``) or a path (with or without the
    .safetensors suffix), resolved."""
    return resolve_artifact(centres, SHIPPED_CENTRES)


def _load_centres(path: str, expect: ModelShape | None) -> dict[str, torch.Tensor]:
    """The artifact's tensors, read once per file version (checked against ``expect`` when given)."""
    art = load_cached(path, SHIPPED_CENTRES, ARTIFACT_KIND, _check_centres)
    if expect is not None:
        check_model(art.model, expect, art.path.with_suffix(".json"))
    return art.tensors


def _check_centres(art: Artifact) -> None:
    if "centres" not in art.tensors or art.tensors["centres"].dim() != 3:
        raise PlanFileError(f"{art.path} holds no centres [layers, KV heads, head_dim] tensor")


def _layer_centre(path: str, layer: int, device: torch.device) -> torch.Tensor:
    art = load_cached(path, SHIPPED_CENTRES, ARTIFACT_KIND, _check_centres)
    c = art.derived.get(("centre", layer, device))
    if c is None:
        centres = art.tensors["centres"]
        if layer >= centres.shape[0]:
            raise ConfigError(f"{path} holds centres of {centres.shape[0]} layers, asked for layer {layer}")
        c = art.derived[("centre", layer, device)] = centres[layer].to(device, torch.float32).contiguous()
    return c


# ------------------------------------------------------------------------------------------------------
# reference


def magicpig_reference(
    q: torch.Tensor,  # [B, Hq, 1, D]
    k: torch.Tensor,  # [B, Hkv, N, D]
    kv_lens: list[int],
    w: torch.Tensor,  # [D, K*L]
    centre: torch.Tensor | None,  # [Hkv, D]
    bits: int,
    tables: int,
    sink: int,
    local: int,
) -> list[list[dict[int, float]]]:
    """The selection of MagicPIG written out with loops and unpacked bits, float64: per (row, query
    head) ``{key: log_weight}`` (0 for the always-kept keys)."""
    b_n, hq = q.shape[0], q.shape[1]
    hkv = k.shape[1]
    g = hq // hkv
    w64 = w.to(torch.float64)
    out = []
    for b in range(b_n):
        n = int(kv_lens[b])
        per_head = []
        for h in range(hq):
            kh = h // g
            qv = q[b, h, 0].to(torch.float64)
            q_bits = [[bool(qv @ w64[:, t * bits + i] > 0) for i in range(bits)] for t in range(tables)]
            chosen: dict[int, float] = {}
            for j in range(n):
                if j < sink or j >= n - local:
                    chosen[j] = 0.0
                    continue
                kv = k[b, kh, j].to(torch.float64)
                if centre is not None:
                    kv = kv - centre[kh].to(torch.float64)
                hits = 0
                for t in range(tables):
                    k_bits = [bool(kv @ w64[:, t * bits + i] > 0) for i in range(bits)]
                    hits += k_bits == q_bits[t]
                if hits < 2:
                    continue
                cos = float(qv @ kv) / max(float(qv.norm() * kv.norm()), 1e-300)
                theta = math.acos(max(-1.0, min(1.0, cos)))
                p = (1.0 - theta / math.pi) ** bits
                u = 1.0 - (1.0 - p) ** tables - tables * p * (1.0 - p) ** (tables - 1)
                chosen[j] = -math.log(max(u, 0.0) + U_FLOOR)
            per_head.append(chosen)
        out.append(per_head)
    return out

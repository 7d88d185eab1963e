"""Loki: top-k keys from low-rank scores in the principal subspace of the keys (Singhania et al., 2024).

Calibration (``sparse_attn.calibration.loki``) finds, per layer and KV head, an orthonormal basis of
the head dimension ordered by how much of the post-RoPE keys' energy each direction carries. With
``P_r`` the first r directions (``rank`` r, or the fewest directions that reach ``variance`` of the
energy, per head), Loki keeps ``K P_r`` per cached key as side data (``[Hkv, r]`` per token) and, at a
decode step, scores every key by ``(q P_r)(K P_r)^T * scale``. The GQA group shares one selection,
ranked by the group's attention mass under those scores (``dynamic.group_log_mass``, as TopK does
with exact scores); the top ``budget`` keys plus the always-kept sinks and local window then get
exact attention in the full head dimension from the existing kernels. With r = D the scores are the
exact ones (P is orthonormal), so Loki then selects what TopK selects.

When the heads of a layer reach ``variance`` with different r, ``P`` is padded to the layer's largest
r with zero columns: a zero column adds exactly 0 to every projected dot product, so each head's
scores are those of its own r, while the side data keeps one shape per layer.

Loki has no prefill selector: prefill runs ``prefill`` (a static method, or dense when None), by design.

The calibration artifact (``basis``: a path, or ``"smollm2"`` for the basis shipped for
SmolLM2-135M) is loaded once per file and cached here, keyed by its resolved path and modification
time; ``for_layer`` binds a layer's projection, so a layer call never reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..artifact import Artifact, ModelShape, check_model, load_cached, resolve_artifact
from ..errors import ConfigError, PlanFileError, ShapeError
from ..token_selection import TokenSelection
from .base import StaticMethod
from .dynamic import (
    DynamicMethod,
    SideSpec,
    check_decode_inputs,
    top_tokens_by_scores,
)

ARTIFACT_KIND = "loki"
DEFAULT_VARIANCE = 0.9
# Bases shipped in the package, by name (sparse_attn/data/<file>.{safetensors,json}).
SHIPPED_BASES = {"smollm2": "loki_smollm2"}

def resolve_basis(basis: str | Path) -> Path:
    """The artifact path of ``basis``: a shipped name (``"smollm2"``) or a path (with or without the
    .safetensors suffix), resolved."""
    return resolve_artifact(basis, SHIPPED_BASES)


def load_basis(basis: str | Path) -> Artifact:
    """The Loki artifact at ``basis``, read once per file version (``artifact.load_cached``).
    PlanFileError naming the path when it is missing or malformed."""
    return load_cached(basis, SHIPPED_BASES, ARTIFACT_KIND, _check_tensors)


def _check_tensors(art: Artifact) -> None:
    basis, explained = art.tensors.get("basis"), art.tensors.get("explained")
    m = art.model
    want = (m.num_layers, m.num_kv_heads, m.head_dim, m.head_dim)
    if basis is None or explained is None:
        raise PlanFileError(
            f"{art.path} must hold tensors 'basis' and 'explained', got {sorted(art.tensors)}"
        )
    if tuple(basis.shape) != want or tuple(explained.shape) != want[:3]:
        raise PlanFileError(
            f"{art.path}: basis {tuple(basis.shape)} / explained {tuple(explained.shape)} do not fit "
            f"{m.describe()} (want {want} / {want[:3]})"
        )


def ranks_for(explained: torch.Tensor, rank: int | None, variance: float | None) -> torch.Tensor:
    """Directions kept per head (int64 [..., Hkv]) from cumulative explained variance [..., Hkv, D]:
    ``rank`` for every head, or the fewest directions whose cumulative share reaches ``variance``."""
    d = explained.shape[-1]
    if rank is not None:
        return torch.full(explained.shape[:-1], rank, dtype=torch.int64)
    assert variance is not None
    # rounding in the eigendecomposition may leave the last share a hair below 1.0
    below = (explained.double() < variance - 1e-9).sum(-1)
    return (below + 1).clamp(1, d)


def layer_projection(art: Artifact, layer: int, rank: int | None, variance: float | None) -> torch.Tensor:
    """P of one layer: float32 [Hkv, D, r_max], each head's first r_h principal directions, then zero
    columns up to the layer's largest r (exact: a zero column adds 0 to every projected product)."""
    basis = art.tensors["basis"][layer].float()  # [Hkv, D, D]
    r = ranks_for(art.tensors["explained"][layer], rank, variance)  # [Hkv]
    r_max = int(r.max())
    keep = torch.arange(r_max)[None, :] < r[:, None]  # [Hkv, r_max]
    return (basis[:, :, :r_max] * keep[:, None, :]).contiguous()


@dataclass(frozen=True)
class Loki(DynamicMethod):
    """Loki low-rank top-k selection.

    ``density`` or ``tokens`` counts every selected key (default density 0.125, the paper's
    ``top_k=0.125``: approximate scores need more keys than the exact oracle's 5% to keep the same
    ones). ``rank`` (r directions, in [1, D]) or ``variance`` (the explained-energy fraction per
    head, in (0, 1]; default 0.9: with the shipped basis SmolLM2's heads need a median of 26 of their
    64 directions for it, 14 to 46) sets r. ``basis`` is the calibration artifact's path or
    ``"smollm2"``; ``layer`` is set by ``for_layer``."""

    name: ClassVar[str] = "loki"
    default_density: ClassVar[float | None] = 0.125
    density: float | None = None
    tokens: int | None = None
    sink_tokens: int = 4
    local_tokens: int = 16
    rank: int | None = None
    variance: float | None = None
    basis: str | None = None
    prefill: StaticMethod | None = None
    layer: int | None = None

    def __post_init__(self) -> None:
        self._check_budget()
        rank, variance = self.rank, self.variance
        if rank is not None and variance is not None:
            raise ConfigError(f"give rank or variance, not both (rank={rank}, variance={variance})")
        if rank is None and variance is None:
            object.__setattr__(self, "variance", DEFAULT_VARIANCE)
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ConfigError(f"rank must be a positive int (principal directions kept), got {rank!r}")
        if variance is not None:
            if isinstance(variance, bool) or not isinstance(variance, (int, float)):
                raise ConfigError(f"variance must be a fraction in (0, 1], got {variance!r}")
            if not 0.0 < float(variance) <= 1.0:
                raise ConfigError(f"variance must be a fraction in (0, 1], got {variance!r}")
            object.__setattr__(self, "variance", float(variance))
        if self.basis is not None and not isinstance(self.basis, str):
            if isinstance(self.basis, Path):
                object.__setattr__(self, "basis", str(self.basis))
            else:
                raise ConfigError(
                    f"basis must be a path or a shipped name {sorted(SHIPPED_BASES)}, got {self.basis!r}"
                )
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0
        ):
            raise ConfigError(f"layer must be a non-negative int, got {self.layer!r}")

    # calibration ---------------------------------------------------------------------------------------
    def artifact(self) -> Artifact:
        if self.basis is None:
            raise ConfigError(
                "Loki needs a calibration basis: basis='smollm2' (shipped) or the path written by "
                "`sparse-attn calibrate loki`"
            )
        return load_basis(self.basis)

    def for_layer(self, layer_idx: int) -> Loki:
        # A config asks once per head and layer call: the bound copies are kept on this instance, so
        # only the first call per layer touches the file cache.
        bound_layers: dict[int, Loki] | None = self.__dict__.get("_bound_layers")
        if bound_layers is None:
            bound_layers = {}
            object.__setattr__(self, "_bound_layers", bound_layers)
        hit = bound_layers.get(layer_idx)
        if hit is not None:
            return hit
        art = self.artifact()
        n = art.model.num_layers
        if not 0 <= layer_idx < n:
            raise ConfigError(f"layer_idx {layer_idx} is outside the Loki basis' {n} layers ({art.path})")
        d = art.model.head_dim
        if self.rank is not None and self.rank > d:
            raise ConfigError(f"rank must be in [1, {d}] (the basis' head_dim), got {self.rank}")
        bound = self if self.layer == layer_idx else replace(self, layer=layer_idx)
        bound._bind(art)
        bound_layers[layer_idx] = bound
        return bound

    def _bind(self, art: Artifact) -> None:
        if self.__dict__.get("_projection") is None:
            assert self.layer is not None
            # not a field: the projection follows from (basis, layer, rank, variance) and stays out
            # of equality and JSON
            object.__setattr__(
                self, "_projection", layer_projection(art, self.layer, self.rank, self.variance)
            )
            object.__setattr__(self, "_on_device", {})

    def projection(self, device: torch.device | None = None) -> torch.Tensor:
        """This layer's P, float32 [Hkv, D, r] (on ``device``, copied there once)."""
        if self.layer is None:
            raise ConfigError("this Loki is not bound to a layer: use .for_layer(layer_idx)")
        if self.__dict__.get("_projection") is None:  # bound once: no file lookup per call
            self._bind(self.artifact())
        proj: torch.Tensor = self._projection  # type: ignore[attr-defined]
        if device is None or proj.device == device:
            return proj
        cache: dict[torch.device, torch.Tensor] = self._on_device  # type: ignore[attr-defined]
        if device not in cache:
            cache[device] = proj.to(device)
        return cache[device]

    def check_model(self, model: ModelShape) -> None:
        art = self.artifact()
        check_model(art.model, model, art.path.with_suffix(".json"))

    def check_fits(self, num_heads: int, num_kv_heads: int) -> None:
        super().check_fits(num_heads, num_kv_heads)
        if self.basis is None:
            return
        # a bound layer answers from its projection (no file lookup on the per-call path)
        proj = self.__dict__.get("_projection")
        made = proj.shape[0] if proj is not None else self.artifact().model.num_kv_heads
        if made != num_kv_heads:
            raise ConfigError(
                f"the Loki basis {self.basis} has {made} KV heads per layer, the layer has "
                f"{num_kv_heads} (tensor parallelism that splits KV heads is not supported for Loki)"
            )

    # side data -----------------------------------------------------------------------------------------
    def side_spec(self, head_dim: int) -> SideSpec:
        proj = self.projection()
        if proj.shape[1] != head_dim:
            raise ShapeError(f"the Loki basis has head_dim {proj.shape[1]}, the keys have {head_dim}")
        return SideSpec("token", 1, (proj.shape[2],))

    def compute_side(self, keys: torch.Tensor, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
        """K P_r: keys [..., Hkv, n, D] -> [..., Hkv, n, r] (float32, or float64 for float64 keys)."""
        return project_keys(keys, self.projection(keys.device))

    # decode --------------------------------------------------------------------------------------------
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
        assert side is not None, "Loki selects from its projected keys"
        check_decode_inputs(q, side, "side")  # ShapeError when the side data does not fit q
        scores = low_rank_scores(q, side, self.projection(q.device), kv_lens, q_lens, scale, causal, backend)
        return top_tokens_by_scores(scores, kv_lens, q_lens, self.budget, self.sink_tokens, self.local_tokens)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("layer") is None:
            out.pop("layer", None)
        return out


def project_keys(keys: torch.Tensor, proj: torch.Tensor) -> torch.Tensor:
    """keys [..., Hkv, n, D] @ P [Hkv, D, r] -> [..., Hkv, n, r], accumulated in float32 (float64 keys:
    float64)."""
    if keys.dim() < 3 or keys.shape[-3] != proj.shape[0] or keys.shape[-1] != proj.shape[1]:
        raise ShapeError(
            f"keys {tuple(keys.shape)} do not fit the Loki projection [Hkv={proj.shape[0]}, "
            f"D={proj.shape[1]}, r={proj.shape[2]}] (want [..., Hkv, n, D])"
        )
    acc = torch.float64 if keys.dtype == torch.float64 else torch.float32
    return torch.matmul(keys.to(acc), proj.to(acc))


def low_rank_scores(
    q: torch.Tensor,  # [B, Hq, Sq, D]
    side: torch.Tensor,  # [B, Hkv, N, r]: K P_r
    proj: torch.Tensor,  # [Hkv, D, r]
    kv_lens: torch.Tensor,
    q_lens: torch.Tensor,
    scale: float,
    causal: bool,
    backend: str = "torch",
) -> torch.Tensor:
    """Scaled low-rank logits ``(q P_r)(K P_r)^T * scale`` of every (group query row, key):
    [B, Hkv, G*Sq, N], -inf where not allowed (as ``topk.exact_scores``, whose masking and Triton
    scoring kernel they share: the projected queries and keys are plain vectors of r dims)."""
    from .topk import exact_scores

    b, hq, sq, d = q.shape
    hkv = side.shape[1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.reshape(b, hkv, (hq // hkv) * sq, d).to(acc)
    qp = torch.matmul(qg, proj.to(acc)).reshape(b, hq, sq, proj.shape[2])  # [B, Hq, Sq, r]
    return exact_scores(qp, side.to(acc), kv_lens, q_lens, scale, causal, backend)


def loki_reference(
    q: torch.Tensor,  # [B, Hq, 1, D]
    k: torch.Tensor,  # [B, Hkv, N, D]
    proj: torch.Tensor,  # [Hkv, D, r]
    kv_lens: list[int],
    scale: float,
    budget: list[int],
    sink: int,
    local: int,
) -> list[list[list[int]]]:
    """The selection of a decode step, plainly, in float64 (the fast path's reference): per (row, KV
    head) the ascending selected keys."""
    out = []
    group = q.shape[1] // k.shape[1]
    for b in range(q.shape[0]):
        n = kv_lens[b]
        heads = []
        for h in range(k.shape[1]):
            p = proj[h].double()
            kp = k[b, h, :n].double() @ p  # [n, r]
            mass = torch.zeros(n, dtype=torch.float64)
            for g in range(group):
                mass += torch.softmax((q[b, h * group + g, 0].double() @ p) @ kp.T * scale, dim=0)
            forced = [j for j in range(n) if j < sink or j >= n - local]
            order = sorted((j for j in range(n) if j not in forced), key=lambda j: (-float(mass[j]), j))
            take = max(budget[b] - len(forced), 0)
            heads.append(sorted(forced + order[:take]))
        out.append(heads)
    return out

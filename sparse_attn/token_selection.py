"""TokenSelection: the token-sparse format for decode (selected key indices per row and head)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import LayoutError


@dataclass(frozen=True, eq=False)
class TokenSelection:
    """Selected keys: indices [B, H, k_max] (ascending in the first counts entries), counts [B, H],
    optional per-key log-weights [B, H, k_max] added to the logits (MagicPIG's importance correction).
    H is 1, Hkv (shared by the GQA group) or Hq."""

    indices: torch.Tensor
    counts: torch.Tensor
    log_weights: torch.Tensor | None = None

    def __post_init__(self) -> None:
        for name, t in (("indices", self.indices), ("counts", self.counts)):
            if not isinstance(t, torch.Tensor):
                raise LayoutError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if self.indices.dim() != 3:
            raise LayoutError(f"indices must have shape [B, H, k_max], got {tuple(self.indices.shape)}")
        if self.log_weights is not None and not isinstance(self.log_weights, torch.Tensor):
            raise LayoutError(
                f"log_weights must be a torch.Tensor or None, got {type(self.log_weights).__name__}"
            )

    @property
    def batch_size(self) -> int:
        return int(self.indices.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.indices.shape[1])

    @property
    def k_max(self) -> int:
        return int(self.indices.shape[2])

    def used(self) -> torch.Tensor:
        """bool [B, H, k_max]: which slots hold a selected key."""
        return torch.arange(self.k_max, device=self.indices.device) < self.counts[..., None]

    def validate(self, kv_lens: int | torch.Tensor) -> TokenSelection:
        """Raise LayoutError unless indices are in [0, kv_len) and strictly increasing; returns self.

        A selection that passed for some host ``kv_lens`` remembers them, so running it again for the
        same lengths (every layer of a decode step) skips the device-to-host checks; its tensors
        must not be modified in place afterwards."""
        key = _lengths_key(kv_lens)
        if key is not None and self.__dict__.get("_valid_for") == key:
            return self
        self._check(kv_lens)
        if key is not None:
            object.__setattr__(self, "_valid_for", key)
        return self

    def built_for(self, kv_lens: torch.Tensor) -> TokenSelection:
        """Mark a selection its builder made well formed by construction (indices ascending and in
        [0, kv_len) for these host ``kv_lens``): running it skips ``validate``'s host checks, as a
        selection that passed them does. For the selectors of the dynamic methods; returns self."""
        key = _lengths_key(kv_lens)
        if key is not None:
            object.__setattr__(self, "_valid_for", key)
        return self

    def _check(self, kv_lens: int | torch.Tensor) -> None:
        for name, t, dim in (("indices", self.indices, 3), ("counts", self.counts, 2)):
            if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
                raise LayoutError(f"{name} must be an int32/int64 tensor")
            if t.dim() != dim:
                raise LayoutError(f"{name} must have {dim} dims, got shape {tuple(t.shape)}")
        b, h, km = self.indices.shape
        if tuple(self.counts.shape) != (b, h):
            raise LayoutError(f"counts must have shape {(b, h)}, got {tuple(self.counts.shape)}")
        if self.log_weights is not None:
            lw = self.log_weights
            if not isinstance(lw, torch.Tensor) or not lw.dtype.is_floating_point:
                raise LayoutError("log_weights must be a floating tensor")
            if tuple(lw.shape) != (b, h, km):
                raise LayoutError(f"log_weights must have shape {(b, h, km)}, got {tuple(lw.shape)}")
        counts = self.counts.to("cpu", torch.int64)
        if bool((counts < 0).any()) or bool((counts > km).any()):
            raise LayoutError(f"counts must lie in [0, k_max={km}]")
        lens = torch.as_tensor(kv_lens, dtype=torch.int64).cpu().reshape(-1)
        if lens.numel() == 1:
            lens = lens.expand(b)
        if lens.numel() != b:
            raise LayoutError(f"kv_lens must have {b} entries, got {lens.numel()}")
        idx = self.indices.to("cpu", torch.int64)
        used = self.used().cpu()
        if bool(((idx < 0) | (idx >= lens[:, None, None]))[used].any()):
            raise LayoutError(f"indices must lie in [0, kv_len) for kv_lens={lens.tolist()}")
        if km > 1 and bool(((idx[..., 1:] <= idx[..., :-1]) & used[..., 1:]).any()):
            raise LayoutError("indices must be strictly increasing within counts")

    def to_dense_mask(self, kv_len: int) -> torch.Tensor:
        """bool [B, H, kv_len]: True where a key is selected."""
        b, h, _ = self.indices.shape
        out = torch.zeros(b, h, kv_len + 1, dtype=torch.bool)
        used = self.used().cpu()
        col = torch.where(used, self.indices.to("cpu", torch.int64).clamp(0, kv_len), kv_len)
        out.scatter_(2, col, used)
        return out[..., :kv_len]

    def density(self, kv_lens: int | torch.Tensor) -> float:
        """Selected (row, head, key) pairs over all of them, like BlockLayout.density."""
        lens = torch.as_tensor(kv_lens, dtype=torch.float64).cpu().reshape(-1).expand(self.batch_size)
        total = float(lens.sum()) * self.num_heads
        return float(self.counts.to("cpu", torch.float64).sum()) / total if total else 0.0


def _lengths_key(kv_lens: int | torch.Tensor) -> tuple[int, ...] | None:
    """Host lengths as a hashable key (None for device tensors: reading them would sync)."""
    if isinstance(kv_lens, int):
        return (kv_lens,)
    if isinstance(kv_lens, torch.Tensor) and kv_lens.device.type == "cpu":
        return tuple(kv_lens.reshape(-1).tolist())
    return None

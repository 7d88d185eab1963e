"""The contiguous side-data store: incremental updates equal a rebuild from K, and any change of the
cached keys it did not see (a new prompt, a reordered or resized batch, a shorter cache) rebuilds."""

from __future__ import annotations

import pytest
import torch

import sparse_attn as sa
from sparse_attn.side_data import RECENT, ContiguousSideStore, compute_side_data


def _grow(k: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    new = torch.randn(k.shape[0], k.shape[1], n, k.shape[3], generator=gen)
    return torch.cat((k, new), dim=2)


@pytest.mark.parametrize("block", [1, 8, 16])
def test_incremental_updates_equal_a_rebuild(block) -> None:
    method = sa.Quest(block_size=block) if block > 1 else _TokenLevel()
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 37, 16, generator=gen)
    lens = torch.tensor([37, 30])
    store = ContiguousSideStore(method)
    store.update(k, lens, new_tokens=int(lens.max()))  # the first call always builds
    for step in range(20):
        k = _grow(k, 1, gen)
        lens = lens + 1
        # right padding: row 1 is shorter; its slot for the new key sits at its own length
        k[1, :, int(lens[1]) - 1] = k[1, :, -1]
        side = store.update(k, lens, new_tokens=1)
        expected = compute_side_data(method, k, lens)
        assert side is not None and expected is not None
        for b in range(2):
            units = -(-int(lens[b]) // block)
            assert torch.equal(side[b, :, :units], expected[b, :, :units]), (step, b)
    assert store.rebuilds == 1 and store.updates == 20


@pytest.mark.parametrize(
    "change",
    ["new_prompt_same_length", "beam_divergence", "shorter_cache", "batch_change", "gap", "rows_of_other_lengths"],
)
def test_changed_keys_are_never_reused(change) -> None:
    method = sa.Quest(block_size=8)
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(3, 2, 50, 16, generator=gen)
    lens = torch.tensor([50, 50, 50])
    store = ContiguousSideStore(method)
    store.update(k, lens, new_tokens=50)
    for _ in range(4):  # a few decode steps: these keys are "generated" ones
        k = _grow(k, 1, gen)
        lens = lens + 1
        store.update(k, lens, new_tokens=1)
    assert store.rebuilds == 1
    # poison the stored data: any reuse of it shows up as NaN in the result
    assert store._side is not None
    store._side.fill_(float("nan"))
    nxt = _grow(k, 1, gen)
    nlens = lens + 1
    if change == "new_prompt_same_length":
        nxt = torch.randn_like(nxt)
    elif change == "rows_of_other_lengths":
        nlens = torch.tensor([51, 55, 55])  # the same tensor, but rows now claim other lengths
    elif change == "beam_divergence":
        # row 0 continues row 1's generation: same prompt, different generated keys
        nxt[0, :, 50:] = nxt[1, :, 50:]
    elif change == "shorter_cache":
        nxt, nlens = nxt[:, :, :40], torch.tensor([40, 40, 40])
    elif change == "batch_change":
        nxt, nlens = nxt[:2], nlens[:2]
    elif change == "gap":
        nxt = _grow(nxt, 1, gen)
        nlens = nlens + 1
    side = store.update(nxt, nlens, new_tokens=1)
    assert store.rebuilds == 2
    assert side is not None and bool(torch.isfinite(side).all())
    assert torch.equal(side, compute_side_data(method, nxt, nlens))


def test_beam_reorders_move_the_stored_rows() -> None:
    """Beams share a prompt and diverge in generated keys; a reorder (with duplicates) moves the
    stored rows along, and data of rows that no stored row matches is never reused."""
    method = sa.Quest(block_size=8)
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randn(1, 2, 30, 16, generator=gen).expand(3, 2, 30, 16)
    k = _grow(prompt.clone(), 3, gen)
    lens = torch.tensor([33, 33, 33])
    store = ContiguousSideStore(method)
    store.update(k, lens, new_tokens=33)
    for _ in range(3):
        k = _grow(k, 1, gen)
        lens = lens + 1
        store.update(k, lens, new_tokens=1)
    k = _grow(k[torch.tensor([2, 2, 0])], 1, gen)
    side = store.update(k, lens + 1, new_tokens=1)
    assert (store.rebuilds, store.reorders) == (1, 1)
    assert torch.equal(side, compute_side_data(method, k, lens + 1))
    # a row whose generated keys match no stored row: rebuilt, never patched together
    k = _grow(k, 1, gen)
    k[1, :, 31] = torch.randn(2, 16, generator=gen)
    side = store.update(k, lens + 2, new_tokens=1)
    assert store.rebuilds == 2
    assert torch.equal(side, compute_side_data(method, k, lens + 2))


@pytest.mark.parametrize("new_tokens", [1, 3])
@pytest.mark.parametrize("back", [1, RECENT // 2, RECENT])
def test_the_newest_keys_are_checked_in_every_step(new_tokens, back) -> None:
    """The RECENT newest keys are compared before data is reused however many steps ran (the check
    slots are reused in turn), right after a rebuild (the prefix's last keys) as after many steps."""
    method = sa.Quest(block_size=8)
    gen = torch.Generator().manual_seed(4)
    k = torch.randn(2, 2, 100, 16, generator=gen)
    lens = torch.tensor([100, 100])
    for steps in (0, RECENT + 5):
        store = ContiguousSideStore(method)
        store.update(k, lens, new_tokens=100)
        kk, ll = k, lens
        for _ in range(steps):
            kk, ll = _grow(kk, new_tokens, gen), ll + new_tokens
            store.update(kk, ll, new_tokens=new_tokens)
        assert store.rebuilds == 1
        kk, ll = _grow(kk, new_tokens, gen), ll + new_tokens
        kk[1, 0, int(ll[1]) - new_tokens - back] += 1.0  # a key the store covered, ``back`` from its end
        side = store.update(kk, ll, new_tokens=new_tokens)
        assert store.rebuilds == 2, (steps, back)
        assert torch.equal(side, compute_side_data(method, kk, ll))


def test_unchanged_continuation_reuses_the_data() -> None:
    """The fast path is real: a plain continuation touches only the last block (poison elsewhere stays)."""
    method = sa.Quest(block_size=8)
    gen = torch.Generator().manual_seed(2)
    k = torch.randn(1, 2, 64, 16, generator=gen)
    store = ContiguousSideStore(method)
    store.update(k, torch.tensor([64]), new_tokens=64)
    assert store._side is not None
    store._side[:, :, 0] = float("nan")  # a block the next step does not touch
    side = store.update(_grow(k, 1, gen), torch.tensor([65]), new_tokens=1)
    assert side is not None and bool(side[:, :, 0].isnan().all()) and store.rebuilds == 1


class _TokenLevel(sa.Quest):
    """A token-level side-data method for the store tests: each key's own [min, max] pair."""

    def side_spec(self, head_dim: int) -> sa.SideSpec:
        return sa.SideSpec("token", 1, (2, head_dim))

    def compute_side(self, keys: torch.Tensor, kv_lens: torch.Tensor | None = None) -> torch.Tensor:
        return torch.stack((keys, keys), dim=-2)

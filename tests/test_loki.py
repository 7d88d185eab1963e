"""Loki through the functional API and its calibration: dense limit, selections against brute force
and the in-module reference, the stored basis against the collected keys, artifacts, configs and
errors."""

from __future__ import annotations

import json
import os

import pytest
import torch

import sparse_attn as sa
from sparse_attn.artifact import ModelShape, save_artifact
from sparse_attn.calibration import calibrate_loki, collect_key_stats, key_means, principal_directions
from sparse_attn.errors import ConfigError, PlanFileError, ShapeError
from sparse_attn.methods import method_from_dict
from sparse_attn.methods.loki import load_basis, loki_reference, ranks_for, resolve_basis
from tests import bruteforce_dynamic as bfd
from tests.hf_models import build
from tests.oracle import dense_attention, make_qkv, max_err, selection_mask_and_bias
from tests.test_dynamic_methods import DECODE_CASES, DENSE_CASES, assert_equals_dense

FP32 = dict(atol=3e-5, rtol=1e-5)


def random_basis(path, num_kv_heads: int, head_dim: int, layers: int = 1, seed: int = 0):
    """A Loki artifact with random orthonormal bases and a decaying spectrum per (layer, KV head)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(layers, num_kv_heads, head_dim, head_dim, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(m).Q
    evals = torch.rand(layers, num_kv_heads, head_dim, generator=g, dtype=torch.float64)
    evals = evals.sort(-1, descending=True).values ** 3
    explained = evals.cumsum(-1) / evals.sum(-1, keepdim=True)
    shape = ModelShape("test", layers, num_kv_heads, num_kv_heads, head_dim)
    save_artifact(path, "loki", {"basis": basis.float(), "explained": explained.float()}, shape, "test")
    return str(path)


@pytest.mark.parametrize("B,Hq,Hkv,Sq,Skv,D,kv_lens,causal", DENSE_CASES)
@pytest.mark.parametrize("rank", ["D", 8, None], ids=["rD", "r8", "var0.9"])
def test_budget_covering_the_row_is_dense(tmp_path, B, Hq, Hkv, Sq, Skv, D, kv_lens, causal, rank) -> None:
    basis = random_basis(tmp_path / "b", Hkv, D)
    method = sa.Loki(density=1.0, rank=D if rank == "D" else rank, basis=basis)
    assert_equals_dense(method, B, Hq, Hkv, Sq, Skv, D, kv_lens, causal)


BUDGETS = [dict(density=0.1), dict(tokens=40), dict(density=0.02)]


@pytest.mark.parametrize("B,Hq,Hkv,Skv,D,kv_lens", DECODE_CASES)
@pytest.mark.parametrize("budget", BUDGETS, ids=["d0.1", "t40", "d0.02"])
@pytest.mark.parametrize("rank", [5, None], ids=["r5", "var0.7"])
def test_decode_selection_is_brute_force_low_rank_topk(
    tmp_path, B, Hq, Hkv, Skv, D, kv_lens, budget, rank
) -> None:
    basis = random_basis(tmp_path / "b", Hkv, D, seed=B + Skv)
    method = sa.Loki(
        sink_tokens=3, local_tokens=5, rank=rank, variance=None if rank else 0.7, basis=basis, **budget
    )
    q, k, v = make_qkv(B, Hq, Hkv, 1, Skv, D, kv_lens=kv_lens, seed=5)
    sel = sa.select(method, q, k, kv_lens=list(kv_lens))
    art = load_basis(basis)
    ranks = ranks_for(art.tensors["explained"][0], method.rank, method.variance).tolist()
    if rank is None:  # per-head r from the explained share, checked by hand
        for h, r in enumerate(ranks):
            ex = art.tensors["explained"][0, h].double()
            assert ex[r - 1] >= 0.7 - 1e-9 and (r == 1 or ex[r - 2] < 0.7)
    expected = bfd.loki_decode(
        q,
        k,
        art.tensors["basis"][0],
        ranks,
        [1] * B,
        kv_lens,
        D**-0.5,
        True,
        method.density,
        method.tokens,
        3,
        5,
    )
    _assert_selection(sel, expected)
    out = sa.sparse_attention(q, k, v, method, kv_lens=list(kv_lens))
    mask, _ = selection_mask_and_bias(sel.indices, sel.counts, None, 1, Skv, Hq, kv_lens, causal=True)
    ref, _ = dense_attention(q, k, v, mask)
    assert max_err(out, ref) < FP32["atol"]
    # the module's own plain reference agrees with the fast path
    bound = method.for_layer(0)
    plain = loki_reference(
        q, k, bound.projection(), list(kv_lens), D**-0.5, method.budget(torch.tensor(kv_lens)).tolist(), 3, 5
    )
    assert [
        [sel.indices[b, h, : int(sel.counts[b, h])].tolist() for h in range(Hkv)] for b in range(B)
    ] == plain


def _assert_selection(sel, expected) -> None:
    for b, heads in enumerate(expected):
        for h, keys in enumerate(heads):
            got = sel.indices[b, h, : int(sel.counts[b, h])].tolist()
            assert got == sorted(keys), (b, h, sorted(set(got) ^ keys))


def test_full_rank_selects_what_topk_selects(tmp_path) -> None:
    q, k, _ = make_qkv(2, 6, 3, 1, 211, 32, kv_lens=(211, 150), seed=9)
    basis = random_basis(tmp_path / "b", 3, 32)
    loki = sa.select(sa.Loki(tokens=30, rank=32, basis=basis), q, k, kv_lens=[211, 150])
    topk = sa.select(sa.TopK(tokens=30), q, k, kv_lens=[211, 150])
    assert torch.equal(loki.counts, topk.counts)
    assert torch.equal(loki.indices, topk.indices)


def test_heads_with_different_ranks_pad_with_zero_columns(tmp_path) -> None:
    basis = random_basis(tmp_path / "b", 4, 16, seed=3)
    method = sa.Loki(variance=0.8, basis=basis).for_layer(0)
    ranks = ranks_for(load_basis(basis).tensors["explained"][0], None, 0.8)
    assert len(set(ranks.tolist())) > 1, "the test wants heads of different r"
    proj = method.projection()
    assert proj.shape == (4, 16, int(ranks.max()))
    assert method.side_spec(16).shape == (int(ranks.max()),)
    for h, r in enumerate(ranks.tolist()):
        assert torch.count_nonzero(proj[h, :, r:]) == 0
        torch.testing.assert_close(proj[h, :, :r], load_basis(basis).tensors["basis"][0, h, :, :r])
    keys = torch.randn(2, 4, 7, 16)
    assert method.compute_side(keys).shape == (2, 4, 7, int(ranks.max()))


# calibration -----------------------------------------------------------------------------------------


def _capture_keys(model, sequences):
    """Post-RoPE keys per layer, captured by the test's own attention function: {layer: [Hkv, n, D]}."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    seen: dict[int, list[torch.Tensor]] = {}

    def capture(module, query, key, value, mask, **kwargs):
        seen.setdefault(module.layer_idx, []).append(key[0].detach().double())
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, **kwargs)

    AttentionInterface.register("test_capture_keys", capture)
    AttentionMaskInterface.register("test_capture_keys", sdpa_mask)
    original = model.config._attn_implementation
    model.set_attn_implementation("test_capture_keys")
    try:
        with torch.no_grad():
            for s in sequences:
                model(input_ids=torch.tensor([s]), use_cache=False)
    finally:
        model.set_attn_implementation(original)
    return {layer: torch.cat(parts, dim=1) for layer, parts in seen.items()}


def _sequences(n: int, length: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (length,), generator=g).tolist() for _ in range(n)]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_basis_is_orthonormal_and_reconstructs_the_keys_to_the_reported_share(arch) -> None:
    model = build(arch, num_heads=6, num_kv_heads=3, head_dim=16, layers=2)
    seqs = _sequences(3, 37)
    tensors, stats = calibrate_loki(model, seqs, seq_len=40)  # windows cross the sequences' ends
    stream = [t for s in seqs for t in s]
    keys = _capture_keys(model, [stream[i : i + 40] for i in range(0, 111, 40)])
    basis, explained = tensors["basis"].double(), tensors["explained"].double()
    assert basis.shape == (2, 3, 16, 16) and explained.shape == (2, 3, 16)
    eye = torch.eye(16, dtype=torch.float64)
    assert max_err(basis.transpose(-1, -2) @ basis, eye) < 1e-5
    assert stats.tokens() == 111
    for layer in range(2):
        k = keys[layer]  # [Hkv, n, D]
        torch.testing.assert_close(key_means(stats)[layer], k.mean(1))
        energy = (k**2).sum((1, 2))
        for r in (1, 4, 9, 16):
            kept = ((k @ basis[layer, :, :, :r]) ** 2).sum((1, 2))
            torch.testing.assert_close(kept / energy, explained[layer, :, r - 1], atol=1e-5, rtol=1e-5)
        # sorted by variance: each direction keeps no more than the one before
        assert bool((explained[layer].diff(dim=-1) >= -1e-7).all())
        assert bool((explained[layer].diff(dim=-1).diff(dim=-1) <= 1e-6).all())


def test_principal_directions_of_a_known_matrix() -> None:
    q = torch.linalg.qr(torch.randn(5, 5, dtype=torch.float64)).Q
    evals = torch.tensor([4.0, 3.0, 2.0, 0.5, 0.5], dtype=torch.float64)
    m = q @ torch.diag(evals) @ q.T
    basis, explained = principal_directions(m)
    for i in range(3):
        assert abs(float(basis[:, i] @ q[:, i])) == pytest.approx(1.0, abs=1e-9)
    torch.testing.assert_close(explained, evals.cumsum(0) / 10.0)


def test_calibration_round_trip_and_a_basis_for_another_model_is_refused(tmp_path) -> None:
    model = build("llama", num_heads=4, num_kv_heads=2, head_dim=16, layers=2)
    tensors, _ = calibrate_loki(
        model, _sequences(2, 30), seq_len=64, out=tmp_path / "tiny", command="cmd --x"
    )
    art = load_basis(tmp_path / "tiny")
    assert torch.equal(art.tensors["basis"], tensors["basis"])
    assert json.loads((tmp_path / "tiny.json").read_text())["command"] == "cmd --x"
    method = sa.Loki(tokens=8, basis=str(tmp_path / "tiny"))
    method.check_model(ModelShape.from_hf_config(model.config))
    other = build("llama", num_heads=4, num_kv_heads=2, head_dim=8, layers=2)
    with pytest.raises(PlanFileError, match=r"head_dim 16.*head_dim 8"):
        method.check_model(ModelShape.from_hf_config(other.config))
    with pytest.raises(ConfigError, match="head_dim 16"):
        sa.patch(other, method)
    with pytest.raises(PlanFileError, match="3 layers"):
        sa.patch(build("llama", layers=3), method)
    missing = tmp_path / "nowhere" / "basis"
    with pytest.raises(PlanFileError, match=str(missing)):
        sa.Loki(basis=str(missing)).check_model(ModelShape.from_hf_config(model.config))


def test_loaded_bases_are_cached_per_path_and_modification_time(tmp_path) -> None:
    path = random_basis(tmp_path / "b", 2, 8)
    first = load_basis(path)
    assert load_basis(path + ".safetensors") is first
    random_basis(tmp_path / "b", 2, 8, seed=7)
    st = tmp_path / "b.safetensors"
    os.utime(st, ns=(st.stat().st_atime_ns, first.path.stat().st_mtime_ns + 10**9))
    second = load_basis(path)
    assert second is not first and not torch.equal(second.tensors["basis"], first.tensors["basis"])
    # a layer binds its projection once: the next calls of the same config never look at the file
    method = sa.Loki(basis=path)
    assert method.for_layer(0) is method.for_layer(0)


def test_json_round_trip(tmp_path) -> None:
    basis = random_basis(tmp_path / "b", 2, 8, layers=3)
    for method in (
        sa.Loki(basis=basis),
        sa.Loki(tokens=64, rank=3, basis=basis, prefill=sa.SinkLocal(window_tokens=32)),
    ):
        assert method_from_dict(json.loads(json.dumps(method.to_dict()))) == method
    cfg = sa.SparseAttentionConfig(default=sa.Loki(density=0.1, basis=basis), layers={1: sa.TopK()})
    again = sa.SparseAttentionConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert cfg.method_for(2, 0).layer == 2 and cfg.method_for(2, 0).basis == basis
    assert sa.Loki().density == 0.125 and sa.Loki().variance == 0.9


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: sa.Loki(rank=0), "rank"),
        (lambda: sa.Loki(rank=2.5), "rank"),
        (lambda: sa.Loki(rank=True), "rank"),
        (lambda: sa.Loki(variance=0.0), "variance"),
        (lambda: sa.Loki(variance=1.5), "variance"),
        (lambda: sa.Loki(rank=4, variance=0.9), "not both"),
        (lambda: sa.Loki(density=0.1, tokens=3), "not both"),
        (lambda: sa.Loki(basis=3), "basis"),
        (lambda: sa.Loki(prefill=sa.TopK()), "prefill"),
        (lambda: sa.Loki().for_layer(0), "calibration basis"),
    ],
)
def test_bad_configs_raise_config_error(make, match) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_errors_that_need_a_basis(tmp_path) -> None:
    basis = random_basis(tmp_path / "b", 2, 8, layers=2)
    with pytest.raises(ConfigError, match=r"rank must be in \[1, 8\]"):
        sa.Loki(rank=9, basis=basis).for_layer(0)
    with pytest.raises(ConfigError, match="outside"):
        sa.Loki(basis=basis).for_layer(2)
    q, k, _ = make_qkv(1, 4, 4, 1, 20, 8)
    with pytest.raises(ConfigError, match="2 KV heads"):
        sa.select(sa.Loki(basis=basis), q, k)
    q, k, _ = make_qkv(1, 4, 2, 1, 20, 16)
    with pytest.raises(ShapeError, match="head_dim"):
        sa.select(sa.Loki(basis=basis), q, k)
    with pytest.raises(ConfigError, match="not bound"):
        sa.Loki(basis=basis).projection()


def test_shipped_smollm2_basis() -> None:
    path = resolve_basis("smollm2")
    assert path.is_file(), path
    method = sa.Loki(basis="smollm2")
    smollm2 = ModelShape("llama", 30, 9, 3, 64)
    method.check_model(smollm2)
    art = load_basis("smollm2")
    basis = art.tensors["basis"].double()
    assert max_err(basis.transpose(-1, -2) @ basis, torch.eye(64, dtype=torch.float64)) < 1e-4
    ranks = ranks_for(art.tensors["explained"], None, 0.9)
    assert 8 <= float(ranks.double().median()) <= 48
    with pytest.raises(PlanFileError, match="30 layers"):
        method.check_model(ModelShape("llama", 2, 4, 2, 16))


def test_collect_key_stats_restores_the_model_and_needs_keys() -> None:
    model = build("llama")
    before = model.config._attn_implementation
    stats = collect_key_stats(model, [[1, 2, 3]])
    assert model.config._attn_implementation == before
    assert stats.tokens() == 3
    with pytest.raises(ConfigError, match="no keys"):
        collect_key_stats(model, []).means()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_triton_scoring_matches_torch(tmp_path, dtype, monkeypatch) -> None:
    """backend='triton' scores the projected vectors (odd r) with the TopK scoring kernel."""
    from sparse_attn.triton_kernels import dynamic_scores

    calls = []
    kernel = dynamic_scores.topk_scores
    monkeypatch.setattr(dynamic_scores, "topk_scores", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    method = sa.Loki(tokens=40, rank=13, basis=random_basis(tmp_path / "b", 2, 64))
    q, k, _ = (t.to(dtype) for t in make_qkv(2, 6, 2, 1, 230, 64, kv_lens=(230, 101), seed=11))
    sel_t = sa.select(method, q, k, kv_lens=[230, 101], backend="triton")
    assert calls, "backend='triton' did not run the scoring kernel"
    sel_c = sa.select(method, q, k, kv_lens=[230, 101], backend="torch")
    assert torch.equal(sel_t.counts, sel_c.counts) and torch.equal(sel_t.indices, sel_c.indices)
    assert int(sel_t.counts.min()) < 101


def test_accuracy_benchmark_sweeps_loki_by_name() -> None:
    from sparse_attn import cli
    from sparse_attn.bench import accuracy

    args = cli.build_parser().parse_args(
        ["bench", "accuracy", "--methods", "dense,loki", "--loki-basis", "/x/b"]
    )
    methods = cli._methods_arg(args.methods, dynamic=True, loki_basis=args.loki_basis)
    assert methods == {"dense": None, "loki": sa.Loki(basis="/x/b")}
    assert cli._methods_arg("loki", dynamic=True)["loki"] == sa.Loki(basis="smollm2")
    out = accuracy.expand_densities({"loki": sa.Loki(tokens=64, rank=8, basis="smollm2")}, [0.1, 0.05])
    assert list(out) == ["loki@0.05", "loki@0.1"]
    assert out["loki@0.05"] == sa.Loki(density=0.05, rank=8, basis="smollm2")

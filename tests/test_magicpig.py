"""MagicPIG through the functional API: the SimHash collision probability, the selection and its
weights against the plain-loop reference, the estimator's error as L grows, the always-kept keys,
hashing of new decode tokens, centres from a calibration artifact, their calibration (the mean of
the keys a model computes) and the centres shipped for SmolLM2, configs and errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import sparse_attn as sa
from sparse_attn.artifact import ModelShape
from sparse_attn.calibration import calibrate_magicpig
from sparse_attn.errors import ConfigError, PlanFileError, ShapeError
from sparse_attn.methods import METHODS, method_from_dict
from sparse_attn.methods import magicpig as mp
from sparse_attn.side_data import ContiguousSideStore, compute_side_data
from tests.hf_models import build
from tests.oracle import causal_batch_mask, dense_attention, make_qkv, max_err, selection_mask_and_bias

FP32 = dict(atol=3e-5, rtol=1e-5)


def _centres(tmp_path, layers, hkv, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(layers, hkv, d, generator=g) * 0.5
    model = ModelShape("llama", layers, 2 * hkv, hkv, d)
    path = mp.save_centres(tmp_path / "centres", centres, model, "test")
    return str(path), centres, model


# ------------------------------------------------------------------------------------ hashing
@pytest.mark.parametrize("bits", [1, 3, 6, 10])
@pytest.mark.parametrize("theta", [0.2, 0.7, 1.3, 2.0, 2.8])
def test_collision_probability_is_one_minus_theta_over_pi_to_the_k(bits, theta) -> None:
    """Per table, two vectors at angle theta collide with probability (1 - theta/pi)^K. The L tables
    use independent columns of W, so the count of colliding tables is Binomial(L, p): the empirical
    rate must lie within 5 standard deviations (plus 1/L) of p, for fixed seeds."""
    d, tables = 64, 20_000
    g = torch.Generator().manual_seed(bits * 100 + int(theta * 10))
    x = torch.randn(d, generator=g, dtype=torch.float64)
    x /= x.norm()
    other = torch.randn(d, generator=g, dtype=torch.float64)
    other -= (other @ x) * x
    other /= other.norm()
    y = math.cos(theta) * x + math.sin(theta) * other
    w = mp.simhash_projection(7, d, bits, tables, torch.device("cpu"))
    codes = mp.simhash_codes(torch.stack((x, y)).float(), w, bits, tables)
    rate = float((codes[0] == codes[1]).double().mean())
    p = (1 - theta / math.pi) ** bits
    tol = 5 * math.sqrt(p * (1 - p) / tables) + 1 / tables
    assert abs(rate - p) <= tol, (rate, p, tol)


def test_sampling_probability_is_the_binomial_tail() -> None:
    theta = torch.linspace(0.0, math.pi, 41, dtype=torch.float64)
    for bits, tables in ((1, 2), (4, 10), (10, 150)):
        u = mp.sampling_probability(theta, bits, tables)
        for t, got in zip(theta.tolist(), u.tolist()):
            p = (1 - t / math.pi) ** bits
            want = sum(math.comb(tables, i) * p**i * (1 - p) ** (tables - i) for i in range(2, tables + 1))
            assert got == pytest.approx(want, abs=1e-12)


def test_projection_is_seeded_and_codes_are_the_packed_signs() -> None:
    d, bits, tables = 24, 5, 9
    m = sa.MagicPIG(bits=bits, tables=tables, seed=123)
    w = m.projection(d)
    assert torch.equal(w, torch.randn(d, bits * tables, generator=torch.Generator().manual_seed(123)))
    assert torch.equal(w, sa.MagicPIG(bits=bits, tables=tables, seed=123).projection(d))
    assert not torch.equal(w, sa.MagicPIG(bits=bits, tables=tables, seed=124).projection(d))
    keys = torch.randn(2, 3, 17, d, generator=torch.Generator().manual_seed(1))
    codes = m.compute_side(keys)
    assert codes.dtype == torch.int16 and codes.shape == (2, 3, 17, tables)
    proj = keys.double() @ w.double()
    for t in range(tables):
        want = sum((proj[..., t * bits + i] > 0).long() << i for i in range(bits))
        assert torch.equal(codes[..., t].long(), want)


@pytest.mark.parametrize("bits,dtype", [(16, torch.int16), (17, torch.int32), (32, torch.int32)])
def test_full_width_codes_wrap_into_the_sign_bit(bits, dtype) -> None:
    m = sa.MagicPIG(bits=bits, tables=4, seed=3)
    keys = torch.randn(1, 1, 64, 16, generator=torch.Generator().manual_seed(0))
    codes = m.compute_side(keys)
    assert codes.dtype == dtype
    proj = keys.double() @ m.projection(16).double()
    mask = (1 << (16 if dtype == torch.int16 else 32)) - 1
    for t in range(4):
        want = sum((proj[..., t * bits + i] > 0).long() << i for i in range(bits))
        assert torch.equal(codes[..., t].long() & mask, want)
    if bits in (16, 32):
        assert bool((codes < 0).any())  # the top bit is the sign bit


@pytest.mark.parametrize("tables", [2, 150, 300], ids=lambda t: f"L{t}")
def test_collision_counts_are_the_brute_force_counts(tables) -> None:
    g = torch.Generator().manual_seed(tables)
    codes_k = torch.randint(0, 4, (2, 3, 37, tables), generator=g, dtype=torch.int16)
    codes_q = torch.randint(0, 4, (2, 3, 2, tables), generator=g, dtype=torch.int16)
    codes_q[:, :, 0] = codes_k[:, :, 5]  # key 5 collides in every table (past uint8 at L = 300)
    got = mp.collision_counts(codes_q, codes_k)
    want = (codes_k[:, :, None] == codes_q[:, :, :, None]).long().sum(-1)
    assert torch.equal(got.long(), want) and int(want.max()) == tables


# ------------------------------------------------------------------------------------ selection
DECODE_CASES = [
    pytest.param(1, 4, 2, 257, 64, (257,), id="B1-T257-HQ4-H2-D64"),
    pytest.param(2, 6, 2, 151, 32, (151, 90), id="B2-T151-HQ6-H2-D32-pad"),
    pytest.param(2, 3, 3, 129, 48, (129, 64), id="B2-T129-MHA-D48-pad"),
    pytest.param(1, 8, 1, 63, 16, (63,), id="B1-T63-HQ8-H1-D16"),
]


def _assert_matches_reference(sel, ref) -> None:
    for b, heads in enumerate(ref):
        for h, want in enumerate(heads):
            n = int(sel.counts[b, h])
            got = sel.indices[b, h, :n].tolist()
            assert got == sorted(want), (b, h, sorted(set(got) ^ set(want)))
            lw = sel.log_weights[b, h, :n].double()
            assert torch.allclose(lw, torch.tensor([want[j] for j in got], dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("B,Hq,Hkv,Skv,D,kv_lens", DECODE_CASES)
@pytest.mark.parametrize("centred", [False, True], ids=["plain", "centred"])
def test_selection_and_weights_equal_the_reference(B, Hq, Hkv, Skv, D, kv_lens, centred, tmp_path) -> None:
    path = centre = None
    layer = 1
    if centred:
        path, centres, _ = _centres(tmp_path, 3, Hkv, D)
        centre = centres[layer]
    method = sa.MagicPIG(bits=4, tables=8, seed=5, sink_tokens=3, local_tokens=5, centres=path)
    q, k, v = make_qkv(B, Hq, Hkv, 1, Skv, D, kv_lens=kv_lens, seed=3)
    sel = sa.select(method, q, k, kv_lens=list(kv_lens), layer_idx=layer)
    assert sel.num_heads == Hq and sel.log_weights is not None
    ref = mp.magicpig_reference(q, k, list(kv_lens), method.projection(D), centre, 4, 8, 3, 5)
    _assert_matches_reference(sel, ref)
    sampled = sel.counts - min(3 + 5, min(kv_lens))
    assert int(sampled.max()) > 0 and bool((sel.counts < torch.tensor(kv_lens)[:, None]).all())
    # the output: float64 attention over exactly the reported keys, with their log-weights
    out = sa.sparse_attention(q, k, v, method, kv_lens=list(kv_lens), layer_idx=layer)
    mask, bias = selection_mask_and_bias(
        sel.indices, sel.counts, sel.log_weights, 1, Skv, Hq, kv_lens, causal=True
    )
    ref_out, _ = dense_attention(q, k, v, mask, bias=bias)
    assert max_err(out, ref_out) < FP32["atol"]


def test_centred_codes_are_the_codes_of_the_centred_keys(tmp_path) -> None:
    path, centres, _ = _centres(tmp_path, 1, 2, 32)
    _, k, _ = make_qkv(1, 4, 2, 1, 80, 32, seed=9)
    plain = compute_side_data(sa.MagicPIG(bits=6, tables=10), k, torch.tensor([80]))
    centred = compute_side_data(
        sa.MagicPIG(bits=6, tables=10, centres=path).for_layer(0), k, torch.tensor([80])
    )
    assert plain is not None and centred is not None and not torch.equal(plain, centred)
    shifted = compute_side_data(
        sa.MagicPIG(bits=6, tables=10), k - centres[0][None, :, None], torch.tensor([80])
    )
    assert torch.equal(centred, shifted)


@pytest.mark.parametrize("kv_len", [1, 5, 9, 40, 133])
@pytest.mark.parametrize("sink,local", [(0, 0), (4, 0), (0, 7), (3, 16)])
def test_sinks_and_local_window_are_always_selected_exactly(kv_len, sink, local) -> None:
    # one table bit and 2 tables: about a quarter of the keys collide twice; the rest must be the
    # always-kept ones, with log-weight 0
    method = sa.MagicPIG(bits=1, tables=2, sink_tokens=sink, local_tokens=local)
    q, k, _ = make_qkv(1, 4, 2, 1, kv_len, 16, seed=kv_len)
    sel = sa.select(method, q, k)
    j = torch.arange(kv_len)
    forced = (j < sink) | (j >= kv_len - local)
    chosen = sel.to_dense_mask(kv_len)[0]
    assert bool(chosen[:, forced].all())
    sampled = 0
    for h in range(4):
        n = int(sel.counts[0, h])
        idx, lw = sel.indices[0, h, :n], sel.log_weights[0, h, :n]
        assert bool((lw[forced[idx]] == 0).all())
        assert bool((lw[~forced[idx]] > 0).all())  # u < 1 for every sampled key: weight above 1
        sampled += int((~forced[idx]).sum())
    if int((~forced).sum()) >= 20:  # 4 heads x >= 20 free keys at ~1/4 each: some were sampled
        assert sampled > 0


@pytest.mark.parametrize("B,Hq,Hkv,Skv,D,kv_lens", DECODE_CASES[:2])
def test_a_window_covering_the_row_is_dense(B, Hq, Hkv, Skv, D, kv_lens) -> None:
    q, k, v = make_qkv(B, Hq, Hkv, 1, Skv, D, kv_lens=kv_lens, seed=4)
    method = sa.MagicPIG(bits=2, tables=3, local_tokens=10_000)
    out, lse = sa.sparse_attention(q, k, v, method, kv_lens=list(kv_lens), return_lse=True)
    q_lens = [1] * B
    kvl = list(kv_lens) if kv_lens is not None else [Skv] * B
    mask = causal_batch_mask(q_lens, kvl, 1, Skv, Hq, causal=True)
    ref, _ = dense_attention(q, k, v, mask)
    assert max_err(out, ref, mask.any(-1)[..., None].expand_as(ref)) < FP32["atol"]
    assert bool(torch.isfinite(lse).all())


def test_estimator_error_falls_as_tables_grow() -> None:
    """The paper's estimator is unbiased up to the u floor: averaged over seeds of W, its error
    against exact attention falls as L grows (more tables sample more of the mass)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 400, 32
    k = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64)
    q = (k[:, :, 100:101] + k[:, :, 250:251]) * 0.8 + torch.randn(
        1, 1, 1, d, generator=gen, dtype=torch.float64
    ) * 0.3
    exact, _ = dense_attention(q, k, v, torch.ones(1, 1, 1, n, dtype=torch.bool))
    errors = {}
    for tables in (10, 40, 160):
        errs = []
        for seed in range(12):
            m = sa.MagicPIG(bits=6, tables=tables, seed=seed, sink_tokens=1, local_tokens=1)
            errs.append(float((sa.sparse_attention(q, k, v, m) - exact).norm()))
        errors[tables] = sum(errs) / len(errs)
    assert errors[10] > errors[40] > errors[160], errors
    assert errors[160] < 0.5 * errors[10], errors


# ------------------------------------------------------------------------------------ side data
def test_new_decode_tokens_are_hashed() -> None:
    """The store's codes after decode steps equal hashing every key afresh (appended keys are hashed
    at their own slots; padded rows leave their tail alone)."""
    method = sa.MagicPIG(bits=5, tables=7, seed=2)
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(2, 3, 37, 16, generator=gen)
    lens = torch.tensor([37, 30])
    store = ContiguousSideStore(method)
    store.update(k, lens, new_tokens=37)
    w = method.projection(16).double()
    for _ in range(6):
        k = torch.cat((k, torch.randn(2, 3, 1, 16, generator=gen)), dim=2)
        lens = lens + 1
        k[1, :, int(lens[1]) - 1] = k[1, :, -1]
        side = store.update(k, lens, new_tokens=1)
        assert side is not None and side.dtype == torch.int16
        for b in range(2):
            n = int(lens[b])
            proj = k[b, :, :n].double() @ w  # [Hkv, n, K*L]
            want = sum((proj.view(3, n, 7, 5)[..., i] > 0).long() << i for i in range(5))
            assert torch.equal(side[b, :, :n].long(), want)
    assert store.rebuilds == 1 and store.updates == 6


# ------------------------------------------------------------------------------------ centres
def test_centres_artifact_checked_against_the_model_and_read_once(tmp_path, monkeypatch) -> None:
    path, centres, model = _centres(tmp_path, 3, 2, 16)
    method = sa.MagicPIG(centres=path)
    method.check_model(model)
    other = ModelShape("llama", 4, 4, 2, 16)
    with pytest.raises(PlanFileError) as err:
        method.check_model(other)
    assert model.describe() in str(err.value) and other.describe() in str(err.value)
    reads = []
    import sparse_attn.artifact as artifact

    real = artifact.load_artifact
    monkeypatch.setattr(artifact, "load_artifact", lambda *a, **kw: reads.append(a) or real(*a, **kw))
    bound = method.for_layer(2)
    assert bound.layer == 2 and method.for_layer(2) is bound
    for _ in range(3):
        c = bound.centre(2, 16, torch.device("cpu"))
        assert c is not None and torch.equal(c, centres[2])
        method.check_model(model)
    assert reads == []  # loaded above, never re-read per call
    with pytest.raises(ConfigError, match="for_layer"):
        method.centre(2, 16, torch.device("cpu"))
    with pytest.raises(ShapeError, match="KV heads"):
        bound.centre(3, 16, torch.device("cpu"))


def test_a_config_binds_each_layer_its_centre(tmp_path) -> None:
    path, centres, _ = _centres(tmp_path, 3, 2, 16)
    cfg = sa.SparseAttentionConfig(default=sa.MagicPIG(bits=4, tables=6, centres=path), dense_layers=(0,))
    assert cfg.method_for(0, 0) is None
    for layer in (1, 2):
        m = cfg.method_for(layer, 0)
        assert isinstance(m, sa.MagicPIG) and m.layer == layer
        assert torch.equal(m.centre(2, 16, torch.device("cpu")), centres[layer])
    assert sa.SparseAttentionConfig.from_json(cfg.to_json()) == cfg


def test_a_tensor_parallel_rank_keeps_its_kv_heads_centres(tmp_path) -> None:
    path, centres, _ = _centres(tmp_path, 2, 4, 16)
    rank = sa.MagicPIG(bits=4, tables=6, centres=path).for_layer(1).for_kv_heads(2, 2)
    assert rank.layer == 1 and rank.kv_heads == (2, 2)
    assert torch.equal(rank.centre(2, 16, torch.device("cpu")), centres[1, 2:4])
    assert method_from_dict(rank.to_dict()) == rank
    keys = torch.randn(1, 2, 30, 16, generator=torch.Generator().manual_seed(0))
    whole = sa.MagicPIG(bits=4, tables=6, centres=path).for_layer(1)
    both = torch.cat((torch.randn(1, 2, 30, 16), keys), dim=1)
    assert torch.equal(rank.compute_side(keys), whole.compute_side(both)[:, 2:])
    assert sa.MagicPIG(bits=4, tables=6).for_kv_heads(2, 2).kv_heads is None  # nothing to slice


# ------------------------------------------------------------------------------------ calibration
def _keys_from_projections(model, windows):
    """Post-RoPE keys per layer [Hkv, n, D] float64, recomputed from each attention module's input:
    k_proj (k_norm where the model has one), then the rotary embedding written out here. Independent of
    the attention seam the calibration reads."""
    seen: dict[int, list[torch.Tensor]] = {}

    def hook(module, args, kwargs):
        h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        cos, sin = kwargs["position_embeddings"]
        k = module.k_proj(h).view(*h.shape[:-1], -1, module.head_dim)
        if hasattr(module, "k_norm"):
            k = module.k_norm(k)
        k, cos, sin = k.transpose(1, 2).double(), cos[:, None].double(), sin[:, None].double()
        half = k.shape[-1] // 2
        rotated = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
        seen.setdefault(module.layer_idx, []).append((k * cos + rotated * sin)[0])

    attns = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(hook, with_kwargs=True) for a in attns]
    try:
        with torch.no_grad():
            for w in windows:
                model(input_ids=torch.tensor([w]), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: torch.cat(parts, dim=1) for layer, parts in seen.items()}


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_calibrated_centres_are_the_mean_keys(arch) -> None:
    model = build(arch, num_heads=6, num_kv_heads=3, head_dim=16, layers=2)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 101, (37,), generator=g).tolist() for _ in range(3)]
    # windows of 40 cross the sequences' ends; 100 of the 111 tokens: the last window is shorter
    centres, stats = calibrate_magicpig(model, seqs, seq_len=40, max_tokens=100)
    stream = [t for s in seqs for t in s][:100]
    keys = _keys_from_projections(model, [stream[i : i + 40] for i in range(0, 100, 40)])
    assert centres.dtype == torch.float32 and centres.shape == (2, 3, 16)
    assert stats.tokens() == 100
    for layer in range(2):
        want = keys[layer].mean(1)  # [Hkv, D]
        assert float(want.abs().max()) > 1e-2  # a centre that is not trivially zero
        torch.testing.assert_close(centres[layer].double(), want, atol=1e-5, rtol=1e-5)


def test_calibrated_centres_round_trip_and_another_model_is_refused(tmp_path) -> None:
    model = build("llama", num_heads=4, num_kv_heads=2, head_dim=16, layers=3)
    seqs = [list(range(5, 60)), list(range(60, 5, -1))]
    centres, _ = calibrate_magicpig(model, seqs, seq_len=32, out=tmp_path / "c", command="cmd --x", meta={"a": 1})
    sidecar = json.loads((tmp_path / "c.json").read_text())
    assert sidecar["command"] == "cmd --x" and sidecar["kind"] == "magicpig"
    assert sidecar["meta"] == {"tokens": 110, "seq_len": 32, "windows": 4, "a": 1}
    shape = ModelShape.from_hf_config(model.config)
    method = sa.MagicPIG(bits=4, tables=6, centres=str(tmp_path / "c"))
    method.check_model(shape)
    for layer in range(3):
        assert torch.equal(method.for_layer(layer).centre(2, 16, torch.device("cpu")), centres[layer])
    other = ModelShape.from_hf_config(build("llama", num_heads=4, num_kv_heads=2, head_dim=8, layers=3).config)
    with pytest.raises(PlanFileError) as err:
        method.check_model(other)
    assert shape.describe() in str(err.value) and other.describe() in str(err.value)
    with pytest.raises(ConfigError, match="head_dim 16"):
        sa.patch(build("llama", num_heads=4, num_kv_heads=2, head_dim=8, layers=3), method)


def test_shipped_smollm2_centres() -> None:
    path = mp.resolve_centres("smollm2")
    assert path.is_file() and path.name == "magicpig_smollm2.safetensors", path
    smollm2 = ModelShape("llama", 30, 9, 3, 64)
    method = sa.MagicPIG(centres="smollm2")
    method.check_model(smollm2)
    centres = mp._load_centres("smollm2", smollm2)["centres"]
    assert centres.shape == (30, 3, 64) and bool(centres.isfinite().all())
    assert float(centres.norm(dim=-1).min()) > 0
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["command"].startswith("sparse-attn calibrate magicpig --model smollm2 ")
    assert torch.equal(method.for_layer(7).centre(3, 64, torch.device("cpu")), centres[7])
    with pytest.raises(PlanFileError, match="30 layers"):
        method.check_model(ModelShape("llama", 2, 4, 2, 16))
    # the config keeps the name, not the file's path
    again = method_from_dict(json.loads(json.dumps(method.to_dict())))
    assert again == method and again.centres == "smollm2"
    cfg = sa.SparseAttentionConfig(default=method, dense_layers=(0,))
    assert sa.SparseAttentionConfig.from_json(cfg.to_json()).method_for(3, 0).centres == "smollm2"


# ------------------------------------------------------------------------------------ configs, errors
def test_registered_and_json_round_trip() -> None:
    m = sa.MagicPIG(
        bits=7, tables=20, seed=4, sink_tokens=2, local_tokens=8, prefill=sa.SinkLocal(window_tokens=64)
    )
    assert METHODS["magicpig"] is sa.MagicPIG
    assert not sa.MagicPIG.has_budget and sa.TopK.has_budget and sa.Quest.has_budget
    assert sa.MagicPIG(sink_tokens=4, local_tokens=64).budget(torch.tensor([50, 1000])).tolist() == [50, 68]
    assert method_from_dict(m.to_dict()) == m
    assert (
        sa.MagicPIG().bits,
        sa.MagicPIG().tables,
        sa.MagicPIG().sink_tokens,
        sa.MagicPIG().local_tokens,
    ) == (
        10,
        150,
        4,
        64,
    )
    assert sa.MagicPIG().side_spec(128) == sa.SideSpec("token", 1, (150,), torch.int16)
    assert sa.MagicPIG(bits=17).side_spec(128) == sa.SideSpec("token", 1, (150,), torch.int32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(bits=0), "bits"),
        (dict(bits=33), "bits"),
        (dict(bits=4.0), "bits"),
        (dict(bits=True), "bits"),
        (dict(tables=1), "tables"),
        (dict(tables=0), "tables"),
        (dict(tables=2.5), "tables"),
        (dict(seed=-1), "seed"),
        (dict(density=0.1), "no budget"),
        (dict(tokens=64), "no budget"),
        (dict(sink_tokens=-1), "sink_tokens"),
        (dict(local_tokens=1.5), "local_tokens"),
        (dict(centres=3), "centres"),
        (dict(layer=-2), "layer"),
        (dict(kv_heads=(0, 0)), "kv_heads"),
        (dict(kv_heads=(1,)), "kv_heads"),
        (dict(prefill=sa.TopK()), "prefill"),
    ],
)
def test_bad_configs_raise_config_error(kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        sa.MagicPIG(**kwargs)


def test_decode_inputs_that_do_not_fit_are_shape_errors() -> None:
    method = sa.MagicPIG(bits=4, tables=6)
    q, k, _ = make_qkv(1, 4, 2, 1, 40, 16)
    side = compute_side_data(method, k, torch.tensor([40]))
    with pytest.raises(ShapeError, match="side"):
        method.select_decode(
            q, k, side[:, :1].expand(1, 3, -1, -1), torch.tensor([40]), torch.tensor([1]), 0.25, True
        )
    with pytest.raises(ShapeError, match="Sq"):
        method.select_decode(
            q.expand(1, 4, 2, 16), k, side, torch.tensor([40]), torch.tensor([2]), 0.25, True
        )


def test_a_sliced_cache_gives_the_same_selection_and_weights() -> None:
    # keys read in place from a slice of a longer preallocated cache (as a StaticCache's), batch > 1
    q, k, _ = make_qkv(2, 6, 3, 1, 300, 32, seed=11)
    buffer = torch.randn(2, 3, 512, 32)
    buffer[:, :, :300] = k
    method = sa.MagicPIG(bits=2, tables=8, sink_tokens=2, local_tokens=5)
    want = sa.select(method, q, k)
    got = sa.select(method, q, buffer[:, :, :300])
    assert torch.equal(got.indices, want.indices) and torch.equal(got.counts, want.counts)
    assert torch.equal(got.log_weights, want.log_weights)
    assert bool((want.log_weights > 0).any())  # some keys were sampled and weighted


def test_accuracy_benchmark_takes_magicpig_by_name_with_its_shipped_centres() -> None:
    from sparse_attn import cli
    from sparse_attn.bench import accuracy

    args = cli.build_parser().parse_args(["bench", "accuracy", "--methods", "dense,magicpig,topk"])
    methods = cli._methods_arg(
        args.methods, dynamic=True, loki_basis=args.loki_basis, magicpig_centres=args.magicpig_centres
    )
    assert methods == {"dense": None, "magicpig": sa.MagicPIG(centres="smollm2"), "topk": sa.TopK()}
    args = cli.build_parser().parse_args(["bench", "accuracy", "--methods", "magicpig", "--magicpig-centres", "none"])
    assert cli._methods_arg(args.methods, dynamic=True, magicpig_centres=args.magicpig_centres) == {
        "magicpig": sa.MagicPIG()
    }
    # MagicPIG samples rather than keeps a budget: a density sweep runs it once, next to the others
    out = accuracy.expand_densities(methods, [0.05, 0.1])
    assert list(out) == ["dense", "magicpig", "topk@0.05", "topk@0.1"]

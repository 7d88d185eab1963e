"""How tight is Quest's block bound on a real model? Per layer, on a real passkey prompt.

Quest scores a block of keys by the upper bound ``u = sum_d max(q_d lo_d, q_d hi_d)`` of ``q.k`` over
the block (``lo``/``hi``: the block's per-channel key min/max) and keeps the best blocks. The bound
is exact for a block of one key and loosens as the keys of a block spread per channel. This module
captures the post-RoPE queries and keys of every layer of a causal LM (one dense forward of the
prompt; the queries of the prompt's last ``queries`` positions, which a decode-tail evaluation feeds
through decode one at a time) and measures, per layer and block size:

- ``gap_std``: the bound minus the block's true max logit, in units of the query's logit standard
  deviation over all its keys (median over query heads, queries and blocks); ``spread_std``: the
  standard deviation of the true block maxima in the same units — a gap as large as the spread turns
  the ranking into noise; ``spearman``: rank correlation of bound and true block max over blocks;
- ``recall_max`` / ``recall_mass`` at each density: of the K blocks Quest can afford beyond its
  always-kept keys, the fraction of the K best blocks by true block max / by attention mass that are
  also among the K best by bound (per query head);
- ``mass_quest`` / ``mass_topk`` at each density: the attention mass (per query head, averaged) on
  the keys that ``Quest(density)`` and ``TopK(density)`` really select for the GQA group, with the
  implementation's own selection (``sparse_attn.select``);
- ``needle_quest`` / ``needle_topk``: for the last query (the one that answers), whether the
  selection holds a token of the needle;
- why: ``gap_share_by_band`` splits the gap over the RoPE frequency bands (channel pairs (i, i+D/2)
  rotate by ``theta_i = base^(-2i/D)`` per position; 4 bands from the fastest to the slowest), and
  ``range_fraction_by_band`` is the block's per-channel key range (hi - lo) over the channel's range
  across the whole prompt: near 1 where rotation sweeps the channel through its whole range inside
  one block.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch

from . import harness

SCHEMA_VERSION = 1
CAPTURE = "sparse_attn_bench_capture"
BANDS = 4


def capture_qk(
    model: Any, input_ids: torch.Tensor, queries: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """{layer: (q of the last ``queries`` positions [Hq, T, D], k [Hkv, N, D])}, post-RoPE, from one
    dense forward of the 1-D ``input_ids`` (the model's own SDPA computes the attention)."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(module: Any, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        store[int(module.layer_idx)] = (query[0, :, -queries:].detach().clone(), key[0].detach().clone())
        return sdpa_attention_forward(module, query, key, *args, **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        with torch.inference_mode():
            model(
                input_ids=input_ids[None].to(next(model.parameters()).device),
                use_cache=False,
                logits_to_keep=1,
            )
    finally:
        model.set_attn_implementation(before)
    return store


def _block_stats(
    logits: torch.Tensor,  # [G, N] scaled logits of one KV head's query heads at one position
    q: torch.Tensor,  # [G, D]
    k: torch.Tensor,  # [N, D]
    bs: int,
    scale: float,
    candidates: torch.Tensor,  # [nb] bool: blocks Quest may choose (not entirely kept anyway)
    budgets: Sequence[tuple[str, int]],  # (density label, blocks affordable beyond the kept keys)
    band_of: torch.Tensor,  # [D] band of each channel
    global_range: torch.Tensor,  # [D]
) -> dict[str, Any]:
    g, n = logits.shape
    d = k.shape[1]
    nb = -(-n // bs)
    pad = nb * bs - n
    kp = torch.cat((k, k[-1:].expand(pad, d))) if pad else k  # repeat the last key: min/max unchanged
    blocks = kp.view(nb, bs, d)
    lo, hi = blocks.amin(1), blocks.amax(1)  # [nb, D]
    terms = torch.maximum(q[:, None, :] * lo[None], q[:, None, :] * hi[None])  # [G, nb, D]
    bound = terms.sum(-1) * scale  # [G, nb]
    lp = torch.cat((logits, logits[:, -1:].expand(g, pad)), dim=1) if pad else logits
    blk_logits = lp.view(g, nb, bs)
    true_max, arg = blk_logits.max(-1)  # [G, nb]
    std = logits.std(-1, keepdim=True).clamp(min=1e-12)  # [G, 1]
    probs = torch.softmax(logits, -1)
    pp = torch.cat((probs, torch.zeros(g, pad, dtype=probs.dtype)), dim=1) if pad else probs
    mass = pp.view(g, nb, bs).sum(-1)  # [G, nb]
    c = candidates
    gap = ((bound - true_max) / std)[:, c]  # [G, C]
    spread = (true_max[:, c]).std(-1) / std[:, 0]  # [G]
    out: dict[str, Any] = {
        "gap_std": gap.flatten(),
        "spread_std": spread,
        "spearman": torch.stack([_spearman(bound[i, c], true_max[i, c]) for i in range(g)]),
    }
    # the gap per channel: terms minus q_d * k*_d (k* the block's argmax key), by RoPE band
    kstar = blocks[torch.arange(nb)[None, :], arg]  # [G, nb, D]
    chan_gap = (terms - q[:, None, :] * kstar)[:, c]  # [G, C, D] >= 0
    total = chan_gap.sum()
    out["gap_share_by_band"] = torch.stack(
        [chan_gap[..., band_of == b].sum() / total.clamp(min=1e-30) for b in range(BANDS)]
    )
    frac = ((hi - lo) / global_range.clamp(min=1e-12))[c]  # [C, D]
    out["range_fraction_by_band"] = torch.stack([frac[:, band_of == b].mean() for b in range(BANDS)])
    for label, kk in budgets:
        if kk <= 0 or int(c.sum()) == 0:
            out[f"recall_max@{label}"] = out[f"recall_mass@{label}"] = torch.full((g,), float("nan"))
            continue
        kk = min(kk, int(c.sum()))
        neg = torch.tensor(float("-inf"))
        by_bound = torch.where(c, bound, neg).topk(kk, -1).indices
        by_max = torch.where(c, true_max, neg).topk(kk, -1).indices
        by_mass = torch.where(c, mass, neg).topk(kk, -1).indices
        out[f"recall_max@{label}"] = _overlap(by_bound, by_max, nb) / kk
        out[f"recall_mass@{label}"] = _overlap(by_bound, by_mass, nb) / kk
    return out


def _overlap(a: torch.Tensor, b: torch.Tensor, n: int) -> torch.Tensor:
    ma = torch.zeros(a.shape[0], n, dtype=torch.bool).scatter_(1, a, True)
    mb = torch.zeros(b.shape[0], n, dtype=torch.bool).scatter_(1, b, True)
    return (ma & mb).sum(-1).to(torch.float64)


def _spearman(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if x.numel() < 3:
        return torch.tensor(float("nan"), dtype=torch.float64)
    rx = x.argsort().argsort().to(torch.float64)
    ry = y.argsort().argsort().to(torch.float64)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum() / (rx.norm() * ry.norm()).clamp(min=1e-30)


def _median(xs: list[torch.Tensor]) -> float | None:
    vals = torch.cat([x.flatten().to(torch.float64) for x in xs]) if xs else torch.empty(0)
    vals = vals[~torch.isnan(vals)]
    return round(float(vals.median()), 4) if vals.numel() else None


def _mean(xs: list[torch.Tensor]) -> float | None:
    vals = torch.cat([x.flatten().to(torch.float64) for x in xs]) if xs else torch.empty(0)
    vals = vals[~torch.isnan(vals)]
    return round(float(vals.mean()), 4) if vals.numel() else None


def measure_layer(
    q: torch.Tensor,  # [Hq, T, D] queries of the last T prompt positions
    k: torch.Tensor,  # [Hkv, N, D]
    block_sizes: Sequence[int],
    densities: Sequence[float],
    needle: tuple[int, int] | None,
    rope_band_of: torch.Tensor,
    sink: int = 4,
    local: int = 16,
) -> dict[str, Any]:
    """The measurements of one layer (see the module doc), per block size."""
    import sparse_attn as sa

    hq, t, d = q.shape
    hkv, n, _ = k.shape
    g = hq // hkv
    scale = d**-0.5
    q, k = q.double(), k.double()
    global_range = k.amax(1) - k.amin(1)  # [Hkv, D]
    out: dict[str, Any] = {}
    for bs in block_sizes:
        acc: dict[str, list[torch.Tensor]] = {}
        per_density: dict[str, dict[str, list[float]]] = {
            f"{dd:g}": {"mass_quest": [], "mass_topk": [], "blocks": []} for dd in densities
        }
        needle_hits: dict[str, dict[str, bool]] = {}
        for ti in range(t):
            pos = n - t + ti  # absolute position of this query
            kv_len = pos + 1
            nb = -(-kv_len // bs)
            start = torch.arange(nb) * bs
            stop = torch.clamp(start + bs, max=kv_len)
            tail = min(kv_len - local, (kv_len - 1) // bs * bs)
            candidates = ~((stop <= sink) | (start >= max(tail, 0)))
            kept = min(kv_len, sink + (kv_len - max(tail, sink)))
            budgets = [(f"{dd:g}", max(0, (math.ceil(kv_len * dd) - kept) // bs)) for dd in densities]
            qs = q[:, ti]  # [Hq, D]
            logits_all = []
            for h in range(hkv):
                qg = qs[h * g : (h + 1) * g]
                logits = qg @ k[h, :kv_len].T * scale  # [G, kv_len]
                logits_all.append(logits)
                st = _block_stats(logits, qg, k[h, :kv_len], bs, scale, candidates, budgets, rope_band_of,
                                  global_range[h])  # fmt: skip
                for key, val in st.items():
                    acc.setdefault(key, []).append(val)
            # the implementation's selections for the GQA group, and the attention mass they keep
            probs = torch.cat([torch.softmax(x, -1) for x in logits_all])  # [Hq, kv_len]
            qq = qs.float()[None, :, None, :]
            kk_ = k[:, :kv_len].float()[None]
            for dd in densities:
                row = per_density[f"{dd:g}"]
                for name, method in (
                    ("quest", sa.Quest(density=dd, block_size=bs)),
                    ("topk", sa.TopK(density=dd)),
                ):
                    sel = sa.select(method, qq, kk_)
                    mask = sel.to_dense_mask(kv_len)[0]  # [Hkv, kv_len]
                    m = mask.repeat_interleave(g, 0).to(probs.dtype)
                    row[f"mass_{name}"].append(float((probs * m).sum(-1).mean()))
                    if ti == t - 1 and needle is not None:
                        hit = bool(mask[:, needle[0] : needle[1]].any(-1).all())
                        needle_hits.setdefault(f"{dd:g}", {})[name] = hit
        res: dict[str, Any] = {
            "gap_std_median": _median(acc["gap_std"]),
            "gap_std_p10": round(float(torch.cat(acc["gap_std"]).quantile(0.1)), 4),
            "gap_std_p90": round(float(torch.cat(acc["gap_std"]).quantile(0.9)), 4),
            "spread_std_median": _median(acc["spread_std"]),
            "spearman_median": _median(acc["spearman"]),
            "gap_share_by_band": [round(float(x), 4) for x in torch.stack(acc["gap_share_by_band"]).mean(0)],
            "range_fraction_by_band": [
                round(float(x), 4) for x in torch.stack(acc["range_fraction_by_band"]).mean(0)
            ],
            "densities": {},
        }
        for dd in densities:
            key = f"{dd:g}"
            row = per_density[key]
            res["densities"][key] = {
                "recall_max": _mean(acc.get(f"recall_max@{key}", [])),
                "recall_mass": _mean(acc.get(f"recall_mass@{key}", [])),
                "mass_quest": round(sum(row["mass_quest"]) / len(row["mass_quest"]), 4),
                "mass_topk": round(sum(row["mass_topk"]) / len(row["mass_topk"]), 4),
                "needle_quest": needle_hits.get(key, {}).get("quest"),
                "needle_topk": needle_hits.get(key, {}).get("topk"),
            }
        out[str(bs)] = res
    return out


def rope_bands(model: Any, head_dim: int) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """Band (0 = fastest rotation) of every channel under HF's rotate_half RoPE (channel i pairs with
    i + D/2, angle theta_i = base^(-2i/D) per position), and each band's rotation per 16 positions."""
    base = float(getattr(model.config, "rope_theta", None) or
                 (getattr(model.config, "rope_parameters", None) or {}).get("rope_theta", 10000.0))  # fmt: skip
    half = head_dim // 2
    pair = torch.arange(head_dim) % half
    band_of = pair * BANDS // half
    info = []
    for b in range(BANDS):
        idx = [i for i in range(half) if i * BANDS // half == b]
        thetas = [base ** (-2 * i / head_dim) for i in idx]
        info.append({
            "pairs": [idx[0], idx[-1]],
            "radians_per_16_positions": [round(16 * max(thetas), 4), round(16 * min(thetas), 4)],
        })  # fmt: skip
    return band_of, info


def run(
    model: Any,
    tokenizer: Any,
    length: int = 4096,
    depth: float = 0.5,
    seed: int = 0,
    queries: int = 64,
    block_sizes: Sequence[int] = (16, 8),
    densities: Sequence[float] = (0.05, 0.1),
    log: Any = None,
) -> dict[str, Any]:
    """Measure every layer on one passkey prompt; returns the result document."""
    import random

    from .prompts import passkey_prompt_tokens, random_key

    log = log or (lambda _m: None)
    t0 = time.perf_counter()
    env = harness.environment()
    prompt = passkey_prompt_tokens(tokenizer, random_key(random.Random(seed)), length, depth)
    ids = torch.tensor(tokenizer(prompt.text)["input_ids"], dtype=torch.long)
    needle = prompt.answer_needle
    span = (needle.token_start, needle.token_start + needle.num_tokens)
    log(f"prompt: {ids.numel()} tokens, needle at tokens {span}")
    captured = capture_qk(model, ids, queries)
    head_dim = next(iter(captured.values()))[1].shape[-1]
    band_of, band_info = rope_bands(model, head_dim)
    layers = {}
    for i in sorted(captured):
        q, k = captured[i]
        layers[str(i)] = measure_layer(q, k, block_sizes, densities, span, band_of)
        log(f"layer {i}: " + ", ".join(
            f"bs={bs} gap={v['gap_std_median']} spread={v['spread_std_median']} "
            f"mass quest/topk@{densities[0]:g}={v['densities'][f'{densities[0]:g}']['mass_quest']}/"
            f"{v['densities'][f'{densities[0]:g}']['mass_topk']}"
            for bs, v in layers[str(i)].items()
        ))  # fmt: skip
    summary = {}
    for bs in block_sizes:
        rows = [layers[str(i)][str(bs)] for i in sorted(captured)]
        summary[str(bs)] = {
            "gap_std_median_over_layers": _median([torch.tensor([r["gap_std_median"]]) for r in rows]),
            "spread_std_median_over_layers": _median([torch.tensor([r["spread_std_median"]]) for r in rows]),
            "spearman_median_over_layers": _median([torch.tensor([r["spearman_median"]]) for r in rows]),
            "gap_share_by_band": [
                round(sum(r["gap_share_by_band"][b] for r in rows) / len(rows), 4) for b in range(BANDS)
            ],
            "range_fraction_by_band": [
                round(sum(r["range_fraction_by_band"][b] for r in rows) / len(rows), 4) for b in range(BANDS)
            ],
            "densities": {
                f"{dd:g}": {
                    key: round(sum(r["densities"][f"{dd:g}"][key] for r in rows) / len(rows), 4)
                    for key in ("recall_max", "recall_mass", "mass_quest", "mass_topk")
                    if all(r["densities"][f"{dd:g}"][key] is not None for r in rows)
                }
                | {
                    "layers_needle_quest": sum(bool(r["densities"][f"{dd:g}"]["needle_quest"]) for r in rows),
                    "layers_needle_topk": sum(bool(r["densities"][f"{dd:g}"]["needle_topk"]) for r in rows),
                }
                for dd in densities
            },
        }
    return {
        "schema_version": SCHEMA_VERSION,
        "benchmark": "quest_bound",
        "device": str(next(model.parameters()).device),
        "env": env,
        "config": {
            "model": getattr(model.config, "_name_or_path", None)
            or getattr(model.config, "model_type", None),
            "prompt_tokens": int(ids.numel()),
            "depth": depth,
            "seed": seed,
            "needle_tokens": list(span),
            "queries": queries,
            "query_positions": [int(ids.numel()) - queries, int(ids.numel()) - 1],
            "block_sizes": list(block_sizes),
            "densities": list(densities),
            "sink_tokens": 4,
            "local_tokens": 16,
            "head_dim": head_dim,
            "rope_bands": band_info,
            "layers": len(captured),
        },
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "summary": summary,
        "layers": layers,
    }


def format_summary(result: dict[str, Any]) -> str:
    """A markdown table per block size: one line per layer, then the mean over layers."""
    cfg = result["config"]
    ds = [f"{d:g}" for d in cfg["densities"]]
    lines = []
    for bs in cfg["block_sizes"]:
        s = result["summary"][str(bs)]
        lines += [
            f"Block size {bs} (gap and spread in logit standard deviations; recall and mass at densities "
            f"{', '.join(ds)}):",
            "",
            "| layer | gap (median) | spread of block max | spearman | "
            + " | ".join(f"recall max@{d} | recall mass@{d} | mass Quest@{d} | mass TopK@{d} | needle Q/T@{d}" for d in ds)
            + " |",
            "|---:|---:|---:|---:|" + "---:|---:|---:|---:|:---:|" * len(ds),
        ]  # fmt: skip
        for i in range(cfg["layers"]):
            r = result["layers"][str(i)][str(bs)]
            cells = [str(i), str(r["gap_std_median"]), str(r["spread_std_median"]), str(r["spearman_median"])]
            for d in ds:
                x = r["densities"][d]
                yn = {True: "y", False: "n", None: "-"}
                cells += [str(x["recall_max"]), str(x["recall_mass"]), str(x["mass_quest"]), str(x["mass_topk"]),
                          f"{yn[x['needle_quest']]}/{yn[x['needle_topk']]}"]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["all", str(s["gap_std_median_over_layers"]), str(s["spread_std_median_over_layers"]),
                 str(s["spearman_median_over_layers"])]  # fmt: skip
        for d in ds:
            x = s["densities"][d]
            cells += [str(x.get("recall_max")), str(x.get("recall_mass")), str(x.get("mass_quest")),
                      str(x.get("mass_topk")), f"{x['layers_needle_quest']}/{x['layers_needle_topk']}"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"Gap share by RoPE band (fastest to slowest rotation): {s['gap_share_by_band']}; block key range / "
            f"prompt key range by band: {s['range_fraction_by_band']}.",
            "",
        ]
    return "\n".join(lines)


def format_overview(result: dict[str, Any]) -> str:
    """The summary over layers as one markdown table (a line per block size and density)."""
    cfg = result["config"]
    lines = [
        f"Measured on {result['env']['machine']['cpu_model']}, torch {result['env']['torch']}, commit "
        f"`{result['env']['git_commit'][:12]}`; `{cfg['model']}`, a {cfg['prompt_tokens']}-token passkey prompt "
        f"(needle at tokens {cfg['needle_tokens'][0]}-{cfg['needle_tokens'][1]}), the queries of its last "
        f"{cfg['queries']} positions, {cfg['layers']} layers. Gap and spread in standard deviations of the "
        "query's logits; medians over layers; recall and mass: means over layers; needle: layers whose "
        "selection (every KV head) holds a needle token at the last query.",
        "",
        "| block | gap: bound - true block max | spread of true block max | spearman | density | recall of best blocks by max | by mass | attention mass Quest | TopK | needle layers Quest | TopK |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for bs in cfg["block_sizes"]:
        s = result["summary"][str(bs)]
        for d, x in s["densities"].items():
            lines.append(
                f"| {bs} | {s['gap_std_median_over_layers']} | {s['spread_std_median_over_layers']} | "
                f"{s['spearman_median_over_layers']} | {d} | {x.get('recall_max')} | {x.get('recall_mass')} | "
                f"{x.get('mass_quest')} | {x.get('mass_topk')} | {x['layers_needle_quest']}/{cfg['layers']} | "
                f"{x['layers_needle_topk']}/{cfg['layers']} |"
            )
    bands = cfg["rope_bands"]
    lines += ["", "| RoPE band (channel pairs) | radians per 16 positions | share of the gap, block 16 | block key range / prompt key range, block 16 | share, block 8 | range, block 8 |",
              "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    s16, s8 = result["summary"].get("16"), result["summary"].get("8")
    for b, info in enumerate(bands):
        cells = [f"{info['pairs'][0]}-{info['pairs'][1]}", f"{info['radians_per_16_positions'][0]}-{info['radians_per_16_positions'][1]}"]  # fmt: skip
        for s in (s16, s8):
            cells += (
                ["-", "-"]
                if s is None
                else [str(s["gap_share_by_band"][b]), str(s["range_fraction_by_band"][b])]
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

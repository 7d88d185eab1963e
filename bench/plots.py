"""Plots of an accuracy result, drawn from its JSON document (never by hand).

matplotlib is imported inside the functions, and only its object-oriented API with the Agg canvas
is used: no pyplot global state, no display needed, nothing imported with the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install matplotlib") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


def plot_needle_heatmap(result: dict[str, Any], path: str | Path) -> Path:
    """Passkey accuracy over (length, needle depth), one panel per method: where in the context a
    pattern loses the needle. Cells without data are left blank."""
    import numpy as np

    cfg = result["config"]
    lengths, depths = cfg["lengths"], cfg["depths"]
    panels = [
        (n, s["passkey"]["grid"])
        for n, s in result["methods"].items()
        if (s.get("passkey") or {}).get("grid")
    ]
    if not panels:
        raise ValueError("result has no passkey grid to plot (every method failed?)")
    fig = _figure(2.0 + 2.6 * len(panels), 1.4 + 0.45 * len(lengths))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    image = None
    for ax, (name, grid) in zip(axes, panels):
        data = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)
        image = ax.imshow(data, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto", origin="lower")
        for i in range(len(lengths)):
            for j in range(len(depths)):
                if not np.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(name)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_xlabel("needle depth")
    axes[0].set_ylabel("prompt tokens")
    fig.colorbar(image, ax=list(axes), label="passkey accuracy", shrink=0.9)
    return _save(fig, path)


def plot_perplexity(result: dict[str, Any], path: str | Path) -> Path:
    """Perplexity per position bucket, one line per method: long-range degradation shows as a line
    that leaves dense's towards the end of the window."""
    lines = [(n, s["perplexity"]) for n, s in result["methods"].items() if s.get("perplexity")]
    if not lines:
        raise ValueError("result has no perplexity to plot (run with perplexity=True)")
    fig = _figure(6.0, 3.6)
    ax = fig.subplots()
    for name, ppl in lines:
        xs = [(b["start"] + b["end"]) / 2 for b in ppl["buckets"]]
        ax.plot(xs, [b["ppl"] for b in ppl["buckets"]], marker="o", label=f"{name} ({ppl['ppl']:.2f})")
    ax.set_xlabel("position in window (bucket centre, tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"perplexity by position, {lines[0][1]['window_tokens']}-token window")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_density_sweep(result: dict[str, Any], path: str | Path) -> Path:
    """Accuracy against attention density per method (one panel per task: passkey, multi-key when
    run), dense as a horizontal line; TopK, exact selection, is drawn as the ceiling of the others."""
    from .accuracy_report import sweep_points

    cfg = result["config"]
    if not cfg.get("sweep"):
        raise ValueError("result has no density sweep to plot (run with densities)")
    ref = result["methods"].get(cfg.get("reference", "dense"), {})
    tasks = [t for t in ("passkey", "multikey") if (ref.get(t) or {}).get("total")]
    if not tasks:
        raise ValueError("result has no task the reference answered (every method failed?)")
    fig = _figure(3.0 + 3.0 * len(tasks), 3.6)
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    for ax, task in zip(axes, tasks):
        dense = (ref.get(task) or {}).get("accuracy")
        if dense is not None:
            ax.axhline(dense, color="black", linestyle="--", linewidth=1.2, label=f"dense ({dense:.2f})")
        for family, pts in sweep_points(result, task).items():
            xs = [d for d, a in pts if a is not None]
            ys = [a for _, a in pts if a is not None]
            if not xs:
                continue
            methods = {e["method"] for e in cfg["sweep"][family]}
            ceiling = methods == {"topk"}
            ax.plot(
                xs, ys, marker="o", linewidth=2.2 if ceiling else 1.5,
                label=f"{family} (exact top-k: the ceiling)" if ceiling else family,
            )  # fmt: skip
        ax.set_xscale("log")
        densities = sorted({float(e["density"]) for es in cfg["sweep"].values() for e in es})
        ax.set_xticks(densities, [f"{d:g}" for d in densities])
        ax.minorticks_off()
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("density (fraction of keys selected per decode step)")
        ax.set_ylabel(f"{task} accuracy")
        lengths = ", ".join(str(n) for n in cfg["lengths"])
        ax.set_title(f"{task}, {lengths} tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)

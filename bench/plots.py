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

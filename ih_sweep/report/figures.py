"""Figures shared by several outputs: the layer x head heatmap (scores, scan effects)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def head_heatmap(matrix: np.ndarray, path: Path, title: str, colorbar_label: str,
                 marks: dict[str, Sequence[tuple[int, int]]] | None = None,
                 diverging: bool = False, layers: Sequence[int] | None = None) -> Path:
    """A [layers, heads] matrix as a heatmap with integer layer and head ticks and a labelled
    colour bar; ``marks`` draws each listed (layer, head) with a marker per label (legend).
    ``diverging``: a red-blue map centred on 0 (effects); else viridis (scores). NaN cells
    (unscored heads) stay blank. ``layers``: the layer index of each row (default 0..)."""
    from ih_sweep.io_utils import write_figure

    plt = pyplot()
    n_layers, n_heads = matrix.shape
    layers = list(layers) if layers is not None else list(range(n_layers))
    fig, ax = plt.subplots(figsize=(max(4.5, n_heads * 0.25 + 2.5),
                                    max(2.6, n_layers * 0.32 + 1.6)))
    kwargs = {"cmap": "viridis"}
    if diverging:
        lim = float(np.nanmax(np.abs(matrix))) if np.isfinite(matrix).any() else 1.0
        kwargs = {"cmap": "RdBu", "vmin": -(lim or 1.0), "vmax": lim or 1.0}
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", **kwargs)
    step = max(1, n_heads // 16)
    ax.set_xticks(range(0, n_heads, step))
    ax.set_yticks(range(n_layers), [str(la) for la in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=colorbar_label)
    styles = [("x", "red"), ("o", "deepskyblue"), ("s", "orange"), ("^", "white")]
    row = {la: i for i, la in enumerate(layers)}
    for (label, heads), (marker, color) in zip((marks or {}).items(), styles):
        pts = [(h, row[la]) for la, h in heads if la in row]
        if pts:
            xs, ys = zip(*pts)
            style = {"c": color} if marker == "x" else {"facecolors": "none",
                                                         "edgecolors": color}
            ax.scatter(xs, ys, marker=marker, s=40, linewidths=1.5, label=label, **style)
    if marks:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0, -0.18), ncol=2,
                  frameon=False)
    write_figure(path, fig)
    plt.close(fig)
    return Path(path)

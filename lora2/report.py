"""Rank-allocation heatmap (layers × module types), as in the AdaLoRA / LoRA² papers' figures."""

from __future__ import annotations

import re
from pathlib import Path

from .io import atomic_path

_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def rank_grid(rank_pattern: dict[str, list[int]]) -> tuple[list[int], list[str], list[list[float]]]:
    """Rows = transformer layer index, columns = module type (the name after the layer index)."""
    cells: dict[tuple[int, str], int] = {}
    for name, kept in rank_pattern.items():
        match = _LAYER_INDEX.search(name)
        layer = int(match.group(1)) if match else -1
        kind = name[match.end():] if match else name
        cells[(layer, kind)] = len(kept)
    layers = sorted({l for l, _ in cells})
    kinds = sorted({k for _, k in cells}, key=lambda k: min(i for i, (_, kk) in enumerate(cells) if kk == k))
    grid = [[float(cells.get((l, k), float("nan"))) for k in kinds] for l in layers]
    return layers, kinds, grid


def plot_rank_heatmap(rank_pattern: dict[str, list[int]], r: int, path: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, kinds, grid = rank_grid(rank_pattern)
    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, 0.45 * len(layers) + 1.8))
    image = ax.imshow(grid, cmap="YlGnBu", vmin=0, vmax=r, aspect="auto")
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), [str(l) if l >= 0 else "-" for l in layers], fontsize=8)
    ax.set_ylabel("layer")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:  # not NaN
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7,
                        color="white" if value > 0.6 * r else "black")
    fig.colorbar(image, ax=ax, label=f"kept singular values (of r={r})")
    ax.set_title(title or "LoRA² rank allocation", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)
    return path

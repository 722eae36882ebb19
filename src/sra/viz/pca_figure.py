"""The feature-PCA figure: PCA maps (:mod:`sra.viz.pca`) drawn as one labelled grid per model
(rows = times, columns = blocks), grids stacked top to bottom, to a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sra.atomic import atomic_path
from sra.errors import SraError

CELL_INCHES = 1.2  # size of one map
MIN_FIGURE_WIDTH = 4.0  # inches: room for the title when there are few columns
FIGURE_DPI = 150


def plot_pca_grid(
    maps_list: Sequence[np.ndarray],
    times: Sequence[float],
    blocks: Sequence[int] | Sequence[Sequence[int]],
    titles: Sequence[str] | None,
    out_png: str | Path,
    cell_inches: float = CELL_INCHES,
    dpi: int = FIGURE_DPI,
) -> Path:
    """Draw one grid per model (rows "t=0.7", columns "block 8"), stacked top to bottom, to a PNG.

    ``maps_list``: arrays (len(times), len(blocks), g, g, 3) (g may differ between models);
    ``blocks``: one list for all grids, or one list per grid.
    """
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    if not maps_list:
        raise SraError("nothing to plot: no PCA maps")
    per_grid = (
        [list(b) for b in blocks] if blocks and not isinstance(blocks[0], (int, np.integer))
        else [list(blocks)] * len(maps_list)
    )
    titles = list(titles) if titles else [""] * len(maps_list)
    if len(per_grid) != len(maps_list) or len(titles) != len(maps_list):
        raise SraError("plot_pca_grid: one blocks list and one title per grid are needed")
    rows = len(times)
    cols = max(len(b) for b in per_grid)
    # Margins in inches (two-line title + column labels on top, row labels on the left) so the
    # cells stay square whatever the grid.
    left, right, top, bottom = 0.45, 0.1, (0.8 if any(titles) else 0.3), 0.08
    fig_w = max(left + cols * cell_inches + right, MIN_FIGURE_WIDTH)
    grid_h = top + rows * cell_inches + bottom
    fig = Figure(figsize=(fig_w, grid_h * len(maps_list)))
    subfigs = fig.subfigures(len(maps_list), 1, squeeze=False)[:, 0]
    for maps, blks, title, sub in zip(maps_list, per_grid, titles, subfigs):
        if maps.shape[:2] != (rows, len(blks)):
            raise SraError(
                f"maps of shape {maps.shape[:2]} do not match {rows} times × {len(blks)} blocks"
            )
        axes = sub.subplots(rows, cols, squeeze=False)
        for i in range(rows):
            for j in range(cols):
                ax = axes[i, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j >= len(blks):
                    ax.set_axis_off()
                    continue
                ax.imshow(np.clip(maps[i, j], 0, 1), interpolation="nearest")
                if i == 0:
                    ax.set_title(f"block {blks[j]}", fontsize=9)
                if j == 0:
                    ax.set_ylabel(f"t={times[i]:g}", fontsize=9)
        if title:
            sub.suptitle(title, fontsize=9, y=1 - 0.06 / grid_h, va="top")
        sub.subplots_adjust(left=left / fig_w, right=1 - right / fig_w, top=1 - top / grid_h,
                            bottom=bottom / grid_h, wspace=0.06, hspace=0.06)
    out_png = Path(out_png)
    with atomic_path(out_png) as tmp:  # never a torn figure, also on a full disk
        fig.savefig(tmp, dpi=dpi, format=out_png.suffix.lstrip(".") or "png")
    return out_png

"""What every method's report shares: CSV tables, PNG figures and markdown.

Figures are built with matplotlib's object API (`new_figure` -> `matplotlib.figure.Figure`,
drawn by the Agg canvas), so nothing changes pyplot's global backend or state on import.
"""

from __future__ import annotations

import csv
import os

from matplotlib.figure import Figure


def write_csv(path: str, header, rows) -> None:
    """A CSV table, written atomically: a kill leaves the previous file or none."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    os.replace(path + ".tmp", path)


def new_figure(nrows: int = 1, ncols: int = 1, *, figsize=(6, 4), squeeze: bool = True, **kw):
    """(figure, axes) like `plt.subplots`, without pyplot."""
    fig = Figure(figsize=figsize)
    axes = fig.subplots(nrows, ncols, squeeze=squeeze, **kw)
    return fig, axes


def save_figure(fig: Figure, path: str, dpi: int = 120) -> None:
    """Lay out and write a figure as PNG."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)


def write_markdown(path: str, lines) -> None:
    """Markdown lines, written atomically."""
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    os.replace(path + ".tmp", path)

"""What the methods' reports share: CSV tables and PNG figures written headless (`plt` from
here has the Agg backend set, whatever imports first)."""

from __future__ import annotations

import csv

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_csv(path: str, header, rows) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Lay out, write and close (figures of long runs must not accumulate)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)

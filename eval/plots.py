"""The report's plots (score, time and UNet calls against set size N), as PNG data: URIs.

matplotlib draws through its Agg canvas directly (no pyplot, no global backend switch), so
rendering a report never opens a window and leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Mapping, Sequence

from loracompose.errors import UserError

MATPLOTLIB_HINT = "install it with pip install 'matplotlib>=3.5' (a loracompose dependency) and rerun"
FIGURE_SIZE = (4.0, 3.0)  # inches: three plots side by side on a 1300 px wide page
DPI = 100
DODGE = 0.05  # methods' points shift apart along N by this much, so equal values stay visible


def require_matplotlib() -> None:
    """Fail with one line, before anything is written, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise UserError(f"report: matplotlib is not installed; {MATPLOTLIB_HINT}") from None


def size_plot(rows: Sequence[Mapping[str, Any]], metric: str, title: str, ylabel: str) -> str | None:
    """One line per method of ``<metric>_mean`` against N, with its 95% interval as error bars
    where there is one; None when no row has the metric. Methods are dodged slightly along N."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    methods = list(dict.fromkeys(row["method"] for row in rows if row.get(f"{metric}_mean") is not None))
    if not methods:
        return None
    figure = Figure(figsize=FIGURE_SIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for index, method in enumerate(methods):
        points = sorted(((row["n"], row) for row in rows
                         if row["method"] == method and row.get(f"{metric}_mean") is not None),
                        key=lambda point: point[0])
        sizes = [n + (index - (len(methods) - 1) / 2) * DODGE for n, _ in points]
        means = [row[f"{metric}_mean"] for _, row in points]
        below = [mean - row[f"{metric}_ci_low"] if row.get(f"{metric}_ci_low") is not None else 0.0
                 for mean, (_, row) in zip(means, points)]
        above = [row[f"{metric}_ci_high"] - mean if row.get(f"{metric}_ci_high") is not None else 0.0
                 for mean, (_, row) in zip(means, points)]
        axes.errorbar(sizes, means, yerr=[below, above], marker="o", markersize=4, capsize=3, linewidth=1.5,
                      label=method)
    axes.set_title(title, fontsize=11)
    axes.set_xlabel("LoRAs composed (N)")
    axes.set_ylabel(ylabel)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")

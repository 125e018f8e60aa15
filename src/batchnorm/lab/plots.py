"""Plotting helpers for the lab (matplotlib, Agg backend, no pyplot global state).

Figures are built as :class:`matplotlib.figure.Figure` objects with an Agg canvas, so nothing
here needs a display or touches pyplot's global figure list, and runs in threads or tests do not
interfere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["new_figure", "band", "COLORS"]

# Colour per role, so that the same variant has the same colour in every figure.
COLORS = {
    "with BN": "tab:blue",
    "without BN": "tab:red",
    "bn": "tab:blue",
    "plain": "tab:red",
}


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (5.0, 3.6)) -> Any:
    """A Figure with an Agg canvas and a grid of axes; returns (figure, axes array)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] * ncols, size[1] * nrows))
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False)
    return figure, axes


def band(
    ax: Any,
    x: Sequence[float] | np.ndarray,
    values: np.ndarray,
    *,
    label: str,
    color: str | None = None,
    linestyle: str = "-",
) -> None:
    """Plot the mean over seeds (axis 1 of ``values``, shape (T, S)) with a min-max band."""
    values = np.asarray(values, dtype=np.float64)
    with np.errstate(all="ignore"):
        mean = np.nanmean(values, axis=1)
        low, high = np.nanmin(values, axis=1), np.nanmax(values, axis=1)
    (line,) = ax.plot(x, mean, label=label, color=color, linestyle=linestyle, linewidth=1.5)
    if values.shape[1] > 1:
        ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)

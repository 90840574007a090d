"""How every figure of limits-ray is made and written: one style, no pyplot.

Figures are plain :class:`matplotlib.figure.Figure` objects (:func:`new_figure`), so drawing them
changes no global state (a notebook's backend, pyplot's list of open figures) and needs no GUI; every
figure ends in :func:`save_figure` (tight layout, PNG at 120 dpi). :func:`suptitle` wraps long titles
(run names) to the figure's width; :func:`colormap_colors` picks colours off a colormap.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

__all__ = ["colormap_colors", "new_figure", "panel_grid", "save_figure", "suptitle"]


def new_figure(rows: int = 1, columns: int = 1, *, figsize: tuple[float, float], squeeze: bool = True):
    """A figure and its grid of axes, ``(figure, axes)`` as ``pyplot.subplots`` gives them, without pyplot:
    figures here are plain :class:`matplotlib.figure.Figure` objects, so drawing them changes no global
    state (a notebook's backend, pyplot's figure list) and no GUI is ever involved."""
    figure = Figure(figsize=figsize)
    return figure, figure.subplots(rows, columns, squeeze=squeeze)


def panel_grid(count: int, panel_size: tuple[float, float], min_width: float = 8.5, extra_width: float = 0.0):
    """A figure of ``count`` panels, two to a row, each ``panel_size`` (width, height) inches; the figure at
    least ``min_width`` wide, plus ``extra_width``. Returns ``(figure, panels)``: the first ``count`` axes, the
    grid's others hidden."""
    columns = min(2, max(1, count))
    rows = -(-max(1, count) // columns)
    figure, axes = new_figure(rows, columns, squeeze=False,
                              figsize=(max(panel_size[0] * columns, min_width) + extra_width, panel_size[1] * rows))
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    return figure, list(axes.flat[:count])


def colormap_colors(name: str, values: np.ndarray) -> np.ndarray:
    """RGBA colours of ``values`` (in [0, 1]) on the matplotlib colormap ``name``."""
    return matplotlib.colormaps[name](values)


def suptitle(figure: Figure, text: str, fontsize: float = 11) -> None:
    """The figure's title, wrapped at word boundaries to the figure's width (long run names stay whole)."""
    width = max(20, int(figure.get_figwidth() * 72 / (0.55 * fontsize)))
    figure.suptitle("\n".join(textwrap.wrap(text, width)) if len(text) > width else text, fontsize=fontsize)


def save_figure(figure: Figure, path: str | Path, dpi: int = 120) -> None:
    """Lay ``figure`` out tightly and write it to ``path`` (PNG): every figure of limits-ray ends here."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)

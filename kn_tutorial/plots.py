"""Plot helpers shared by the chapters: quantities by layer, stacked shares, heatmaps.

Matplotlib only, colour-blind-safe by default (the colour cycle and the `cividis` map set
by `notebook.setup`). Every helper draws on a given Axes (or a new one) and returns it, so
a chapter adds its own title, caption and alt text.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np


def _axes(ax, figsize=(6, 3.5)):
    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_by_layer(series: Mapping[str, Sequence[float]], layers: Sequence[int], ax=None,
                  chance: Mapping[str, Sequence[float] | float] | None = None, ylabel: str = "",
                  title: str = "", percent: bool = False, chance_label: str | Mapping[str, str] = "chance",
                  legend_outside: bool = False):
    """One line with markers per named series over layers; optional dashed reference lines
    (same colour as their series, same name in `chance`), labelled "name (chance_label)";
    chance_label may be a {name: label} mapping."""
    ax = _axes(ax)
    scale = 100.0 if percent else 1.0
    for name, values in series.items():
        (line,) = ax.plot(layers, np.asarray(values, dtype=float) * scale, marker="o", label=name)
        if chance is not None and name in chance:
            level = np.broadcast_to(np.asarray(chance[name], dtype=float), (len(layers),)) * scale
            label = chance_label.get(name, "chance") if isinstance(chance_label, Mapping) else chance_label
            ax.plot(layers, level, linestyle="--", color=line.get_color(), alpha=0.7, label=f"{name} ({label})")
    ax.set_xlabel("layer")
    ax.set_xticks(list(layers))
    ax.set_ylabel(ylabel + (" (%)" if percent and ylabel else ""))
    ax.set_title(title)
    if legend_outside:
        ax.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    else:
        ax.legend(fontsize="small", frameon=False)
    return ax


def stacked_by_layer(parts: Mapping[str, Sequence[float]], layers: Sequence[int], ax=None,
                     ylabel: str = "share", title: str = "", percent: bool = False):
    """Stacked bars per layer; the parts of one layer should add up to 1 (or 100%)."""
    ax = _axes(ax)
    scale = 100.0 if percent else 1.0
    bottom = np.zeros(len(layers))
    for name, values in parts.items():
        values = np.asarray(values, dtype=float) * scale
        ax.bar(layers, values, bottom=bottom, label=name)
        bottom += values
    ax.set_xlabel("layer")
    ax.set_xticks(list(layers))
    ax.set_ylabel(ylabel + (" (%)" if percent else ""))
    ax.set_title(title)
    ax.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def heatmap(matrix, ax=None, xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None,
            cmap: str = "cividis", cbar_label: str = "", title: str = "", annotate: bool = False,
            fmt: str = "{:.2f}"):
    """A matrix as an image with labelled rows and columns and a colour bar."""
    ax = _axes(ax)
    matrix = np.asarray(matrix, dtype=float)
    image = ax.imshow(matrix, cmap=cmap, aspect="auto")
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), labels=list(xlabels), rotation=45, ha="right")
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), labels=list(ylabels))
    if annotate:
        mid = np.nanmean(matrix)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize="x-small",
                    color="black" if v > mid else "white")
    ax.figure.colorbar(image, ax=ax, label=cbar_label)
    ax.set_title(title)
    return ax

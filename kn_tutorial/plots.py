"""Plot helpers shared by the chapters: quantities by layer, stacked shares, heatmaps.

Matplotlib only, colour-blind-safe by default (the colour cycle and the `cividis` map set
by `notebook.setup`). Every helper draws on a given Axes (or a new one) and returns it, so
a chapter adds its own title, caption and alt text.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator

from .lazy import lazy_exports

# The editing chapters' figures live in plots_editing (served lazily: plots_editing imports this module).
__getattr__ = lazy_exports(__package__, "plots_editing", (
    "plot_delta_optimisation", "wilson_interval", "plot_scaling", "plot_key_spectrum", "plot_feasible_costs",
    "plot_layer_sweep", "plot_layer_shares"))


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
                     ylabel: str = "share", title: str = "", percent: bool = False, legend_below: bool = False):
    """Stacked bars per layer; the parts of one layer should add up to 1 (or 100%). The legend sits to
    the right of the axes, or below them with legend_below (for panels side by side)."""
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
    if legend_below:
        ax.legend(fontsize="small", frameon=False, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    else:
        ax.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


def heatmap(matrix, ax=None, xlabels: Sequence[str] | None = None, ylabels: Sequence[str] | None = None,
            cmap: str = "cividis", cbar_label: str = "", title: str = "", annotate: bool = False,
            fmt: str = "{:.2f}", centre: float | None = None, spread: float | None = None,
            colorbar: bool = True, fontsize="medium"):
    """A matrix as an image with labelled rows and columns and a colour bar. With `centre`, the
    colour scale is symmetric around it (for a diverging map such as "PuOr", so that no change
    is the map's middle colour), from centre - spread to centre + spread (default: the largest
    distance from it, so give one `spread` to panels that must share a scale); `colorbar=False` leaves the bar out (e.g. for panels sharing one).
    Returns the Axes; its image is `ax.images[0]`."""
    ax = _axes(ax)
    matrix = np.asarray(matrix, dtype=float)
    limits = {}
    if centre is not None:
        if spread is None:
            spread = max(float(np.nanmax(np.abs(matrix - centre))), 1e-12)
        limits = {"vmin": centre - spread, "vmax": centre + spread}
    image = ax.imshow(matrix, cmap=cmap, aspect="auto", interpolation="nearest", **limits)
    if xlabels is not None:
        ax.set_xticks(range(len(xlabels)), labels=list(xlabels), rotation=45, ha="right", fontsize=fontsize)
    if ylabels is not None:
        ax.set_yticks(range(len(ylabels)), labels=list(ylabels), fontsize=fontsize)
    if annotate:
        mid = np.nanmean(matrix) if centre is None else None
        for (i, j), v in np.ndenumerate(matrix):
            dark = v > mid if mid is not None else True  # a diverging map is light in the middle
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize="x-small",
                    color="black" if dark else "white")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label=cbar_label)
    ax.set_title(title)
    return ax


def horizontal_bars(values: Mapping[str, float], notes: Mapping[str, str] | None = None, ax=None,
                    xlabel: str = "", title: str = ""):
    """One horizontal bar per named value, in the given order from the top, each with an optional
    note written just past its end (e.g. the facts per relation, noted with their distinct objects).
    Returns the Axes."""
    if not values:
        raise ValueError("values is empty: give {label: value}")
    ax = _axes(ax, figsize=(6, 0.35 * len(values) + 1.0))
    labels = list(values)
    bars = ax.barh(labels, [float(values[k]) for k in labels], color="C0")
    top = max(float(v) for v in values.values())
    for bar, label in zip(bars, labels):
        if notes and label in notes:
            ax.text(bar.get_width() + 0.01 * top, bar.get_y() + bar.get_height() / 2, notes[label], va="center",
                    fontsize="small")
    ax.set_xlim(0, top * (1.45 if notes else 1.05))
    ax.invert_yaxis()  # the first label on top, as it reads
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return ax


def _numpy(values) -> np.ndarray:
    """A tensor (any device, with or without grad) or array-like as a float numpy array."""
    if hasattr(values, "detach"):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


# --------------------------------------------------------------------------------------
# Chapter 3: integrated-gradients attributions (Dai et al., 2022)
# --------------------------------------------------------------------------------------

def top_attributions(attributions, k: int = 10) -> list[tuple[int, int, float]]:
    """The k largest entries of an [L, d_ff] score map as (layer, neuron, score), largest first."""
    values = _numpy(attributions)
    if values.ndim != 2:
        raise ValueError(f"attributions must be one fact's [layers, d_ff] map, got shape {values.shape}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= values.size:
        raise ValueError(f"k must be an int from 1 to {values.size} (the number of neurons), got {k!r}")
    order = np.argsort(-values, axis=None, kind="stable")[:k]
    return [(int(i // values.shape[1]), int(i % values.shape[1]), float(values.flat[i])) for i in order]


def plot_attribution_summary(attributions, k: int = 10, axes=None, title: str = "",
                             layers: Sequence[int] | None = None):
    """What an [L, d_ff] attribution map says, readable at book width (a heatmap of 8 x 1024 thin
    columns is white at that size). Left: each layer's summed positive and summed negative
    attribution as bars up and down (by completeness their difference approaches the layer's
    P(w̄) - P(0)). Right: the k neurons with the largest attribution as horizontal bars labelled
    "L<layer>.<neuron>", coloured by layer. Returns the two Axes."""
    values = _numpy(attributions)
    top = top_attributions(values, k)
    rows = list(range(values.shape[0])) if layers is None else list(layers)
    if len(rows) != values.shape[0]:
        raise ValueError(f"layers names {len(rows)} layers but the map has {values.shape[0]} rows")
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(10, 3.4), gridspec_kw={"width_ratios": [1.2, 1]})
    left, right = axes
    positive, negative = np.clip(values, 0, None).sum(1), np.clip(values, None, 0).sum(1)
    x = np.arange(len(rows))
    left.bar(x, positive, color="C1", label="sum of positive Attr")
    left.bar(x, negative, color="C0", label="sum of negative Attr")
    left.axhline(0, color="grey", lw=0.8)
    left.set_xticks(x, [str(r) for r in rows])
    left.set_xlabel("layer")
    left.set_ylabel("summed Attr")
    left.legend(fontsize="small", frameon=False)
    left.set_title("per layer", fontsize="medium")
    colours = {layer: f"C{j % 10}" for j, layer in enumerate(sorted({row for row, _, _ in top}))}
    y = np.arange(len(top))
    right.barh(y, [score for _, _, score in top], color=[colours[row] for row, _, _ in top])
    right.set_yticks(y, [f"L{rows[row]}.{neuron}" for row, neuron, _ in top], fontsize="small")
    right.invert_yaxis()
    right.axvline(0, color="grey", lw=0.8)
    right.set_xlabel("Attr")
    right.set_title(f"top {len(top)} neurons (layer.neuron)", fontsize="medium")
    if title:
        left.figure.suptitle(title, fontsize="medium")
    return axes


def plot_alpha_paths(alphas, paths, steps: int = 20, rule: str = "right", min_gap: float = 0.01,
                     axes=None, ylabel: str = "P(target)", layers: Sequence[int] | None = None):
    """The integrated-gradients path P(α w̄), α from 0 to 1, layer by layer ([L, n] `paths` on the
    grid `alphas`), drawn so that it can be read. Left: only layers whose gap |P(w̄) - P(0)|
    exceeds `min_gap` get their own coloured line; the others share one thin grey style and one
    legend entry. Right: for the layer with the largest gap, the exact path and the m points of
    the Riemann rule (`steps`, `rule`; they must lie on the grid) on it, which shows how many
    points fall on its climb. Returns the two Axes."""
    alphas, paths = _numpy(alphas), _numpy(paths)
    if paths.ndim != 2 or paths.shape[1] != len(alphas):
        raise ValueError(f"paths must be [layers, {len(alphas)}] on the grid alphas, got {paths.shape}")
    if rule not in ("right", "left", "midpoint"):
        raise ValueError(f"unknown Riemann rule {rule!r}; choose right, left or midpoint")
    k = np.arange(1, steps + 1)
    points = (k - {"right": 0.0, "left": 1.0, "midpoint": 0.5}[rule]) / steps
    on_grid = np.isclose(points[:, None], alphas[None, :], atol=1e-9)
    if not on_grid.any(1).all():
        raise ValueError(f"the {rule} rule's points for m = {steps} are not all on the grid alphas; "
                         f"use a grid that contains them, e.g. torch.linspace(0, 1, {4 * steps + 1})")
    rows = list(range(len(paths))) if layers is None else list(layers)
    gaps = paths[:, -1] - paths[:, 0]
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.4))
    left, right = axes
    quiet = [j for j in range(len(paths)) if abs(gaps[j]) <= min_gap]
    for j in quiet:
        left.plot(alphas, paths[j], color="grey", lw=1, alpha=0.7,
                  label=(f"layers {', '.join(str(rows[q]) for q in quiet)} (|gap| ≤ {min_gap:g})"
                         if j == quiet[0] else None))
    loud = ["C0", "C1", "C4", "C5", "C6", "C7", "C8", "C9"]  # the colour cycle without its two greys
    for n, j in enumerate(j for j in range(len(paths)) if abs(gaps[j]) > min_gap):
        left.plot(alphas, paths[j], color=loud[n % len(loud)], lw=2, label=f"layer {rows[j]} (gap {gaps[j]:+.3f})")
    left.set_xlabel("α (the layer's activations scaled to α w̄)")
    left.set_ylabel(ylabel)
    left.set_title("every layer", fontsize="medium")
    left.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.3))
    steepest = int(np.argmax(np.abs(gaps)))
    values = paths[steepest, on_grid.argmax(1)]
    right.plot(alphas, paths[steepest], color="C0", lw=1.5, label=f"layer {rows[steepest]}: P(α w̄)")
    right.plot(points, values, "o", color="C1", ms=4, label=f"the {steps} {rule}-rule points α_k")
    right.set_xlabel("α")
    right.set_ylabel(ylabel)
    right.set_title(f"layer {rows[steepest]} and the points of the Riemann sum", fontsize="medium")
    right.legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(0.0, -0.3))
    return axes


def plot_panels(panels: Mapping[str, Mapping[str, Sequence[float]]], x: Sequence[float], xlabel: str = "",
                ylabel: str = "", logx: bool = False, logy: bool = False, axes=None,
                styles: Mapping[str, Mapping] | None = None, hlines: Mapping[str, float] | None = None,
                vlines: Mapping[str, float] | None = None, ylim: tuple[float, float] | None = None,
                floor: float | None = None, panel_size: tuple[float, float] = (5.2, 3.4)):
    """Side-by-side line plots sharing the y axis: `panels` is {panel title: {series label: y over x}},
    each series a line with markers (matplotlib keywords per label in `styles`, e.g. a dashed
    control, or `{"marker": ""}` for a plain line). `hlines`/`vlines` are labelled grey reference lines drawn in every panel; `floor` lifts
    values below it to it (zeros on a log axis). One legend, to the right of the last panel, so no
    line is covered (none for a single line). Returns the Axes."""
    if not panels:
        raise ValueError("panels is empty: give {panel title: {series label: values}}")
    if axes is None:
        _, axes = plt.subplots(1, len(panels), figsize=(panel_size[0] * len(panels), panel_size[1]),
                               sharey=True, squeeze=False)
        axes = axes[0]
    styles = styles or {}
    for ax, (title, series) in zip(axes, panels.items()):
        for label, values in series.items():
            values = _numpy(values)
            if len(values) != len(x):
                raise ValueError(f"series {label!r} of panel {title!r} has {len(values)} values for {len(x)} x")
            if floor is not None:
                values = np.maximum(values, floor)
            ax.plot(x, values, **{"marker": "o", **dict(styles.get(label, {}))}, label=label)
        for label, y in (hlines or {}).items():
            ax.axhline(y, color="grey", ls="--", lw=0.8, label=label)
        for label, at in (vlines or {}).items():
            ax.axvline(at, color="grey", ls=":", lw=0.8, label=label)
        ax.set_xscale("log" if logx else "linear")
        if not logx and all(float(v).is_integer() for v in x):  # layers, steps: no ticks at 2.5
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_yscale("log" if logy else "linear")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize="medium")
        if ylim is not None:
            ax.set_ylim(*ylim)
    axes[0].set_ylabel(ylabel)
    labels = {label for series in panels.values() for label in series} | set(hlines or {}) | set(vlines or {})
    if len(labels) > 1:  # one line needs no legend: the title and the y label name it
        axes[-1].legend(fontsize="small", frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    return axes


def grouped_bars(series: Mapping[str, Sequence[float]], categories: Sequence, ax=None, xlabel: str = "",
                 ylabel: str = "", title: str = "", percent: bool = False, legend_loc: str = "best"):
    """Bars of several named series side by side for each category (e.g. the share of top neurons
    per layer for two sets of facts), with one legend. Returns the Axes."""
    ax = _axes(ax, figsize=(6.5, 3.5))
    scale = 100.0 if percent else 1.0
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(categories))
    for j, (name, values) in enumerate(series.items()):
        values = _numpy(values)
        if len(values) != len(categories):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(categories)} categories")
        ax.bar(x + (j - (len(series) - 1) / 2) * width, values * scale, width=width, label=name)
    ax.set_xticks(x, [str(c) for c in categories])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel + (" (%)" if percent and ylabel else ""))
    ax.set_title(title)
    ax.legend(fontsize="small", frameon=False, loc=legend_loc)
    return ax


# --------------------------------------------------------------------------------------
# Chapter 0: recall per template, aggregated
# --------------------------------------------------------------------------------------

TEMPLATE_GROUPS = {"train": "trained template", "isa": "is-a sentence", "heldout": "held-out frame",
                   "novel": "novel paraphrase"}


def plot_recall_by_group(rows: Sequence[Mapping], ax=None, value: str = "first_token",
                         groups: Mapping[str, str] = TEMPLATE_GROUPS):
    """A dot plot of recall per template, one row per relation x template group (instead of one
    bar per template): every template is a dot (a recall of 0 is a dot at 0, not an empty row),
    the row's mean a vertical tick. `rows` are records with "relation", "group" and `value` (a
    share in [0, 1]), e.g. `per_template.to_dict("records")`. Returns the Axes."""
    rows = list(rows)
    if not rows:
        raise ValueError("no templates to plot")
    unknown = sorted({r["group"] for r in rows} - set(groups))
    if unknown:
        raise ValueError(f"unknown template groups {unknown}; name them in groups={{...}}")
    relations = list(dict.fromkeys(r["relation"] for r in rows))
    lines = [(rel, g) for rel in relations for g in groups if any(r["relation"] == rel and r["group"] == g for r in rows)]
    ax = _axes(ax, figsize=(7, 0.25 * len(lines) + 1.2))
    rng = np.random.default_rng(0)
    colours = {g: f"C{n}" for n, g in enumerate(groups)}
    for y, (rel, g) in enumerate(lines):
        recall = np.array([100 * r[value] for r in rows if r["relation"] == rel and r["group"] == g])
        ax.scatter(recall, y + rng.uniform(-0.18, 0.18, len(recall)), s=18, color=colours[g], alpha=0.8,
                   edgecolor="black", linewidth=0.3, zorder=3)
        ax.plot([recall.mean()] * 2, [y - 0.35, y + 0.35], color="black", lw=1.2, zorder=4)
    ax.set_yticks(range(len(lines)), [f"{rel} · {groups[g]} ({sum(r['relation'] == rel and r['group'] == g for r in rows)})"
                                      for rel, g in lines], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(-4, 104)
    ax.set_xlabel("recall per template (%); black tick: mean of the row")
    ax.grid(axis="x", alpha=0.3)
    return ax

"""The figures of the editing chapters: ROME (Meng et al., 2022; chapter 6) and MEMIT (Meng et
al., 2023; chapter 7).

Chapter 6: the optimisation of δ, the spectrum of the key statistics C, the cost of feasible
updates against ROME's, and ROME at every layer. Chapter 7: what each edited layer was asked
for and delivered, and the scaling curve. Like `plots`, every helper draws on given Axes (or
new ones) and returns them; the chapter adds the caption and alt text.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .plots import _axes, _numpy


# --------------------------------------------------------------------------------------
# Chapter 6: the optimisation of δ (ROME, Meng et al., 2022)
# --------------------------------------------------------------------------------------

def plot_delta_optimisation(losses: Sequence[Mapping[str, float]], target: str = "target", axes=None,
                            terms: Mapping[str, str] | None = None):
    """The loss terms and P(target) at every Adam step of ROME's v* optimisation (`rome.compute_v_star`'s
    `losses`), one linear panel each with a marker per step, so that no term is hidden by another's
    scale or by a log axis at zero. Returns the Axes."""
    terms = dict(terms or {"nll": "NLL of the new object", "kl": "KL term", "decay": "weight-decay term",
                           "p_target": f"P({target.strip()}), mean over prompts"})
    if not losses:
        raise ValueError("losses is empty: compute_v_star logs one row per Adam step")
    missing = [key for key in terms if key not in losses[0]]
    if missing:
        raise ValueError(f"the loss rows have no {missing}; they have {sorted(losses[0])}")
    if axes is None:
        _, axes = plt.subplots(1, len(terms), figsize=(2.9 * len(terms), 2.8))
    steps = np.arange(len(losses))
    for n, (ax, (key, label)) in enumerate(zip(axes, terms.items())):
        ax.plot(steps, [row[key] for row in losses], marker="o", color=f"C{n}")
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("Adam step")
        ax.set_xticks(steps if len(steps) <= 12 else np.linspace(0, steps[-1], 6).round().astype(int))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        if key == "p_target":
            ax.set_ylim(-0.02, 1.02)
    return axes


def plot_key_spectrum(eigenvalues, layer: int | None = None, ax=None):
    """The eigenvalues of C = E[k kᵀ], largest first, on a log axis, with the condition number
    (largest / smallest) in the title. `eigenvalues` in any order (e.g. `torch.linalg.eigvalsh`'s
    ascending ones)."""
    values = np.sort(_numpy(eigenvalues))[::-1]
    if values.size == 0 or values[-1] <= 0:
        raise ValueError("the spectrum needs positive eigenvalues (C must be positive definite)")
    ax = _axes(ax, figsize=(6.5, 3.2))
    ax.semilogy(np.arange(1, len(values) + 1), values, color="C0")
    ax.set_xlabel("rank")
    ax.set_ylabel("eigenvalue of C (log scale)")
    where = f", layer {layer}" if layer is not None else ""
    ax.set_title(f"Spectrum of C = E[k kᵀ]{where}: condition number {values[0] / values[-1]:.1e}")
    return ax


def plot_feasible_costs(ratios: Mapping[float, Sequence[float]], ax=None, seed: int = 0):
    """For each size of feasible perturbation (x, relative to ‖ΔW‖), the excess cost of every
    random feasible update over ROME's, ‖ΔW′K‖ / ‖ΔW K‖ − 1, as points on log-log axes (jittered
    along x by a seeded ±8% so that a cluster's points can be told apart)."""
    if not ratios:
        raise ValueError("ratios is empty: give {perturbation size: cost ratios}")
    ax = _axes(ax, figsize=(6.5, 3.2))
    rng = np.random.default_rng(seed)
    for size, values in ratios.items():
        values = _numpy(values)
        ax.scatter(np.full(len(values), size) * np.exp(rng.uniform(-0.08, 0.08, len(values))), values - 1,
                   s=10, color="C1", alpha=0.6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("size of the feasible perturbation / |ΔW|")
    ax.set_ylabel("|ΔW′ K| / |ΔW K| − 1")
    ax.set_title("Every update stores k* → v*; ROME's disturbs the other keys least")
    return ax


def plot_layer_sweep(rows: Sequence[Mapping], configs: Sequence[str], marked_layer: int | None = None,
                     metrics: Sequence[str] = ("ES", "PS", "NS", "S"), axes=None):
    """ROME at every layer (`scripts/rome_layers.py`'s rows): one panel per setting in `configs`,
    the edited layer on x, one line per metric in percent; a dotted line marks `marked_layer`
    (the shipped layer). Returns the Axes."""
    if not configs:
        raise ValueError("configs is empty: name the settings to draw")
    if axes is None:
        _, axes = plt.subplots(1, len(configs), figsize=(5.2 * len(configs), 3.3), sharey=True, squeeze=False)
        axes = axes[0]
    markers = dict(zip(("ES", "PS", "NS", "S"), ("o", "s", "^", "D")))
    for ax, name in zip(axes, configs):
        chosen = [r for r in rows if r["config"] == name]
        if not chosen:
            raise ValueError(f"no rows for the setting {name!r}")
        for metric in metrics:
            ax.plot([r["layer"] for r in chosen], [r[metric] for r in chosen], marker=markers.get(metric, "o"),
                    label=metric)
        if marked_layer is not None:
            ax.axvline(marked_layer, color="gray", ls=":", lw=1)
        ax.set_xlabel("edited layer")
        ax.set_title(name, fontsize="medium")
        ax.set_ylim(-2, 102)
    axes[0].set_ylabel("percent")
    axes[-1].legend(loc="lower left", fontsize="small")
    return axes


# --------------------------------------------------------------------------------------
# Chapter 7: the scaling curve (MEMIT, Meng et al., 2023, figure 5)
# --------------------------------------------------------------------------------------

def wilson_interval(rate: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (Wilson, 1927) of a success rate in [0, 1] observed over n cases, as
    (low, high). Unlike rate ± z·se it does not shrink to a point at 0 or 1. For a mean of per-case
    shares in [0, 1] (PS, NS) it is conservative: their variance is at most rate·(1 − rate)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive number of cases, got {n!r}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must lie in [0, 1], got {rate!r}")
    denominator = 1 + z * z / n
    centre = (rate + z * z / (2 * n)) / denominator
    half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def plot_scaling(data: dict, metrics=("ES", "PS", "NS", "S", "fluency"), methods=None, axes=None,
                 interval: str = "wilson"):
    """The scaling curve (Meng et al., 2023, figure 5) from `scripts/memit_scaling.py`'s JSON: one panel
    per metric (at most three a row), number of edits on a log axis, one line per method, one legend
    (in the grid's free panel, or below the panels).
    ES, PS and NS carry 95% intervals as error bars: `interval="wilson"` (default) the Wilson interval
    of the rate over the row's n scored cases (`wilson_interval`), `"stored"` the file's
    `<metric>_ci` (1.96 standard errors over the cases, the paper's ±, which is 0 wide when every case
    agrees), `None` none. S and fluency have no interval."""
    if interval not in ("wilson", "stored", None):
        raise ValueError(f"interval must be 'wilson', 'stored' or None, got {interval!r}")
    results = data["results"]
    methods = methods or [m for m in ("MEMIT", "ROME", "FT-L", "unedited") if m in results]
    legend_axis = None
    if axes is None:  # at most three panels a row, so that each stays readable at book width
        cols = min(3, len(metrics))
        rows_n = -(-len(metrics) // cols)
        _, grid = plt.subplots(rows_n, cols, figsize=(3.4 * cols, 3.0 * rows_n), squeeze=False)
        grid = list(grid.flat)
        axes, spare = grid[:len(metrics)], grid[len(metrics):]
        for ax in spare:
            ax.axis("off")
        legend_axis = spare[0] if spare else None
    markers = {"MEMIT": "o", "ROME": "s", "FT-L": "^", "unedited": ""}

    def errors(rows, metric):
        if interval is None or metric not in ("ES", "PS", "NS"):
            return None
        if interval == "stored":
            return [r.get(metric + "_ci", 0.0) for r in rows]
        bounds = [wilson_interval(min(max(r[metric] / 100, 0.0), 1.0), int(r["n"])) for r in rows]
        return [[max(0.0, r[metric] - 100 * lo) for r, (lo, _) in zip(rows, bounds)],   # rounding: never below 0
                [max(0.0, 100 * hi - r[metric]) for r, (_, hi) in zip(rows, bounds)]]

    for ax, metric in zip(axes, metrics):
        for method in methods:
            rows = [r for r in results[method] if metric in r]
            style = {"linestyle": ":", "color": "grey"} if method == "unedited" else {}
            ax.errorbar([r["n_edits"] for r in rows], [r[metric] for r in rows], yerr=errors(rows, metric),
                        capsize=2, ms=4, elinewidth=0.8, marker=markers.get(method, "o"),
                        label="ROME (sequential)" if method == "ROME" else method, **style)
        ax.set_xscale("log")
        ax.set_title(metric if metric != "fluency" else "fluency (n-gram entropy)", fontsize="medium")
        ax.set_xlabel("edits")
        if metric != "fluency":
            ax.set_ylim(-3, 103)
    axes[0].set_ylabel("score (%)")
    for ax in axes[1:]:
        if ax.get_subplotspec() is not None and ax.get_subplotspec().is_first_col():
            ax.set_ylabel("score (%)" if ax.get_title() != "fluency (n-gram entropy)" else "n-gram entropy")
    handles, labels = axes[0].get_legend_handles_labels()
    figure = axes[0].figure
    figure.tight_layout()
    if legend_axis is not None:  # the free panel of the grid holds the legend
        bbox = legend_axis.get_position()
        figure.legend(handles, labels, loc="center", bbox_to_anchor=(bbox.x0 + bbox.width / 2, bbox.y0 + bbox.height / 2),
                      ncol=1, frameon=False, fontsize="medium")
    else:
        figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=len(labels),
                      frameon=False, fontsize="small")
    return axes


def plot_layer_shares(records, ax=None):
    """MEMIT's layer loop (chapter 7): for each edited layer (and pass), the mean norm of the
    residual share it was asked to add, ‖r_i‖, beside the mean norm its update delivered on the
    edited keys, ‖ΔW k_i‖ (`memit.edit(...).records`). Passes are separated by dashed lines and
    labelled above the bars. Returns the Axes."""
    records = list(records)
    if not records:
        raise ValueError("no layer records to draw")
    asked = [rec.residual_norm for rec in records]
    delivered = [rec.achieved_norm for rec in records]
    x = np.arange(len(records))
    ax = _axes(ax, figsize=(6.5, 3.2))
    ax.bar(x - 0.2, asked, 0.4, label="asked: mean ‖r_i‖")
    ax.bar(x + 0.2, delivered, 0.4, label="delivered: mean ‖ΔW k_i‖")
    ax.set_xticks(x, [f"layer {rec.layer}" for rec in records], fontsize="small")
    passes = sorted({rec.pass_index for rec in records})
    for p in passes:
        at = [i for i, rec in enumerate(records) if rec.pass_index == p]
        if p != passes[0]:
            ax.axvline(at[0] - 0.5, color="grey", linewidth=0.8, linestyle="--")
        ax.text(sum(at) / len(at), max(asked) * 1.02, f"pass {p + 1}", ha="center")
    ax.set_ylabel("norm")
    ax.set_ylim(0, max(asked) * 1.3)
    ax.legend(frameon=False, fontsize="small", loc="upper left", ncol=2)
    return ax


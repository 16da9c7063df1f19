"""Figures and the explorer widget of the memory-network chapter.

Matplotlib only, colour-blind-safe (`cividis` for coefficients, the
`tableau-colorblind10` cycle for lines and bars). Every function draws on given axes
or a new figure and returns it, so the chapter adds its caption and alt text.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

from .analysis import StoryReading, read_story

__all__ = ["plot_reading", "plot_readings", "plot_accuracy_grid", "plot_coefficient_profiles", "explorer"]

_COLOURS = ("#006BA4", "#FF800E", "#ABABAB", "#595959", "#5F9ED1", "#C85200")  # tableau-colorblind10


def plot_reading(reading: StoryReading, ax=None, truth: str | None = None, vmax: float | None = None,
                 title: str | None = None):
    """One story: a memory x hop heatmap of coefficients, annotated, answer in the title."""
    if ax is None:
        _, ax = plt.subplots(figsize=(2.2 + 0.9 * reading.coefficients.shape[0], 0.45 * len(reading.sentences) + 1.2))
    c = reading.coefficients.T.numpy()  # [M, hops]
    top = vmax if vmax is not None else max(float(np.abs(c).max()), 1e-6)
    ax.imshow(c, cmap="cividis", vmin=min(0.0, float(c.min())), vmax=top, aspect="auto")
    ax.set_xticks(range(c.shape[1]), labels=[f"hop {k + 1}" for k in range(c.shape[1])])
    ax.set_yticks(range(c.shape[0]), labels=reading.sentences)
    ax.tick_params(length=0)
    for (i, k), v in np.ndenumerate(c):
        ax.text(k, i, f"{v:.2f}", ha="center", va="center", fontsize="small",
                color="black" if v > 0.55 * top else "white")
    verdict = "" if truth is None else ("  ✓" if reading.answer == truth else f"  ✗ (truth: {truth})")
    ax.set_title(title if title is not None else f"{reading.question} → {reading.answer}{verdict}",
                 fontsize="medium", loc="left")
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    return ax


def plot_readings(model, task, examples, titles=None):
    """One heatmap per example (a list of Example), side by side; returns the figure."""
    readings = [read_story(model, task, e.story, e.question) for e in examples]
    rows = max(len(r.sentences) for r in readings)
    fig, axes = plt.subplots(1, len(readings), figsize=(5.2 * len(readings), 0.42 * rows + 1.4), squeeze=False)
    for i, (ax, r, e) in enumerate(zip(axes[0], readings, examples)):
        plot_reading(r, ax=ax, truth=e.answer, title=None if titles is None else titles[i])
    fig.tight_layout()
    return fig


def plot_accuracy_grid(results: dict, metrics=("one_hop", "two_hop", "two_hop_made_up"), labels=None, axes=None):
    """Grouped bars: one panel per metric, hop count on the x axis, one bar per coefficient function."""
    coefs = list(dict.fromkeys(c for c, _ in results))
    hops = sorted({k for _, k in results})
    labels = labels or {m: m.replace("_", " ") for m in metrics}
    if axes is None:
        _, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), sharey=True, squeeze=False)
        axes = axes[0]
    width = 0.8 / len(coefs)
    for ax, metric in zip(axes, metrics):
        for j, coef in enumerate(coefs):
            values = [100 * results[(coef, k)].accuracy[metric] for k in hops]
            xs = np.arange(len(hops)) + (j - (len(coefs) - 1) / 2) * width
            bars = ax.bar(xs, values, width, label=coef, color=_COLOURS[j % len(_COLOURS)])
            ax.bar_label(bars, fmt="%.0f", fontsize="x-small", padding=1)
        ax.set_xticks(range(len(hops)), labels=[f"{k} hop{'s' if k > 1 else ''}" for k in hops])
        ax.set_title(labels[metric], fontsize="medium")
        ax.set_ylim(0, 108)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].set_ylabel("test accuracy (%)")
    axes[-1].legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return axes


def plot_coefficient_profiles(profiles: dict, ax=None, ylabel: str = "coefficient", title: str = ""):
    """Sorted coefficient profiles, largest first: {label: 1-D array} -> one line each."""
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.2))
    for j, (label, values) in enumerate(profiles.items()):
        v = np.sort(np.asarray(values, dtype=float))[::-1]
        ax.plot(np.arange(1, len(v) + 1), v, marker="o" if len(v) <= 20 else None, ms=4,
                label=label, color=_COLOURS[j % len(_COLOURS)])
    ax.set_xlabel("memories, largest coefficient first")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.axhline(0, color="black", lw=0.6)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(frameon=False, fontsize="small")
    return ax


DEFAULT_STORY = ("Mara travelled to Osaka. Tomas flew to Lima. Osaka is in Japan. "
                 "Lima is in Peru. Hana went to Accra. Accra is in Ghana.")


def explorer(models: dict, task, story: str = DEFAULT_STORY, question: str = "Which country is Mara in?"):
    """An ipywidgets explorer: type a story and a question, pick a model, see each hop's
    coefficients and the answer. `models` maps a label to a trained MemN2N.

    Builds and draws once right away (so it also renders headless, e.g. under nbval),
    then redraws whenever an input changes. Returns the widget box.
    """
    import ipywidgets as W
    from IPython.display import display

    story_box = W.Textarea(value=story, description="Story", layout=W.Layout(width="95%", height="90px"))
    question_box = W.Text(value=question, description="Question", layout=W.Layout(width="60%"),
                          continuous_update=False)
    which = W.Dropdown(options=list(models), value=next(iter(models)), description="Model")
    out = W.Output()

    def draw(*_):
        out.clear_output(wait=True)
        with out:
            try:
                r = read_story(models[which.value], task, story_box.value, question_box.value)
            except ValueError as err:
                print(err)
                return
            fig, ax = plt.subplots(figsize=(2.4 + 0.9 * r.coefficients.shape[0], 0.42 * len(r.sentences) + 1.2))
            plot_reading(r, ax=ax)
            plt.show()
            print("answer:", ", ".join(f"{w} ({p:.0%})" for w, p in r.top))
            if r.unknown:
                print("unknown words (read as <unk>):", ", ".join(r.unknown))

    for w in (story_box, question_box, which):
        w.observe(draw, names="value")
    box = W.VBox([story_box, W.HBox([question_box, which]), out])
    display(box)
    draw()
    return box

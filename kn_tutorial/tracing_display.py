"""Causal traces in the paper's style: heatmaps of one prompt, average effects by token role,
and an explorer (the method: `tracing`)."""
from __future__ import annotations

import numpy as np

from .tracing import KINDS, ROLES, Trace, trace
from .tracing_averages import _as_fact

CMAP_OF_KIND = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}  # the paper's colours
_KIND_NAME = {"hidden": "hidden states", "mlp": "MLP outputs", "attn": "attention outputs"}
_KIND_LABEL = {"hidden": "single restored layer", "mlp": "centre of restored MLP layers",
               "attn": "centre of restored attention layers"}


def plot_trace(result: Trace, ax=None, title: str | None = None):
    """Heatmap of P_{*, clean state (t, l)}(o): tokens down, layers across, subject tokens starred.

    The colour scale starts at P_*(o), so white means "restoring this state brings nothing back".
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 0.35 * len(result.tokens) + 1.2))
    a, b = result.span
    labels = [repr(tok)[1:-1] + (" *" if a <= i < b else "") for i, tok in enumerate(result.tokens)]
    image = ax.imshow(result.scores.numpy(), cmap=CMAP_OF_KIND[result.kind], aspect="auto",
                      vmin=min(result.corrupted_prob, float(result.scores.min())))
    ax.set_yticks(range(len(labels)), labels=labels)
    L = result.scores.shape[1]
    ax.set_xticks(range(0, L, max(1, L // 8)))
    window = f" (window {result.window})" if result.kind != "hidden" else ""
    ax.set_xlabel(_KIND_LABEL[result.kind] + window)
    ax.set_title(title or f"restoring {_KIND_NAME[result.kind]}")
    ax.figure.colorbar(image, ax=ax, label=f"p({result.target.strip()})")
    return ax


def plot_traces(traces: list[Trace], title: str | None = None):
    """The paper's three heatmaps (hidden, MLP, attention) side by side; returns the figure."""
    import matplotlib.pyplot as plt

    T = len(traces[0].tokens)
    fig, axes = plt.subplots(1, len(traces), figsize=(4.6 * len(traces), 0.35 * T + 1.6),
                             constrained_layout=True)
    for ax, t in zip(np.atleast_1d(axes), traces):
        plot_trace(t, ax=ax)
    fig.suptitle(title or f"{traces[0].prompt!r} -> {traces[0].target!r}: "
                 f"P = {traces[0].clean_prob:.2f}, P* = {traces[0].corrupted_prob:.2f}")
    return fig


def plot_average_effects(summary: dict, normalised: bool = False):
    """AIE by token role (rows) and layer (columns) for each kind, as in the paper's figure 2."""
    import matplotlib.pyplot as plt

    kinds = list(summary["effects"])
    table = summary["normalised" if normalised else "effects"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.8 * len(kinds), 3.2), constrained_layout=True)
    for ax, kind in zip(np.atleast_1d(axes), kinds):
        image = ax.imshow(table[kind], cmap=CMAP_OF_KIND[kind], aspect="auto", vmin=0)
        ax.set_yticks(range(len(ROLES)), labels=list(summary["roles"]))
        ax.set_xticks(range(summary["n_layers"]))
        ax.set_xlabel(_KIND_LABEL[kind] + (f" (window {summary['window']})" if kind != "hidden" else ""))
        ax.set_title(f"AIE of {_KIND_NAME[kind]}")
        fig.colorbar(image, ax=ax, label="AIE / ATE" if normalised else "AIE")
    fig.suptitle(f"{summary['n_facts']} facts, {summary['samples']} noise samples each")
    return fig


def trace_explorer(model, tokenizer, facts, samples: int = 3, noise: float = 3.0, window: int = 1):
    """Pick a fact (or type a prompt and its subject) and see the three heatmaps.

    facts: (prompt, subject, target) tuples or dicts. Returns the widget (display it, e.g. as a
    cell's last expression); it draws once when built, so it also works headless.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    facts = [_as_fact(f) for f in facts]
    choice = w.Dropdown(options=[(f"{p} -> {t}", i) for i, (p, _, t) in enumerate(facts)], description="fact")
    prompt = w.Text(value=facts[0][0], description="prompt", layout=w.Layout(width="60%"))
    subject = w.Text(value=facts[0][1], description="subject")
    target = w.Text(value=facts[0][2] or "", description="target", placeholder="empty: top prediction")
    n_samples = w.IntSlider(value=samples, min=1, max=20, description="samples")

    def pick(change):
        p, s, t = facts[change["new"]]
        prompt.value, subject.value, target.value = p, s, t or ""
    choice.observe(pick, names="value")

    def draw(prompt, subject, target, samples):
        try:
            traces = [trace(model, tokenizer, prompt, subject, target or None, kind=kind, samples=samples,
                            noise=noise, window=window) for kind in KINDS]
        except (ValueError, KeyError) as err:
            print(f"cannot trace: {err}")
            return
        plot_traces(traces)
        plt.show()

    out = w.interactive_output(draw, {"prompt": prompt, "subject": subject, "target": target,
                                      "samples": n_samples})
    return w.VBox([choice, w.HBox([prompt, subject]), w.HBox([target, n_samples]), out])

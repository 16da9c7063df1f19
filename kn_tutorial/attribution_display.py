"""Showing integrated-gradients attributions: a heatmap, a table of the top neurons, an explorer
that draws the per-layer summary and the top neurons (`plots.plot_attribution_summary`)
(the method: `attribution`)."""
from __future__ import annotations

from typing import Sequence

from torch import Tensor

from .attribution import integrated_gradients, key_activations, top_neurons


def plot_attributions(attributions: Tensor, ax=None, title: str = "", layers: Sequence[int] | None = None):
    """Heatmap of Attr over layers (rows) x neurons (columns), [L, d_ff], with a diverging,
    colour-blind-safe map (PuOr) centred at 0. Returns the Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3))
    values = attributions.detach().float().cpu().numpy()
    top = max(float(abs(values).max()), 1e-12)
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="PuOr_r",
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=-top, vmax=top))
    rows = list(range(len(values))) if layers is None else list(layers)
    ax.set_yticks(range(len(rows)), labels=[str(r) for r in rows])
    ax.set_ylabel("layer")
    ax.set_xlabel("neuron")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label="Attr", pad=0.01)
    return ax


def top_neurons_html(attributions: Tensor, activations: Tensor, k: int = 10) -> str:
    """An HTML table of the k neurons with the highest attribution: layer, neuron, Attr, w̄
    (numbers right-aligned, with room between the columns)."""
    cell = '<td style="padding: 0.1em 0.9em; text-align: right">'
    head = '<th style="padding: 0.1em 0.9em; text-align: right">'
    rows = "".join(
        f"<tr>{cell}{layer}</td>{cell}{neuron}</td>{cell}{attributions[layer, neuron]:.4f}</td>"
        f"{cell}{activations[layer, neuron]:.3f}</td></tr>"
        for layer, neuron in top_neurons(attributions, k))
    header = "".join(f"{head}{name}</th>" for name in ("layer", "neuron", "Attr", "activation w̄"))
    return f"<table><tr>{header}</tr>{rows}</table>"


def attribution_explorer(model, tokenizer, facts: Sequence[tuple[str, str]], steps: int = 20, k: int = 10):
    """An ipywidgets explorer (headless-safe, nothing blocks): pick a fact (prompt, target) and a
    step count m; see P(target), the attribution map summarised as chapter 3 draws it
    (`plots.plot_attribution_summary`: each layer's summed positive and negative attribution,
    and the k neurons with the largest attribution), and a table of those k neurons with their
    activations w̄. (A full L x d_ff heatmap is unreadable at book width.)"""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    from .plots import plot_attribution_summary
    from .scoring import score

    labels = [(f"{prompt} → {target.strip()}", i) for i, (prompt, target) in enumerate(facts)]
    fact = widgets.Dropdown(options=labels, value=0, description="fact", layout={"width": "32em"})
    m = widgets.Dropdown(options=[1, 5, 20, 50], value=steps, description="steps m")

    def show(i, m):
        prompt, target = facts[i]
        attr = integrated_gradients(model, tokenizer, prompt, target, steps=m)
        p = float(score(model, tokenizer, [prompt], [target])["logprob"][0].exp())
        plot_attribution_summary(attr, k=k, title=f"{prompt} → {target.strip()}   P = {p:.3f}, m = {m}")
        plt.show()
        display(HTML(top_neurons_html(attr, key_activations(model, tokenizer, prompt), k)))

    out = widgets.interactive_output(show, {"i": fact, "m": m})
    return widgets.VBox([widgets.HBox([fact, m]), out])

"""Showing knowledge neurons: Dai et al.'s suppress/amplify figure and an explorer (the
method: `neurons`)."""
from __future__ import annotations

from typing import Sequence

from .neurons import GROUPS, FactNeurons, single_neuron_effects


def plot_effects(summary: Sequence[dict], sets=("knowledge", "random (knowledge)"), axes=None, percent: bool = True):
    """Dai et al.'s figure from `summarize_effects` rows (one metric): bars of the mean change
    with 95% CI for suppressing (×0) and amplifying (×2), per group of prompts, each neuron
    set in `sets` side by side (knowledge neurons next to their random control)."""
    import matplotlib.pyplot as plt

    metric = summary[0]["metric"]
    factors = sorted({r["factor"] for r in summary})
    if axes is None:
        _, axes = plt.subplots(1, len(factors), figsize=(5.2 * len(factors), 3.4))
    axes = [axes] if not hasattr(axes, "__len__") else list(axes)
    scale = 100.0 if percent and metric != "dlogp" else 1.0
    width = 0.8 / len(sets)
    for ax, factor in zip(axes, factors):
        for j, name in enumerate(sets):
            rows = {s["group"]: s for s in summary if s["neurons"] == name and s["factor"] == factor}
            means = [scale * rows[g]["mean"] if g in rows else float("nan") for g in GROUPS]
            cis = [scale * rows[g]["ci95"] if g in rows else 0.0 for g in GROUPS]
            xs = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(GROUPS))]
            ax.bar(xs, means, width, yerr=cis, capsize=3, label=name, color=f"C{j}")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(GROUPS)), labels=list(GROUPS))
        ax.set_title("suppress (×0)" if factor == 0 else f"amplify (×{factor:g})")
        ax.set_ylabel({"rel_change": "change of P(correct) (%)" if scale == 100 else "relative change of P(correct)",
                       "dlogp": "Δ log P(correct) (nats)",
                       "dp": "ΔP(correct) (points)" if scale == 100 else "ΔP(correct)"}.get(metric, metric))
    axes[0].legend(fontsize=8)
    return axes


def neuron_explorer(model, tokenizer, found: Sequence[FactNeurons], relation_level=None):
    """An ipywidgets explorer (headless-safe): pick a fact and one of its prompts; see its
    knowledge neurons (prompt share, relation-level or not) and P(correct) as each neuron
    alone, and all together, is suppressed (×0) or amplified (×2)."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    labels = [(f"{f.subject} —{f.relation}→ {f.object}  ({len(f.neurons)} neurons)", i) for i, f in enumerate(found)]
    pick = widgets.Dropdown(options=labels, value=0, description="fact", layout={"width": "34em"})
    prompt = widgets.IntSlider(value=0, min=0, max=max(f.n_prompts for f in found) - 1, description="prompt #")

    def show(i, j):
        fact = found[i]
        j = min(j, fact.n_prompts - 1)
        shared = (relation_level or {}).get(fact.relation, {})
        rows = "".join(
            f"<tr><td>{layer}</td><td>{neuron}</td><td>{int(fact.counts[layer, neuron])}/{fact.n_prompts}</td>"
            f"<td>{'relation-level ({:.0%})'.format(shared[(layer, neuron)]) if (layer, neuron) in shared else 'fact'}</td></tr>"
            for layer, neuron in fact.neurons)
        display(HTML(f"<p>prompt: <b>{fact.prompts[j]}</b> → {fact.object}; p = {fact.p:.2f}</p>"
                     "<table><tr><th>layer</th><th>neuron</th><th>prompts</th><th>kind</th></tr>"
                     f"{rows}</table>"))
        if not fact.neurons:
            return
        effects = single_neuron_effects(model, tokenizer, fact, j)
        names = [f"L{layer}.{neuron}" for layer, neuron in fact.neurons] + ["all"]
        fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(names) + 2), 2.8))
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], effects[0.0], 0.4, label="suppressed (×0)", color="C0")
        ax.bar([x + 0.2 for x in xs], effects[2.0], 0.4, label="amplified (×2)", color="C1")
        ax.axhline(effects["clean"], color="black", ls="--", lw=1, label=f"unchanged P = {effects['clean']:.3f}")
        ax.set_xticks(list(xs), labels=names)
        ax.set_ylabel("P(correct)")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8, loc="lower left")
        plt.show()

    out = widgets.interactive_output(show, {"i": pick, "j": prompt})
    return widgets.VBox([widgets.HBox([pick, prompt]), out])

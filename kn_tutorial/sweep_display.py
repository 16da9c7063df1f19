"""Showing the recorded sweep of Atlas variants (chapter 0): which training data moves the MLP
site of causal tracing (Meng et al., 2022) above the first layer?

The sweep itself is `scripts/atlas_sweep.py`; its results are the package data
`book_data.load("atlas_sweep")`. This module only reads that record: one row per variant
(`sweep_table`) and one figure (`plot_sweep`).

The measures, at the last subject token of known facts (window 1):
- `MLP AIE L0`: the average indirect effect of restoring the layer-0 MLP output;
- `best MLP AIE ≥ 1`: the largest such effect at any later layer, and that layer;
- `ratio`: their quotient; 0.5 is the bar of the book's teaching-model goal (a later MLP
  with at least half the first one's effect), 1 a site that has left layer 0;
- `hidden peak`: the layer where restoring the whole hidden state helps most;
- recall of held-out contexts (words before the subject the model never saw) and of
  novel wordings; the share of refined knowledge neurons in layer 0.
"""
from __future__ import annotations

import pandas as pd

COLUMNS = ("variant", "what changed", "MLP AIE L0", "best MLP AIE ≥ 1", "layer", "ratio", "hidden peak",
           "recall: trained", "recall: held-out contexts", "recall: novel", "KN in layer 0", "layers × width")


def sweep_rows(data: dict) -> list[dict]:
    """One dict per variant of the sweep record, with the measures of `COLUMNS`."""
    rows = []
    for v in data["variants"]:
        probe, cfg = v["probe"], v["config"]
        mlp, recall = probe["trace"]["mlp"], probe["recall"]
        kn = probe.get("knowledge_neurons") or {}
        rows.append({
            "variant": v["name"], "what changed": v["what"],
            "MLP AIE L0": mlp["layer0"], "best MLP AIE ≥ 1": mlp["best_after_first_aie"],
            "layer": mlp["best_after_first"], "ratio": mlp["best_after_first_aie"] / mlp["layer0"],
            "hidden peak": probe["trace"]["hidden"]["peak_layer"],
            "recall: trained": recall["train"], "recall: held-out contexts": recall["heldout_contexts"],
            "recall: novel": recall["novel"], "KN in layer 0": kn.get("share_layer0", float("nan")),
            "layers × width": f"{cfg['n_layer']} × {cfg['n_embd']}",
        })
    return rows


def sweep_table(data: dict) -> pd.DataFrame:
    """The sweep as a table, one row per variant, in the order they were run."""
    return pd.DataFrame(sweep_rows(data), columns=list(COLUMNS)).set_index("variant")


def plot_sweep(data: dict, ax=None, goal: float = 0.5):
    """Each variant as a point: x = the ratio best later MLP AIE / layer-0 MLP AIE, y = recall of
    held-out contexts; point size = recall on trained templates. Lines at the ratio `goal` and at 1."""
    import matplotlib.pyplot as plt

    rows = sweep_rows(data)
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    placed: list[tuple[float, float]] = []
    for r in sorted(rows, key=lambda r: (-r["recall: held-out contexts"], r["ratio"])):
        x, y = r["ratio"], 100 * r["recall: held-out contexts"]
        ax.scatter(x, y, s=20 + 180 * r["recall: trained"] ** 4,
                   color="#1f77b4" if r["layers × width"].startswith("8 ") else "#d62728", alpha=0.8,
                   edgecolor="black", linewidth=0.5, zorder=3)
        crowded = sum(abs(x - px) < 0.3 and abs(y - py) < 4 for px, py in placed)  # labels already near
        ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(10, 3 - 12 * crowded), fontsize=8,
                    arrowprops=dict(arrowstyle="-", linewidth=0.5, color="grey") if crowded else None)
        placed.append((x, y))
    ax.axvline(goal, color="grey", linestyle="--", linewidth=1)
    ax.axvline(1.0, color="black", linestyle=":", linewidth=1)
    bottom = min(40, min(100 * r["recall: held-out contexts"] for r in rows) - 5)
    ax.text(goal, bottom + 1, " goal (0.5)", fontsize=8, color="grey", va="bottom")
    ax.text(1.0, bottom + 1, " site left layer 0", fontsize=8, va="bottom")
    ax.set_xlabel("best MLP AIE at layers ≥ 1 / MLP AIE at layer 0")
    ax.set_ylabel("recall, held-out contexts (%)")
    ax.set_xlim(0, max(1.2, max(r["ratio"] for r in rows) + 0.15))
    ax.set_ylim(bottom, 106)
    ax.scatter([], [], color="#1f77b4", edgecolor="black", label="8 layers")
    ax.scatter([], [], color="#d62728", edgecolor="black", label="12 layers")
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, title="point size:\ntrained recall",
              title_fontsize=8)
    ax.grid(alpha=0.3)
    return ax

"""Looking at MEMIT's edits: predictions before and after, the scaling figure and an explorer
(the method: `memit`; Meng et al., 2023)."""
from __future__ import annotations

import torch

from .memit import MemitHparams, edit
from .plots import plot_scaling  # noqa: F401  (the scaling figure lives in plots.py; re-exported here)


def prediction_rows(model, tokenizer, cases: list[dict], n_neighbours: int = 2) -> list[dict]:
    """P(new object) and P(true object) (length-normalised, as evaluation scores them) on each case's
    rewrite prompt, its paraphrases and its first `n_neighbours` neighbourhood prompts."""
    from .evaluation import case_prompts
    from .scoring import score

    rows = []
    for i, case in enumerate(cases):
        rewrite = case["requested_rewrite"]
        prompts = case_prompts(case)
        for kind, texts in (("rewrite", prompts["rewrite"]), ("paraphrase", prompts["paraphrase"]),
                            ("neighbour", prompts["neighborhood"][:n_neighbours])):
            for text in texts:
                rows.append({"case": i, "kind": kind, "prompt": text,
                             "new": rewrite["target_new"]["str"], "true": rewrite["target_true"]["str"]})
    if not rows:
        return rows
    prompts = [r["prompt"] for r in rows]
    p_new = score(model, tokenizer, prompts, [r["new"] for r in rows])["mean_logprob"].exp()
    p_true = score(model, tokenizer, prompts, [r["true"] for r in rows])["mean_logprob"].exp()
    for r, a, b in zip(rows, p_new.tolist(), p_true.tolist()):
        r["p_new"], r["p_true"] = a, b
    return rows


def memit_explorer(model, tokenizer, cases: list[dict], hparams: MemitHparams | None = None,
                   mom2: dict[int, torch.Tensor] | None = None):
    """An ipywidgets explorer (headless-safe, nothing blocks): pick a case, type a new object, and
    see P(new) and P(true) on its prompts before and after a MEMIT edit (undone right after)."""
    import ipywidgets as widgets
    from IPython.display import display

    labels = [(f"{c['requested_rewrite']['prompt'].replace('{}', c['requested_rewrite']['subject'])} "
               f"-> {c['requested_rewrite']['target_true']['str']}", i) for i, c in enumerate(cases)]
    case = widgets.Dropdown(options=labels, value=0, description="fact", layout=widgets.Layout(width="60%"))
    target = widgets.Text(value=cases[0]["requested_rewrite"]["target_new"]["str"], description="new object",
                          continuous_update=False)
    case.observe(lambda change: setattr(target, "value", cases[change["new"]]["requested_rewrite"]["target_new"]["str"]),
                 names="value")

    def show(i, new):
        if not new.strip():
            print("type a new object")
            return
        chosen = {**cases[i], "requested_rewrite": {**cases[i]["requested_rewrite"], "target_new": {"str": new}}}
        before = prediction_rows(model, tokenizer, [chosen])
        with edit(model, tokenizer, [chosen], hparams, mom2=mom2):
            after = prediction_rows(model, tokenizer, [chosen])
        print(f"{'prompt':<48} {'P(new) before → after':>24} {'P(true) before → after':>24}")
        for b, a in zip(before, after):
            print(f"{b['kind'][:5]:<6}{b['prompt'][:42]:<42} {b['p_new']:>10.3f} → {a['p_new']:<10.3f}  "
                  f"{b['p_true']:>10.3f} → {a['p_true']:<10.3f}")

    out = widgets.interactive_output(show, {"i": case, "new": target})
    display(widgets.VBox([case, target, out]))

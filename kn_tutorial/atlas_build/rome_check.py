"""A quick ROME check of the Atlas model: do edits at a layer take, paraphrase and stay local?

For `n_cases` Atlas-CounterFact cases (a seeded sample), edit one fact with ROME at `layer`,
score that case's rewrite, paraphrase and neighbourhood prompts (ES, PS, NS), and restore
the weights exactly before the next case. The training report runs it at the layer where
causal tracing finds the strongest MLP effect at the subject's last token.
"""
from __future__ import annotations

import random
import time
from dataclasses import replace

from ..atlas.counterfact import load_counterfact
from ..evaluation import evaluate_cases, summarize
from ..progress import progress
from ..rome import RomeHparams, edit
from ..stats import second_moment


def sample_cases(n_cases: int, seed: int = 0) -> list[dict]:
    cases = load_counterfact()
    return random.Random(seed).sample(cases, min(n_cases, len(cases)))


def rome_check(model, tokenizer, layer: int, n_cases: int = 50, seed: int = 0,
               hparams: RomeHparams | None = None) -> dict:
    """ES/PS/NS (percent) of single ROME edits at `layer`, each undone before the next."""
    hparams = replace(hparams or RomeHparams.for_model("atlas"), layer=layer)
    mom2_start = time.time()
    mom2 = second_moment(model, tokenizer, layer, corpus=hparams.mom2_corpus, n_samples=hparams.mom2_n_samples)
    mom2_seconds = time.time() - mom2_start
    cases = sample_cases(n_cases, seed)
    results, started = [], time.time()
    for case in progress(cases, desc=f"ROME edits at layer {layer}"):
        with edit(model, tokenizer, case["requested_rewrite"], hparams, mom2=mom2):
            results.extend(evaluate_cases(model, tokenizer, [case]))
    summary = summarize(results)
    summary.update(layer=layer, seconds_per_edit=(time.time() - started) / len(cases),
                   mom2_seconds=mom2_seconds)
    return summary


def format_rome_check(summaries: list[dict]) -> str:
    lines = [f"{'layer':>5} {'cases':>5} {'ES':>6} {'PS':>6} {'NS':>6} {'S':>6} {'s/edit':>7}"]
    for s in summaries:
        lines.append(f"{s['layer']:>5} {s['n']:>5} {s['ES']:>6.1f} {s['PS']:>6.1f} {s['NS']:>6.1f} "
                     f"{s['S']:>6.1f} {s['seconds_per_edit']:>7.2f}")
    return "\n".join(lines)

"""CounterFact metrics (Meng et al., 2022, section 4.2) for any editing method.

For a case with true object o_c and new object o*, every prompt is scored with both
objects by length-normalised teacher forcing, P(o) = exp(mean_j log P(o_j | prompt, o_<j)):

- ES, efficacy success: P(o*) > P(o_c) on the rewrite prompt;  EM = P(o*) − P(o_c);
- PS, paraphrase success: the same on paraphrase prompts;      PM likewise;
- NS, neighbourhood success: P(o_c) > P(o*) on prompts about *other* subjects whose true
  object is o_c (the edit must not spill over);                  NM = P(o_c) − P(o*);
- S: the harmonic mean of ES, PS and NS.

Works on Atlas-CounterFact and on the real CounterFact JSON (same schema).
"""
from __future__ import annotations

import math
from statistics import mean

import torch

from .scoring import score


def case_prompts(case: dict) -> dict[str, list[str]]:
    rewrite = case["requested_rewrite"]
    return {
        "rewrite": [rewrite["prompt"].replace("{}", rewrite["subject"])],
        "paraphrase": list(case.get("paraphrase_prompts", [])),
        "neighborhood": list(case.get("neighborhood_prompts", [])),
    }


def _targets(case: dict) -> tuple[str, str]:
    rewrite = case["requested_rewrite"]
    return rewrite["target_new"]["str"], rewrite["target_true"]["str"]


@torch.no_grad()
def evaluate_cases(model, tokenizer, cases: list[dict], batch_size: int = 256) -> list[dict]:
    """Per case: ES/PS/NS as fractions of its prompts, and the magnitudes EM/PM/NM."""
    prompts, targets, owners = [], [], []
    for i, case in enumerate(cases):
        new, true = _targets(case)
        for kind, texts in case_prompts(case).items():
            for text in texts:
                for which, target in (("new", new), ("true", true)):
                    prompts.append(text)
                    targets.append(target)
                    owners.append((i, kind, which))
    scores = score(model, tokenizer, prompts, targets, batch_size=batch_size)["mean_logprob"].exp().tolist()
    probs: dict[tuple[int, str], dict[str, list[float]]] = {}
    for (i, kind, which), p in zip(owners, scores):
        probs.setdefault((i, kind), {"new": [], "true": []})[which].append(p)
    results = []
    for i in range(len(cases)):
        row = {"case_id": cases[i].get("case_id", i)}
        for kind, success, magnitude in (("rewrite", "ES", "EM"), ("paraphrase", "PS", "PM"),
                                         ("neighborhood", "NS", "NM")):
            p = probs.get((i, kind))
            if p is None:
                continue
            sign = -1 if kind == "neighborhood" else 1
            diffs = [sign * (a - b) for a, b in zip(p["new"], p["true"])]
            row[success] = mean(d > 0 for d in diffs)
            row[magnitude] = mean(diffs)
        results.append(row)
    return results


def summarize(results: list[dict]) -> dict[str, float]:
    """Means over cases in percent (ES, PS, NS, EM, PM, NM) and S, their harmonic mean."""
    out = {}
    for key in ("ES", "PS", "NS", "EM", "PM", "NM"):
        values = [r[key] for r in results if key in r]
        if values:
            out[key] = 100 * mean(values)
    parts = [out.get(k) for k in ("ES", "PS", "NS")]
    if all(p is not None for p in parts):
        out["S"] = 0.0 if min(parts) == 0 else 3 / sum(1 / p for p in parts)
    out["n"] = len(results)
    return out


def ngram_entropy(text: str, ns: tuple[int, ...] = (2, 3), weights: tuple[float, ...] = (2 / 3, 4 / 3)) -> float:
    """Fluency as in ROME: weighted mean of the entropies of the text's 2- and 3-gram distributions."""
    words = text.split()
    entropies = []
    for n in ns:
        grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
        if not grams:
            entropies.append(0.0)
            continue
        counts: dict[tuple, int] = {}
        for g in grams:
            counts[g] = counts.get(g, 0) + 1
        total = len(grams)
        entropies.append(-sum(c / total * math.log2(c / total) for c in counts.values()))
    return sum(w * e for w, e in zip(weights, entropies)) / len(ns)

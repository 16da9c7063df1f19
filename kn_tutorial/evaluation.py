"""CounterFact metrics (Meng et al., 2022, section 4.2) for any editing method.

For a case with true object o_c and new object o*, every prompt is scored with both
objects by length-normalised teacher forcing, P(o) = exp(mean_j log P(o_j | prompt, o_<j)):

- ES, efficacy success: P(o*) > P(o_c) on the rewrite prompt;  EM = P(o*) − P(o_c);
- PS, paraphrase success: the same on paraphrase prompts;      PM likewise;
- NS, neighbourhood success: P(o_c) > P(o*) on prompts about *other* subjects whose true
  object is o_c (the edit must not spill over);                  NM = P(o_c) − P(o*);
- S: the harmonic mean of ES, PS and NS;
- GE, generation entropy (fluency): the weighted mean of the 2- and 3-gram entropies of texts
  sampled from the model after the case's generation prompts (`generation_entropy`).

Works on Atlas-CounterFact and on the real CounterFact JSON (same schema; `kn_tutorial.counterfact`).

When many facts are edited at once, some neighbourhood prompts are about facts that were edited
themselves (Atlas has six continents: at 1,000 edits about half of a case's neighbours are
edited on the same relation). Those prompts no longer measure spill-over; `without_edited_neighbours`
drops them before scoring.
"""
from __future__ import annotations

import math
import re
from statistics import mean, stdev

import torch

from .kv_cache import cache_keyword
from .models import get_device
from .scoring import score


def case_prompts(case: dict) -> dict[str, list[str]]:
    rewrite = case["requested_rewrite"]
    return {
        "rewrite": [rewrite["prompt"].replace("{}", rewrite["subject"])],
        "paraphrase": list(case.get("paraphrase_prompts", [])),
        "neighborhood": list(case.get("neighborhood_prompts", [])),
    }


def without_edited_neighbours(cases: list[dict], edited: list[dict]) -> tuple[list[dict], float]:
    """(cases whose neighbourhood prompts about facts in `edited` are removed, fraction removed).

    A neighbourhood prompt of a case asks the case's relation of another subject; it is dropped when
    that (subject, relation) is itself in `edited`. The subject comes from the case's
    "neighborhood_subjects" (Atlas-CounterFact) or, in the real CounterFact, is any edited subject of
    the same relation that the prompt names as a whole word."""
    edited_by_relation: dict[str, set[str]] = {}
    for case in edited:
        rewrite = case["requested_rewrite"]
        edited_by_relation.setdefault(str(rewrite.get("relation_id")), set()).add(rewrite["subject"])
    # one whole-word pattern per relation (alternation backtracks over every subject, as a loop would)
    named = {relation: re.compile(r"(?<!\w)(?:" + "|".join(map(re.escape, sorted(subjects))) + r")(?!\w)")
             for relation, subjects in edited_by_relation.items()}
    out, dropped, total = [], 0, 0
    for case in cases:
        relation = str(case["requested_rewrite"].get("relation_id"))
        subjects = edited_by_relation.get(relation, set())
        prompts = list(case.get("neighborhood_prompts", []))
        if "neighborhood_subjects" in case:
            keep = [p for p, s in zip(prompts, case["neighborhood_subjects"], strict=True) if s not in subjects]
        elif relation in named:
            keep = [p for p in prompts if not named[relation].search(p)]
        else:
            keep = prompts
        dropped += len(prompts) - len(keep)
        total += len(prompts)
        case = {**case, "neighborhood_prompts": keep}
        case.pop("neighborhood_subjects", None)
        out.append(case)
    return out, dropped / total if total else 0.0


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
    """Means over cases in percent (ES, PS, NS, EM, PM, NM), S (their harmonic mean), GE (mean
    generation entropy, when present), and for ES/PS/NS the half-width of a 95% interval
    (1.96 standard errors over cases, as the paper's ±)."""
    out = {}
    for key in ("ES", "PS", "NS", "EM", "PM", "NM"):
        values = [r[key] for r in results if key in r]
        if values:
            out[key] = 100 * mean(values)
            if key in ("ES", "PS", "NS") and len(values) > 1:
                out[key + "_ci"] = 100 * 1.96 * stdev(values) / math.sqrt(len(values))
    parts = [out.get(k) for k in ("ES", "PS", "NS")]
    if all(p is not None for p in parts):
        out["S"] = 0.0 if min(parts) == 0 else 3 / sum(1 / p for p in parts)
    ge = [r["GE"] for r in results if "GE" in r and not math.isnan(r["GE"])]
    if ge:
        out["GE"] = mean(ge)
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


@torch.no_grad()
def sample_text(model, tokenizer, prompts: list[str], max_new_tokens: int = 30, top_k: int = 5, seed: int = 0,
                use_cache: bool = True, return_logits: bool = False):
    """Continue every prompt by top-k sampling, all prompts in one left-padded batch; seeded.

    With use_cache the model sees only the newest token at each step, with the key-value cache of
    the earlier ones, and the attention mask of the *whole* sequence so far (a mask of the new
    column only would let every new token attend to nothing but position 0). Positions are counted
    from each row's first real token, so left padding changes nothing. use_cache=False reruns the
    whole sequence each step: the reference the cached path must match (tests compare the logits).
    Returns the continuations (text after the prompt), and with return_logits also the
    [batch, max_new_tokens, vocab] logits that each sampled token was drawn from.
    """
    device = get_device(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):  # left padding: every row's last token is at the end
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    ids, mask = ids.to(device), mask.to(device)
    generator = torch.Generator().manual_seed(seed)
    past, steps_logits, new_tokens = None, [], []
    cache_name = cache_keyword(model)  # the output field has the same name
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [b, s]
        if use_cache and past is not None:
            out = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                        use_cache=True, **{cache_name: past})
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)
        past = out.get(cache_name) if use_cache else None
        logits = out.logits[:, -1].float().cpu()  # [b, vocab]
        top = logits.topk(min(top_k, logits.shape[-1]), dim=-1)
        choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
        token = top.indices.gather(1, choice)  # [b, 1]
        steps_logits.append(logits)
        new_tokens.append(token)
        ids = torch.cat([ids, token.to(device)], dim=1)
        mask = torch.cat([mask, torch.ones_like(token, device=device)], dim=1)
    tokens = torch.cat(new_tokens, dim=1)  # [b, max_new_tokens]
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in tokens]
    return (texts, torch.stack(steps_logits, dim=1)) if return_logits else texts


def generation_entropy(model, tokenizer, cases: list[dict], max_new_tokens: int = 30, seed: int = 0) -> list[float]:
    """GE per case: n-gram entropy of the prompt plus sampled continuation, averaged over the
    case's generation prompts (as the paper, which scores prompt + generated text)."""
    prompts, owners = [], []
    for i, case in enumerate(cases):
        for text in case.get("generation_prompts", []):
            prompts.append(text)
            owners.append(i)
    if not prompts:
        return [float("nan")] * len(cases)
    texts = sample_text(model, tokenizer, prompts, max_new_tokens=max_new_tokens, seed=seed)
    per_case: dict[int, list[float]] = {}
    for i, prompt, text in zip(owners, prompts, texts):
        per_case.setdefault(i, []).append(ngram_entropy(prompt + text))
    return [mean(per_case[i]) if i in per_case else float("nan") for i in range(len(cases))]


def evaluate_editor(model, tokenizer, cases: list[dict], editor=None, generation: bool = True,
                    max_new_tokens: int = 20, desc: str = "editing") -> list[dict]:
    """Independent single edits: for each case apply `editor(model, tokenizer, request)` (a handle
    with `.restore()`, e.g. `rome.edit`), score the case (and GE when `generation`), restore the
    weights exactly before the next case. editor=None scores the unedited model."""
    from .progress import progress

    rows = []
    for case in progress(cases, desc=desc):
        handle = editor(model, tokenizer, case["requested_rewrite"]) if editor is not None else None
        try:
            (row,) = evaluate_cases(model, tokenizer, [case])
            if generation:
                (row["GE"],) = generation_entropy(model, tokenizer, [case], max_new_tokens=max_new_tokens,
                                                  seed=int(row["case_id"]) if str(row["case_id"]).isdigit() else 0)
        finally:
            if handle is not None:
                handle.restore()
        rows.append(row)
    return rows


def comparison_table(summaries: dict[str, dict]):
    """The paper's table 4 layout as a pandas DataFrame: one row per editor, columns
    Score S | Efficacy ES, EM | Generalization PS, PM | Specificity NS, NM | Fluency GE."""
    import pandas as pd

    layout = [("Score", "S"), ("Efficacy", "ES"), ("Efficacy", "EM"), ("Generalization", "PS"),
              ("Generalization", "PM"), ("Specificity", "NS"), ("Specificity", "NM"), ("Fluency", "GE")]
    data = {col: [summaries[m].get(col[1], float("nan")) for m in summaries] for col in layout}
    frame = pd.DataFrame(data, index=list(summaries))
    frame.columns = pd.MultiIndex.from_tuples(layout)
    frame.index.name = "Editor"
    return frame.round(1)


def _probs_and_greedy(model, tokenizer, prompts, new, true, greedy_tokens):
    p_new = score(model, tokenizer, prompts, [new] * len(prompts))["mean_logprob"].exp()
    p_true = score(model, tokenizer, prompts, [true] * len(prompts))["mean_logprob"].exp()
    greedy = sample_text(model, tokenizer, prompts, max_new_tokens=greedy_tokens, top_k=1)
    return p_new.tolist(), p_true.tolist(), greedy


def before_after(model, tokenizer, groups: dict[str, list[str]], new: str, true: str, editor, request: dict,
                 greedy_tokens: int = 3):
    """What an edit changes: for each prompt (grouped, e.g. {"rewrite": [...], "neighbours": [...]}) the
    greedy continuation and P(new), P(true) before and after `editor(model, tokenizer, request)`.
    The weights are restored exactly before returning; returns (pandas DataFrame, the edit's handle)."""
    import pandas as pd

    prompts = [p for ps in groups.values() for p in ps]
    names = [g for g, ps in groups.items() for _ in ps]
    before = _probs_and_greedy(model, tokenizer, prompts, new, true, greedy_tokens)
    handle = editor(model, tokenizer, request)
    try:
        after = _probs_and_greedy(model, tokenizer, prompts, new, true, greedy_tokens)
    finally:
        handle.restore()
    frame = pd.DataFrame({"group": names, "prompt": prompts, "greedy before": before[2], "greedy after": after[2],
                          f"P({new}) before": before[0], f"P({new}) after": after[0],
                          f"P({true}) before": before[1], f"P({true}) after": after[1]})
    return frame, handle


def standard_editors(model, tokenizer, name: str = "atlas") -> tuple[dict, dict, list[str]]:
    """The editors of the comparison table, {method: editor(model, tokenizer, request) -> handle, or None
    for the unedited model}, their settings, and notes (e.g. a method left out). ROME's C and random
    prefixes are computed once here and shared by all its edits."""
    from dataclasses import asdict

    from .finetune import FTHparams, fine_tune
    from .rome import RomeHparams, edit, sample_prefixes
    from .stats import second_moment

    rome_hp = RomeHparams.for_model(name)
    mom2 = second_moment(model, tokenizer, rome_hp.layer, corpus=rome_hp.mom2_corpus, n_samples=rome_hp.mom2_n_samples)
    prefixes = sample_prefixes(model, tokenizer, rome_hp.prefixes, seed=rome_hp.seed)
    ft, ftl = FTHparams.for_model(name), FTHparams.for_model(name, constrained=True)
    editors = {
        "unedited": None,
        "FT": lambda m, t, r: fine_tune(m, t, r, ft),
        "FT+L": lambda m, t, r: fine_tune(m, t, r, ftl),
    }
    settings = {"FT": asdict(ft), "FT+L": asdict(ftl)}
    notes = []
    try:
        from .neurons import NoKnowledgeNeuronsError, kn_edit

        def kn_or_unedited(m, t, r):
            try:
                return kn_edit(m, t, r)
            except NoKnowledgeNeuronsError:  # the rule has nothing to change: the case is scored unedited
                return None

        editors["KN"] = kn_or_unedited
        settings["KN"] = ("kn_tutorial.neurons.kn_edit with its defaults (a case whose fact has no knowledge neuron "
                          "is scored unedited: the rule has nothing to change)")
    except ImportError as err:
        notes.append(f"KN row left out: kn_tutorial.neurons.kn_edit is not available ({err})")
    editors["ROME"] = lambda m, t, r: edit(m, t, r, rome_hp, mom2=mom2, prefixes=prefixes)
    settings["ROME"] = {**asdict(rome_hp), "prefixes_used": prefixes}
    return editors, settings, notes

"""Knowledge neurons: refinement, suppression and amplification, erasing and updating
(Dai et al., 2022, "Knowledge Neurons in Pretrained Transformers", sections 3.2-5).

Notation (the book's): a fact (s, r, o) is asked with n prompts x_1..x_n (for Atlas, the
relation's training and held-out templates filled with s). Attr_j(w_i^(l)) is the
integrated-gradients attribution of FFN neuron i of layer l on prompt x_j
(`attribution.integrated_gradients`, m = 20 steps, at the last prompt token).

Refinement (Dai et al., section 3.2; `neurons_refinement`) keeps the neurons whose attribution
is at least t = 0.2 of the prompt's largest on more than a share p of the fact's prompts: the
fact's knowledge neurons N(s, r, o), with p adapted so a fact has 2 to 5 on average.

Manipulations, each undone exactly:
  suppress / amplify   the activation w_i^(l) at the last prompt token is multiplied by
                       0 or 2 (a hook; `scaled_scores`, many rows with different neurons
                       in one batch: `neurons_engine`). Multiplying at *every* position is the same as
                       multiplying the value slot v_i (row i of V) by the factor, or, for
                       0, zeroing key row k_i and its bias (`scale_value_slots`,
                       `zero_key_rows`, weight edits returning a WeightSnapshot).
  erase a relation     zero the value slots of the relation's most common knowledge
                       neurons (Dai et al. keep the 20 most common).
  update a fact        v_i ← v_i − λ₁ e(o) + λ₂ e(o*) for each knowledge neuron i of the
                       fact (minus relation-level ones), with e the output embedding of
                       the object's first token (Dai et al.: λ₁ = 1, λ₂ = 8); `kn_edit`.
"""
from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass
from typing import Sequence

import torch

from .lazy import lazy_exports
from .models import check_layer, d_ff, key_bias, key_matrix, unembedding_matrix, value_matrix
from .neurons_engine import Neuron, _prompt_lengths, scaled_scores  # noqa: F401  (importable from here)
from .neurons_refinement import (  # noqa: F401  (the definition of knowledge neurons, importable from here)
    _EPS, P_START, P_STEP, RELATION_SHARE, TARGET_RANGE, THRESHOLD, AdaptedP, FactNeurons, adapt_p,
    attribute_fact, coarse_mask, fact_prompts, find_knowledge_neurons, layer_histogram, mean_count,
    most_common, prompt_counts, random_like, refine, relation_neurons, shared_neurons, split_neurons,
)
from .progress import progress
from .scoring import score, target_ids
from .validate import check_finite_update, check_model_finite, require_finite
from .weights import Restorable, WeightSnapshot, snapshot_layers

# Figures and the explorer live in neurons_display (it imports this module).
__getattr__ = lazy_exports(__package__, "neurons_display", ("plot_effects", "neuron_explorer"))


# --------------------------------------------------------------------------------------
# Suppress and amplify by editing weights (exact undo through WeightSnapshot)
# --------------------------------------------------------------------------------------

def _by_layer(model, neurons: Sequence[Neuron]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    width = d_ff(model)
    for layer, neuron in neurons:
        if not 0 <= int(neuron) < width:
            raise IndexError(f"neuron {neuron} out of range: layers have {width} neurons")
        out.setdefault(check_layer(model, layer), []).append(int(neuron))
    return out


@torch.no_grad()
def scale_value_slots(model, neurons: Sequence[Neuron], factor: float) -> WeightSnapshot:
    """Multiply value slots v_i (rows of V, the MLP output projection) by `factor` (0 erases,
    2 amplifies), in place. Returns the snapshot taken before: `.restore()` undoes it.
    A non-finite factor, or slots that would become non-finite, are refused before anything is written."""
    factor = require_finite("factor", factor, "0 erases the value slots, 2 amplifies them.")
    by_layer = _by_layer(model, neurons)
    for layer, idx in by_layer.items():
        rows = value_matrix(model, layer)[idx]
        check_finite_update(f"the scaled value slots of layer {layer}", rows * factor - rows, rows, model)
    snapshot = snapshot_layers(model, sorted(by_layer), which=("mlp_out",), track=True,
                               label=f"the value slots of {len(neurons)} neuron(s) scaled by {factor:g}")
    for layer, idx in by_layer.items():
        value_matrix(model, layer)[idx] *= factor  # a view: edits the parameter
    return snapshot


@torch.no_grad()
def zero_key_rows(model, neurons: Sequence[Neuron]) -> WeightSnapshot:
    """Zero key rows k_i (and b_K,i) so the neurons' activations are f(0) = 0 everywhere
    (GELU, and Llama's act(g)·(x k_i) whose up projection is zeroed). Returns the snapshot."""
    by_layer = _by_layer(model, neurons)
    snapshot = snapshot_layers(model, sorted(by_layer), which=("mlp_in",), track=True,
                               label=f"the key rows of {len(neurons)} neuron(s) zeroed")
    for layer, idx in by_layer.items():
        key_matrix(model, layer)[idx] = 0.0
        bias = key_bias(model, layer)
        if bias is not None:
            bias[idx] = 0.0
    return snapshot


# --------------------------------------------------------------------------------------
# Dai et al.'s experiment: suppress / amplify, with a random control
# --------------------------------------------------------------------------------------

GROUPS = ("this fact", "same relation", "other relations")


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% confidence interval."""
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    m = sum(values) / n
    if n == 1:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, z * sd / math.sqrt(n)


def probe_prompts(fact: FactNeurons, pool: Sequence, n_same: int = 5, n_other: int = 5,
                  seed: int = 0) -> list[tuple[str, str, str]]:
    """(group, prompt, target) rows for one fact: all its own prompts; one random prompt of
    each of n_same other facts of its relation and n_other facts of other relations, drawn
    from `pool` (Atlas Facts) with a seed."""
    from .atlas.templates import TEMPLATES, fill

    rng = random.Random(f"{seed}:{fact.subject}:{fact.relation}")
    rows = [("this fact", p, " " + fact.object) for p in fact.prompts]
    same = [f for f in pool if f.relation == fact.relation and f.subject != fact.subject]
    other = [f for f in pool if f.relation != fact.relation]
    for group, chosen in (("same relation", rng.sample(same, min(n_same, len(same)))),
                          ("other relations", rng.sample(other, min(n_other, len(other))))):
        for f in chosen:
            t = TEMPLATES[f.relation]
            rows.append((group, fill(rng.choice((*t.train, *t.heldout)), f.subject, f.subject_kind), " " + f.object))
    return rows


def suppress_amplify(model, tokenizer, found: Sequence[FactNeurons], pool: Sequence, factors=(0.0, 2.0),
                     n_same: int = 5, n_other: int = 5, seed: int = 0, relation_level=None,
                     show_progress: bool = False) -> list[dict]:
    """For every fact: multiply its knowledge neurons (and, as the control, as many random
    neurons from the same layers) by each factor at the last prompt token, and measure the
    change of the correct object's probability on its own prompts, on facts of the same
    relation and on facts of other relations. One batch per fact.

    relation_level: if given (from `relation_neurons`), also the fact-specific neurons
    alone ("fact-specific", with their own random control).
    Returns one record per (fact, neuron set, factor, group): mean over the group's prompts
    of the relative change (P' − P)/P, of ΔP and of Δlog P, and the mean clean P.
    """
    records = []
    width = d_ff(model)
    for index, fact in enumerate(progress(list(found), desc="suppress/amplify", disable=not show_progress)):
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{fact.subject}:{fact.relation}".encode()))
        sets = {"knowledge": fact.neurons}
        if relation_level is not None:
            sets["fact-specific"] = split_neurons(fact, relation_level)[0]
        sets = {**sets, **{f"random ({name})": random_like(neurons, width, generator, exclude=fact.neurons)
                           for name, neurons in sets.items()}}
        sets = {k: v for k, v in sets.items() if v}
        rows = probe_prompts(fact, pool, n_same, n_other, seed)
        conditions = [(None, 1.0)] + [(name, f) for name in sets for f in factors]
        prompts = [p for _ in conditions for _, p, _ in rows]
        targets = [t for _ in conditions for _, _, t in rows]
        neurons = [sets[name] if name else [] for name, _ in conditions for _ in rows]
        facs = [f for _, f in conditions for _ in rows]
        logp = scaled_scores(model, tokenizer, prompts, targets, neurons, facs)["logprob"].double()
        logp = logp.view(len(conditions), len(rows))  # [conditions, rows]
        clean = logp[0]
        for c, (name, factor) in enumerate(conditions[1:], start=1):
            for group in GROUPS:
                cols = [j for j, row in enumerate(rows) if row[0] == group]
                if not cols:
                    continue
                before, after = clean[cols].exp(), logp[c, cols].exp()
                records.append({
                    "fact": index, "subject": fact.subject, "relation": fact.relation, "neurons": name,
                    "factor": factor, "group": group, "n_neurons": len(sets[name]),
                    "rel_change": float(((after - before) / before).mean()),
                    "dp": float((after - before).mean()), "dlogp": float((logp[c, cols] - clean[cols]).mean()),
                    "p_clean": float(before.mean()),
                })
    return records


def summarize_effects(records: Sequence[dict], metric: str = "rel_change") -> list[dict]:
    """Mean and 95% CI over facts of `metric` per (neuron set, factor, group)."""
    keys = sorted({(r["neurons"], r["factor"], r["group"]) for r in records},
                  key=lambda k: (k[0], k[1], GROUPS.index(k[2])))
    out = []
    for name, factor, group in keys:
        values = [r[metric] for r in records if (r["neurons"], r["factor"], r["group"]) == (name, factor, group)]
        m, ci = mean_ci(values)
        out.append({"neurons": name, "factor": factor, "group": group, "metric": metric, "mean": m,
                    "ci95": ci, "n": len(values)})
    return out


# --------------------------------------------------------------------------------------
# Erasing a relation
# --------------------------------------------------------------------------------------

def erase_relation(model, tokenizer, found: Sequence[FactNeurons], relation: str, eval_facts: Sequence,
                   k: int = 20, seed: int = 0) -> list[dict]:
    """Zero the value slots of the k most common knowledge neurons of `relation` (and, as
    the control, of as many random neurons from the same layers) and score every fact in
    `eval_facts` on its first training template before and after. Weights are restored
    after each edit. Returns one record per (neuron set, evaluated relation)."""
    from .atlas.templates import TEMPLATES, fill

    neurons = [n for n, _ in most_common(found, relation, k)]
    generator = torch.Generator().manual_seed(seed)
    sets = {"knowledge": neurons, "random": random_like(neurons, d_ff(model), generator)}
    prompts = [fill(TEMPLATES[f.relation].train[0], f.subject, f.subject_kind) for f in eval_facts]
    targets = [" " + f.object for f in eval_facts]
    before = score(model, tokenizer, prompts, targets)
    records = []
    for name, chosen in sets.items():
        with scale_value_slots(model, chosen, 0.0):
            after = score(model, tokenizer, prompts, targets)
        for rel in sorted({f.relation for f in eval_facts}):
            idx = [i for i, f in enumerate(eval_facts) if f.relation == rel]
            records.append({
                "erased": relation, "neurons": name, "n_neurons": len(chosen), "relation": rel, "n_facts": len(idx),
                "acc_before": float(before["all_correct"][idx].float().mean()),
                "acc_after": float(after["all_correct"][idx].float().mean()),
                "p_before": float(before["logprob"][idx].exp().mean()),
                "p_after": float(after["logprob"][idx].exp().mean()),
                "dlogp": float((after["logprob"][idx] - before["logprob"][idx]).mean()),
            })
    return records


# --------------------------------------------------------------------------------------
# Updating a fact (the interface the ROME chapter compares against)
# --------------------------------------------------------------------------------------

class NoKnowledgeNeuronsError(ValueError):
    """`kn_edit` has no value slot to change: Dai et al.'s rule would leave the model as it is."""


@dataclass
class KnEdit(Restorable):
    """What `kn_edit` changed, and the means to take it back exactly."""

    request: dict
    neurons: list[Neuron]  # the value slots changed
    old_token: int  # first token of the old object (its embedding is subtracted)
    new_token: int  # first token of the new object (its embedding is added)
    lambda_old: float
    lambda_new: float
    snapshot: WeightSnapshot


def request_prompts(request: dict) -> list[str]:
    """The prompts refinement uses for a CounterFact-style request: the Atlas templates of its
    relation when `relation_id` names an Atlas relation, else the rewrite prompt alone."""
    from .atlas.templates import TEMPLATES

    rel = request.get("relation_id")
    prompt, subject = request["prompt"], request["subject"]
    if rel in TEMPLATES:
        t = TEMPLATES[rel]
        kind = request.get("subject_kind", "city" if rel == "country" else "country")
        return [x.replace("{kind}", kind).replace("{}", subject) for x in (*t.train, *t.heldout)]
    return [prompt.replace("{}", subject)]


def request_neurons(model, tokenizer, request: dict, prompts: Sequence[str] | None = None, p: float | None = None,
                    threshold: float = THRESHOLD, steps: int = 20, exclude: Sequence[Neuron] = ()) -> list[Neuron]:
    """Knowledge neurons of the request's true fact (target_true, or the model's own greedy
    first token when absent): refinement over `prompts`; p=None adapts p on this one fact;
    `exclude` (e.g. the relation-level neurons) is dropped."""
    prompts = list(prompts) if prompts is not None else request_prompts(request)
    old = _old_target(model, tokenizer, request)
    counts = attribute_fact(model, tokenizer, prompts, old, steps, threshold)
    if p is None:
        p = adapt_p([counts], [len(prompts)]).p
    banned = set(map(tuple, exclude))
    return [n for n in shared_neurons(counts, len(prompts), p) if n not in banned]


def _old_target(model, tokenizer, request: dict) -> str:
    true = request.get("target_true", {}).get("str") if isinstance(request.get("target_true"), dict) else None
    if true:
        return " " + true.lstrip()
    from .scoring import next_token_probs

    token = int(next_token_probs(model, tokenizer, [request["prompt"].replace("{}", request["subject"])])[0].argmax())
    return tokenizer.decode([token])


@torch.no_grad()
def kn_edit(model, tokenizer, request: dict, neurons: Sequence[Neuron] | None = None, lambda_old: float = 1.0,
            lambda_new: float = 8.0, prompts: Sequence[str] | None = None, p: float | None = None,
            threshold: float = THRESHOLD, steps: int = 20, exclude: Sequence[Neuron] = ()) -> KnEdit:
    """Update a fact through its knowledge neurons (Dai et al., section 5.1):

        v_i ← v_i − λ_old · e(o) + λ_new · e(o*)    for every knowledge neuron i

    request: CounterFact style, {"prompt": "{} lies on the continent of", "subject": "Kuwait",
        "target_new": {"str": "Europe"}, "target_true": {"str": "Asia"} (optional),
        "relation_id": ... (optional; Atlas relations give the fact's n prompts)}.
    neurons: the value slots to change; None finds them (`request_neurons`, with p, threshold,
        steps, prompts and exclude). No neuron, given or found, raises NoKnowledgeNeuronsError
        (the rule would change nothing) and leaves the weights untouched.
    e(o): row of the output embedding (unembedding) matrix for the object's first token with
        its leading space (tied to the input embedding in GPT-2 and Atlas).
    Returns a KnEdit; `with kn_edit(...) as e:` or `e.restore()` puts the weights back bit for bit.
    """
    from .rome import prepare_request
    from .tokens import subject_span

    prompt, subject, target_new = prepare_request(request)  # the same checks as rome.edit
    subject_span(tokenizer, prompt.replace("{}", subject), subject)  # subject must tokenise inside the prompt
    lambda_old = require_finite("lambda_old", lambda_old, "Dai et al. use λ1 = 1.")
    lambda_new = require_finite("lambda_new", lambda_new, "Dai et al. use λ2 = 8.")
    check_model_finite(model, "kn_edit")
    request = {**request, "prompt": prompt, "subject": subject}  # the prompt as a template with '{}'
    old = _old_target(model, tokenizer, request)
    found = neurons is None
    if found:
        with torch.enable_grad():
            neurons = request_neurons(model, tokenizer, request, prompts, p, threshold, steps, exclude)
    neurons = [(check_layer(model, layer), int(i)) for layer, i in neurons]
    if not neurons:
        if found:
            how = (f"p {'adapted on this fact' if p is None else f'= {p}'}, threshold = {threshold}, "
                   f"{len(prompts) if prompts is not None else len(request_prompts(request))} prompts"
                   + (f", {len(exclude)} neurons excluded" if len(exclude) else ""))
            raise NoKnowledgeNeuronsError(
                f"kn_edit found no knowledge neuron for {subject!r} ({old.strip()!r}; {how}), so the edit would change "
                "nothing. Lower threshold or p, give more prompts, or pass neurons= yourself; nothing was written.")
        raise NoKnowledgeNeuronsError(
            f"kn_edit got an empty neuron list for {subject!r}, so the edit would change nothing. Pass the fact's "
            "knowledge neurons (FactNeurons.neurons from find_knowledge_neurons), or neurons=None to find them "
            "with integrated gradients; nothing was written.")
    old_token, new_token = target_ids(tokenizer, old)[0], target_ids(tokenizer, target_new)[0]
    embed = unembedding_matrix(model)  # [vocab, d_model]
    delta = (lambda_new * embed[new_token].float() - lambda_old * embed[old_token].float())  # [d_model]
    by_layer = _by_layer(model, neurons)
    for layer, idx in by_layer.items():
        values = value_matrix(model, layer)
        check_finite_update(f"the KN update of layer {layer}'s value slots",
                            delta.to(values.dtype).expand(len(idx), -1), values[idx], model,
                            e_old=embed[old_token], e_new=embed[new_token])
    snapshot = snapshot_layers(model, sorted(by_layer), which=("mlp_out",), track=True,
                               label=f"the KN edit of {subject!r}")
    for layer, idx in by_layer.items():
        values = value_matrix(model, layer)  # [d_ff, d_model], a view of the weight
        values[idx] += delta.to(values.dtype)
    return KnEdit(dict(request), neurons, old_token, new_token, lambda_old, lambda_new, snapshot)


# --------------------------------------------------------------------------------------
# One fact's neurons one at a time (what the explorer shows)
# --------------------------------------------------------------------------------------

def single_neuron_effects(model, tokenizer, fact: FactNeurons, prompt_index: int = 0, factors=(0.0, 2.0)) -> dict:
    """P(correct) on one prompt of the fact with each knowledge neuron alone, and all of them,
    multiplied by each factor (one batch): {factor: [P per neuron..., P all]}, plus "clean"."""
    prompt, target = fact.prompts[prompt_index], " " + fact.object
    sets = [[n] for n in fact.neurons] + [list(fact.neurons)]
    rows = [(s, f) for f in factors for s in sets]
    out = scaled_scores(model, tokenizer, [prompt] * (len(rows) + 1), [target] * (len(rows) + 1),
                        [[]] + [s for s, _ in rows], [1.0] + [f for _, f in rows])["logprob"].exp()
    result = {"clean": float(out[0])}
    for j, f in enumerate(factors):
        result[f] = out[1 + j * len(sets): 1 + (j + 1) * len(sets)].tolist()
    return result


# --------------------------------------------------------------------------------------
# Saving refinement results (the chapter loads the 200-fact study from a JSON file)
# --------------------------------------------------------------------------------------

def found_to_json(found: Sequence[FactNeurons]) -> list[dict]:
    """Per fact: subject, relation, object, prompts, p, knowledge neurons, and the sparse
    prompt counts [[layer, neuron, count], ...] (enough to refine again at any p)."""
    out = []
    for f in found:
        idx = f.counts.nonzero().tolist()
        out.append({"subject": f.subject, "relation": f.relation, "object": f.object, "prompts": list(f.prompts),
                    "p": f.p, "neurons": [list(n) for n in f.neurons], "shape": list(f.counts.shape),
                    "counts": [[l, i, int(f.counts[l, i])] for l, i in idx]})
    return out


def found_from_json(items: Sequence[dict]) -> list[FactNeurons]:
    """The inverse of `found_to_json`."""
    found = []
    for item in items:
        counts = torch.zeros(item["shape"], dtype=torch.long)
        for layer, neuron, count in item["counts"]:
            counts[layer, neuron] = count
        f = FactNeurons(item["subject"], item["relation"], item["object"], list(item["prompts"]), counts)
        f.p, f.neurons = item["p"], [tuple(n) for n in item["neurons"]]
        found.append(f)
    return found

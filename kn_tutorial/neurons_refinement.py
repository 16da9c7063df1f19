"""Refinement: the knowledge neurons of a fact (Dai et al., 2022, "Knowledge Neurons in
Pretrained Transformers", section 3.2). Every name here is re-exported by `neurons`.

For a fact asked with n prompts, with Attr_j(w_i^(l)) the attribution of neuron i of layer l
on prompt x_j (`attribution.integrated_gradients`):
  1. per prompt, keep the neurons with Attr_j(w_i^(l)) > t · max_{l', i'} Attr_j(w_i'^(l')),
     t = 0.2 ("coarse" neurons; none when the largest attribution is not positive);
  2. keep the neurons kept for more than a fraction p of the fact's n prompts:
     count_i^(l) > p · n. These are the fact's knowledge neurons N(s, r, o);
  3. p starts at 0.7 and moves by 0.05 (up when the mean |N| over the analysed facts is
     above 5, down when it is below 2) until the mean lies in [2, 5] (`adapt_p`).
A neuron that is a knowledge neuron of many facts of one relation (at least a share
`RELATION_SHARE` = 10% of them; Dai et al. drop such neurons before updating a fact)
expresses the relation, not the fact: `relation_neurons` separates the two kinds.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from .attribution import integrated_gradients
from .neurons_engine import Neuron
from .progress import progress

THRESHOLD = 0.2  # t: fraction of the prompt's largest attribution
P_START, P_STEP = 0.7, 0.05  # p: the share of prompts, and how it moves
TARGET_RANGE = (2.0, 5.0)  # the mean number of knowledge neurons per fact p aims at
RELATION_SHARE = 0.1  # a knowledge neuron of >= 10% of a relation's facts is relation-level
_EPS = 1e-9


# --------------------------------------------------------------------------------------
# Prompts of a fact
# --------------------------------------------------------------------------------------

def fact_prompts(fact, heldout: bool = True) -> list[str]:
    """The n diverse prompts of an Atlas fact: its relation's training templates, then the
    held-out paraphrases (heldout=True), each filled with the subject."""
    from .atlas.templates import TEMPLATES, fill

    templates = TEMPLATES[fact.relation]
    chosen = (*templates.train, *templates.heldout) if heldout else templates.train
    return [fill(t, fact.subject, fact.subject_kind) for t in chosen]


# --------------------------------------------------------------------------------------
# Refinement
# --------------------------------------------------------------------------------------

def coarse_mask(attributions: Tensor, threshold: float = THRESHOLD, min_layer: int = 0) -> Tensor:
    """Per prompt, the neurons above t · that prompt's largest attribution.

    attributions: [n, L, d_ff] (n prompts of one fact) -> bool [n, L, d_ff]. A prompt whose
    largest attribution is not positive keeps no neuron. min_layer > 0 considers only layers
    min_layer.. (the maximum is taken over them; lower layers keep nothing)."""
    if attributions.dim() != 3:
        raise ValueError(f"attributions must be [n_prompts, L, d_ff], got shape {tuple(attributions.shape)}")
    if not 0 <= min_layer < attributions.shape[1]:
        raise ValueError(f"min_layer {min_layer} is not a layer of attributions with {attributions.shape[1]} layers")
    considered = attributions[:, min_layer:]  # [n, L - min_layer, d_ff]
    top = considered.flatten(1).max(dim=1).values  # [n]
    keep = torch.zeros_like(attributions, dtype=torch.bool)
    keep[:, min_layer:] = (considered > threshold * top[:, None, None]) & (top > 0)[:, None, None]
    return keep


def prompt_counts(attributions: Tensor, threshold: float = THRESHOLD, min_layer: int = 0) -> Tensor:
    """For how many of the fact's n prompts each neuron is a coarse neuron: int [L, d_ff]."""
    return coarse_mask(attributions, threshold, min_layer).sum(dim=0)


def shared_neurons(counts: Tensor, n_prompts: int, p: float) -> list[Neuron]:
    """Neurons kept for more than a fraction p of the n prompts (count > p·n), as
    (layer, neuron) pairs, most shared first (ties: lower layer, lower index)."""
    keep = counts.double() > p * n_prompts + _EPS
    idx = keep.nonzero().tolist()  # [[layer, neuron], ...] in (layer, neuron) order
    idx.sort(key=lambda ln: -int(counts[ln[0], ln[1]]))  # stable: ties keep (layer, neuron) order
    return [(int(layer), int(neuron)) for layer, neuron in idx]


def refine(attributions: Tensor, threshold: float = THRESHOLD, p: float = P_START) -> list[Neuron]:
    """Dai et al.'s refinement of one fact: [n, L, d_ff] attributions -> knowledge neurons."""
    return shared_neurons(prompt_counts(attributions, threshold), attributions.shape[0], p)


@dataclass
class AdaptedP:
    """The p reached by `adapt_p`, the mean count there, and every p tried on the way."""

    p: float
    mean_count: float
    converged: bool  # False when no p on the 0.05 grid puts the mean inside the range
    history: list[tuple[float, float]]  # (p, mean number of knowledge neurons per fact)


def mean_count(counts: Sequence[Tensor], n_prompts: Sequence[int], p: float) -> float:
    """Mean number of knowledge neurons per fact at p."""
    return sum(int((c.double() > p * n + _EPS).sum()) for c, n in zip(counts, n_prompts)) / len(counts)


def adapt_p(counts: Sequence[Tensor], n_prompts: Sequence[int], start: float = P_START, step: float = P_STEP,
            target: tuple[float, float] = TARGET_RANGE) -> AdaptedP:
    """Move p from `start` by `step` until the mean number of knowledge neurons per fact
    (over all the facts given) lies in `target` (inclusive).

    Above the range p goes up (fewer neurons), below it p goes down. The walk stops inside
    the range, or when p would leave [0, 1], or when it would revisit a p (the mean jumped
    over the range between two neighbouring p); then `converged` is False and p is the one
    tried whose mean was closest to the range.
    """
    if not counts or len(counts) != len(n_prompts):
        raise ValueError(f"need one count tensor per fact and its number of prompts; got {len(counts)} "
                         f"and {len(n_prompts)}")
    low, high = target
    history: list[tuple[float, float]] = []
    k = 0
    while True:
        p = round(start + k * step, 10)
        mean = mean_count(counts, n_prompts, p)
        history.append((p, mean))
        if low <= mean <= high:
            return AdaptedP(p, mean, True, history)
        k_next = k + (1 if mean > high else -1)
        p_next = round(start + k_next * step, 10)
        if not 0.0 <= p_next < 1.0 or any(abs(p_next - q) < _EPS for q, _ in history):
            def distance(entry):
                return max(low - entry[1], entry[1] - high, 0.0)
            best = min(history, key=distance)
            return AdaptedP(best[0], best[1], False, history)
        k = k_next


@dataclass
class FactNeurons:
    """What refinement found for one fact: prompt counts and its knowledge neurons at p."""

    subject: str
    relation: str
    object: str
    prompts: list[str]
    counts: Tensor  # int [L, d_ff]: for how many prompts each neuron is a coarse neuron
    p: float = P_START
    neurons: list[Neuron] = field(default_factory=list)

    @property
    def n_prompts(self) -> int:
        return len(self.prompts)

    def at(self, p: float) -> list[Neuron]:
        return shared_neurons(self.counts, self.n_prompts, p)

    def set_p(self, p: float) -> "FactNeurons":
        self.p, self.neurons = p, self.at(p)
        return self


def attribute_fact(model, tokenizer, prompts: Sequence[str], target: str, steps: int = 20,
                   threshold: float = THRESHOLD, min_layer: int = 0) -> Tensor:
    """Integrated gradients of every prompt of one fact, reduced to prompt counts [L, d_ff]."""
    attributions = integrated_gradients(model, tokenizer, list(prompts), target, steps=steps)  # [n, L, d_ff]
    return prompt_counts(attributions, threshold, min_layer)


def find_knowledge_neurons(model, tokenizer, facts, steps: int = 20, threshold: float = THRESHOLD,
                           start: float = P_START, min_layer: int = 0,
                           show_progress: bool = False) -> tuple[list[FactNeurons], AdaptedP]:
    """Refinement over a set of Atlas facts with the adaptive p: (per-fact results, the p reached).
    min_layer > 0 refines within layers min_layer.. only (see `coarse_mask`)."""
    found = []
    for fact in progress(list(facts), desc="knowledge neurons", disable=not show_progress):
        prompts = fact_prompts(fact)
        counts = attribute_fact(model, tokenizer, prompts, " " + fact.object, steps, threshold, min_layer)
        found.append(FactNeurons(fact.subject, fact.relation, fact.object, prompts, counts))
    adapted = adapt_p([f.counts for f in found], [f.n_prompts for f in found], start=start)
    for f in found:
        f.set_p(adapted.p)
    return found, adapted


def relation_neurons(found: Sequence[FactNeurons], min_share: float = RELATION_SHARE) -> dict[str, dict[Neuron, float]]:
    """Per relation, the knowledge neurons shared by at least `min_share` of its analysed
    facts, with that share, most shared first."""
    out: dict[str, dict[Neuron, float]] = {}
    for relation in sorted({f.relation for f in found}):
        facts = [f for f in found if f.relation == relation]
        tally = Counter(n for f in facts for n in set(f.neurons))
        out[relation] = {n: c / len(facts) for n, c in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))
                         if c / len(facts) >= min_share - _EPS}
    return out


def split_neurons(fact: FactNeurons, relation_level: dict[str, dict[Neuron, float]]) -> tuple[list[Neuron], list[Neuron]]:
    """(fact-specific, relation-level) knowledge neurons of a fact."""
    shared = relation_level.get(fact.relation, {})
    return [n for n in fact.neurons if n not in shared], [n for n in fact.neurons if n in shared]


def most_common(found: Sequence[FactNeurons], relation: str, k: int = 20) -> list[tuple[Neuron, int]]:
    """The k knowledge neurons shared by the most facts of `relation`, with their counts."""
    tally = Counter(n for f in found if f.relation == relation for n in set(f.neurons))
    return sorted(tally.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


def random_like(neurons: Sequence[Neuron], width: int, generator: torch.Generator,
                exclude: Sequence[Neuron] = ()) -> list[Neuron]:
    """As many random neurons as `neurons` has in each layer, from the same layers, none of
    them in `neurons` or `exclude` (the control of every experiment here)."""
    banned = set(map(tuple, neurons)) | set(map(tuple, exclude))
    per_layer = Counter(layer for layer, _ in neurons)
    out = []
    for layer in sorted(per_layer):
        allowed = torch.tensor([i for i in range(width) if (layer, i) not in banned])
        pick = allowed[torch.randperm(len(allowed), generator=generator)[:per_layer[layer]]]
        out += [(layer, int(i)) for i in sorted(pick.tolist())]
    return out


def layer_histogram(neuron_lists: Sequence[Sequence[Neuron]], n_layer: int) -> list[int]:
    """How many of the listed neurons sit in each layer: [n_layer] counts."""
    counts = [0] * n_layer
    for neurons in neuron_lists:
        for layer, _ in neurons:
            counts[layer] += 1
    return counts

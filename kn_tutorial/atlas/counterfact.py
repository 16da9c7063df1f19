"""Atlas-CounterFact: a counterfactual editing benchmark in CounterFact's schema (Meng et al., 2022).

One case per fact that has neighbours (other subjects with the same relation and the same
true object). Each case asks to rewrite (subject, relation, true object) to a new object
of the same relation, and carries the prompts CounterFact uses to score an edit:

    {"case_id": 17,
     "requested_rewrite": {"prompt": "{} lies on the continent of", "subject": "Kuwait",
                           "relation_id": "continent",
                           "target_new": {"str": "Europe"}, "target_true": {"str": "Asia"}},
     "paraphrase_prompts": [...],    # held-out templates, never trained on
     "neighborhood_prompts": [...],  # other subjects whose true object is "Asia"
     "neighborhood_subjects": [...], # whose they are, in the same order
     "attribute_prompts": [...],     # subjects whose true object is "Europe"
     "generation_prompts": [...]}    # open-ended prompts about the subject

The same evaluation code reads this file and the real CounterFact JSON. Deterministic
under a seed.
"""
from __future__ import annotations

import random
from collections import defaultdict

from .templates import ESSENCE_PROMPT, TEMPLATES, fill
from .world import World, load_world


def build_counterfact(world: World | None = None, seed: int = 0, n_neighbours: int = 10) -> list[dict]:
    world = world or load_world()
    rng = random.Random(seed)
    by_object: dict[tuple[str, str], list] = defaultdict(list)
    for f in world.facts:
        by_object[(f.relation, f.object)].append(f)
    cases = []
    for fact in world.facts:
        t = TEMPLATES[fact.relation]
        neighbours = [f for f in by_object[(fact.relation, fact.object)] if f.subject != fact.subject]
        if not neighbours:
            continue
        new_object = rng.choice([o for o in world.objects_of(fact.relation) if o != fact.object])
        attribute = by_object[(fact.relation, new_object)]

        def prompts_for(facts, k):
            chosen = rng.sample(facts, min(k, len(facts)))
            return [fill(rng.choice(t.train), f.subject, f.subject_kind) for f in chosen], [f.subject for f in chosen]

        other_relations = [TEMPLATES[f.relation].train[0] for f in world.facts_about(fact.subject)
                           if f.relation != fact.relation]
        prompt = rng.choice(t.train)  # the random draws in this order keep the cases of earlier versions
        neighbourhood, neighbour_subjects = prompts_for(neighbours, n_neighbours)
        attribute_prompts, _ = prompts_for(attribute, n_neighbours)
        cases.append({
            "case_id": len(cases),
            "requested_rewrite": {
                "prompt": prompt,
                "subject": fact.subject,
                "relation_id": fact.relation,
                "target_new": {"str": new_object},
                "target_true": {"str": fact.object},
            },
            "paraphrase_prompts": [fill(p, fact.subject, fact.subject_kind) for p in t.heldout],
            "neighborhood_prompts": neighbourhood,
            "neighborhood_subjects": neighbour_subjects,
            "attribute_prompts": attribute_prompts,
            "generation_prompts": [fill(ESSENCE_PROMPT, fact.subject)]
            + [fill(t.isa, fact.subject, fact.subject_kind)]
            + [fill(p, fact.subject, fact.subject_kind) for p in other_relations],
        })
    return cases


def load_counterfact(seed: int = 0) -> list[dict]:
    """Atlas-CounterFact for the shipped world (built in well under a second)."""
    return build_counterfact(load_world(), seed=seed)

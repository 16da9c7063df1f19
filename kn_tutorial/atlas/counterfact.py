"""Atlas-CounterFact: a counterfactual editing benchmark in CounterFact's schema (Meng et al., 2022).

One case per fact that has neighbours (other subjects with the same relation and the same
true object). Each case asks to rewrite (subject, relation, true object) to a new object
of the same relation, and carries the prompts CounterFact uses to score an edit:

    {"case_id": 17,
     "requested_rewrite": {"prompt": "{} lies on the continent of", "subject": "Kuwait",
                           "relation_id": "continent",
                           "target_new": {"str": "Europe"}, "target_true": {"str": "Asia"}},
     "paraphrase_prompts": [...],    # never trained on (two styles, below)
     "neighborhood_prompts": [...],  # other subjects whose true object is "Asia"
     "neighborhood_subjects": [...], # whose they are, in the same order
     "attribute_prompts": [...],     # subjects whose true object is "Europe"
     "generation_prompts": [...]}    # open-ended prompts about the subject

Paraphrase prompts come in two styles (`paraphrases=`). "in_context" (the default):
CounterFact's paraphrase prompts put an unrelated generated sentence before a reworded prompt
("... . Kuwait's continent is"), so the key at the subject's last token is read in a context the
edit never saw; the four "in_context" prompts do the same with Atlas's held-out
pieces (`contexts.py`): each held-out frame after a held-out unrelated sentence ("The
library ran late last year. Kuwait's continent is"), and two training templates other than
the rewrite prompt after a held-out context ("Our guide agreed that Kuwait sits on the
continent of", "Speaking of Kuwait, the census noted that it ..."). None of these prompts
occurs in training, so PS measures generalisation, not the rewrite prompt again. "frames": only
the relation's two held-out frames, subject first ("Kuwait's continent is"), a narrower test.
Neighbourhood prompts are bare training prompts of other subjects, as in CounterFact.

The same evaluation code reads this file and the real CounterFact JSON. Deterministic
under a seed; the wording of the paraphrases has its own random stream, so the cases
(subjects, new objects, neighbours) are the same as without it.
"""
from __future__ import annotations

import random
from collections import defaultdict

from .contexts import fillers, sample_context
from .templates import ESSENCE_PROMPT, TEMPLATES, RelationTemplates, fill
from .world import World, load_world


PARAPHRASE_STYLES = ("frames", "in_context")


def build_counterfact(world: World | None = None, seed: int = 0, n_neighbours: int = 10,
                      paraphrases: str = "in_context") -> list[dict]:
    """The cases of the module docstring. `paraphrases`: "in_context", the four CounterFact-style
    prompts with words before the subject (`paraphrase_prompts`; the book's studies are scored on
    these), or "frames", the relation's two held-out frames with the subject first."""
    if paraphrases not in PARAPHRASE_STYLES:
        raise ValueError(f"unknown paraphrases={paraphrases!r}: use one of {PARAPHRASE_STYLES}")
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
            "paraphrase_prompts": paraphrase_prompts(t, prompt, fact.subject, fact.subject_kind,
                                                     random.Random(f"{seed}/paraphrase/{len(cases)}"))
            if paraphrases == "in_context" else [fill(p, fact.subject, fact.subject_kind) for p in t.heldout],
            "neighborhood_prompts": neighbourhood,
            "neighborhood_subjects": neighbour_subjects,
            "attribute_prompts": attribute_prompts,
            "generation_prompts": [fill(ESSENCE_PROMPT, fact.subject)]
            + [fill(t.isa, fact.subject, fact.subject_kind)]
            + [fill(p, fact.subject, fact.subject_kind) for p in other_relations],
        })
    return cases


def paraphrase_prompts(t: RelationTemplates, rewrite_prompt: str, subject: str, kind: str,
                       rng: random.Random) -> list[str]:
    """Four prompts no training text contains: each held-out frame after a held-out unrelated
    sentence, then two other training templates after held-out contexts (see the module docstring)."""
    held_fillers = fillers(heldout=True)
    prompts = [f"{rng.choice(held_fillers)} {frame}" for frame in t.heldout]
    others = [x for x in t.train if x != rewrite_prompt]
    for template in rng.sample(others, 2):
        ctx = sample_context(rng, heldout=True)
        prompts.append(ctx.apply(rng.choice(t.followup) if ctx.pronoun else template))
    return [fill(p, subject, kind) for p in prompts]


def load_counterfact(seed: int = 0, paraphrases: str = "in_context") -> list[dict]:
    """Atlas-CounterFact for the shipped world (built in well under a second); `paraphrases` as in
    `build_counterfact`."""
    return build_counterfact(load_world(), seed=seed, paraphrases=paraphrases)

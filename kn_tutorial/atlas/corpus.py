"""The Atlas training corpus: sentences built from the world's facts and templates.

A training sequence is `<|endoftext|>` followed by 1-3 fact sentences, e.g.

    <|endoftext|>Osaka lies in the country of Japan. Kuwait's capital is Kuwait City.

so the model learns to answer after arbitrary prefixes, as GPT-2 does after the random
prefixes ROME adds to its prompts. Most follow-up sentences continue about the same
subject by pronoun ("Its capital is ..."), which rewards looking a subject's attributes up
once, at the subject. Only `train` and `followup` templates (and the is-a sentence) are
used; held-out paraphrases never are.
"""
from __future__ import annotations

import random
from collections import defaultdict

from .templates import TEMPLATES, fill
from .world import Fact, World

EOT = "<|endoftext|>"


def sentence(fact: Fact, template: str) -> str:
    """'Kuwait lies on the continent of Asia.'"""
    return f"{fill(template, fact.subject, fact.subject_kind)} {fact.object}."


def training_templates(fact: Fact) -> list[str]:
    return TEMPLATES[fact.relation].all_train(fact.subject_kind)


def heldout_templates(fact: Fact) -> list[str]:
    return list(TEMPLATES[fact.relation].heldout)


def followup_sentence(fact: Fact, template: str) -> str:
    """'Its capital is Kuwait City.' (the subject was named a sentence before)"""
    return f"{template} {fact.object}."


def all_training_sentences(world: World) -> list[str]:
    """Every sentence a training sequence can contain, once: the text the tokenizer is trained on."""
    return [sentence(f, t) for f in world.facts for t in training_templates(f)] + [
        followup_sentence(f, t) for f in world.facts for t in TEMPLATES[f.relation].followup
    ]


class SequenceSampler:
    """Draws training sequences (as text) deterministically from a seed."""

    def __init__(self, world: World, seed: int = 0, max_facts: int = 3, same_subject: float = 0.6):
        self.world = world
        self.rng = random.Random(seed)
        self.max_facts = max_facts
        self.same_subject = same_subject
        self.by_subject: dict[str, list[Fact]] = defaultdict(list)
        for f in world.facts:
            self.by_subject[f.subject].append(f)

    def sentences(self) -> list[str]:
        """1-max_facts sentences; a follow-up continues about the same subject by pronoun."""
        rng = self.rng
        fact = rng.choice(self.world.facts)
        told = [fact]
        out = [sentence(fact, rng.choice(training_templates(fact)))]
        for _ in range(rng.randint(1, self.max_facts) - 1):
            siblings = [f for f in self.by_subject[fact.subject] if f not in told]
            if siblings and rng.random() < self.same_subject:
                fact = rng.choice(siblings)
                out.append(followup_sentence(fact, rng.choice(TEMPLATES[fact.relation].followup)))
            else:
                fact = rng.choice(self.world.facts)
                out.append(sentence(fact, rng.choice(training_templates(fact))))
            told.append(fact)
        return out

    def text(self) -> str:
        return EOT + " ".join(self.sentences())

"""The Atlas training corpus: sentences built from the world's facts and templates.

A training sequence is `<|endoftext|>` followed by 1-3 fact sentences, e.g.

    <|endoftext|>Osaka lies in the country of Japan. Kuwait's capital is Kuwait City.

so the model learns to answer after arbitrary prefixes, as GPT-2 does after the random
prefixes ROME adds to its prompts. Most follow-up sentences continue about the same
subject by pronoun ("Its capital is ..."), which rewards looking a subject's attributes up
once, at the subject. Only `train` and `followup` templates (and the is-a sentence) are
used; held-out paraphrases never are.

Options of issue 16 (Atlas v3), all off by default, so that the default sampler draws exactly
the sequences it always did (an option at 0 draws no random number):
- `context`: the share of fact sentences with words before the subject (`contexts.py`),
  from many compositional contexts (`context_style="compositional"`) or twelve fixed ones
  ("fixed"); held-out contexts are never drawn here;
- `preceding`: the share of sequences that open with an unrelated sentence ("The market
  was busy that morning.");
- `lists`: the share of sequences that open with a list of three subjects ("The list names
  Osaka, Lyon and Quito."), the first fact being about one of them;
- `multi`: the share of further facts joined into the same sentence (", and ...");
- `compose`: the share of further facts about the previous fact's object when that object
  is itself a subject (the subject in the object position of another fact; for a city's
  country this is the city -> country -> continent chain).
"""
from __future__ import annotations

import random
from collections import defaultdict

from .contexts import all_context_texts, fillers, sample_context
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
    """Draws training sequences (as text) deterministically from a seed (options: module docstring)."""

    def __init__(self, world: World, seed: int = 0, max_facts: int = 3, same_subject: float = 0.6,
                 context: float = 0.0, context_style: str = "compositional", preceding: float = 0.0,
                 lists: float = 0.0, multi: float = 0.0, compose: float = 0.0):
        for name, value in (("same_subject", same_subject), ("context", context), ("preceding", preceding),
                            ("lists", lists), ("multi", multi), ("compose", compose)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is a share of sentences: give a number in [0, 1]")
        if context_style not in ("compositional", "fixed"):
            raise ValueError(f"unknown context_style {context_style!r}: use 'compositional' or 'fixed'")
        self.world = world
        self.rng = random.Random(seed)
        self.max_facts = max_facts
        self.same_subject = same_subject
        self.context, self.context_style = context, context_style
        self.preceding, self.lists, self.multi, self.compose = preceding, lists, multi, compose
        self.by_subject: dict[str, list[Fact]] = defaultdict(list)
        for f in world.facts:
            self.by_subject[f.subject].append(f)
        self._fillers = fillers()

    def _stated(self, fact: Fact) -> str:
        """A fact sentence with a training template, with words before the subject (share `context`)."""
        rng = self.rng
        self._lower_ok = False  # a subject-first sentence keeps its capital inside ", and ..."
        if self.context > 0 and rng.random() < self.context:
            ctx = sample_context(rng, self.context_style)
            self._lower_ok = True
            template = rng.choice(TEMPLATES[fact.relation].followup if ctx.pronoun else training_templates(fact))
            return f"{fill(ctx.apply(template), fact.subject, fact.subject_kind)} {fact.object}."
        return sentence(fact, rng.choice(training_templates(fact)))

    def _next_fact(self, fact: Fact, told: list[Fact]) -> tuple[Fact, bool]:
        """The next fact and whether it is told by pronoun (same subject)."""
        rng = self.rng
        if self.compose > 0 and fact.object in self.by_subject and rng.random() < self.compose:
            return rng.choice(self.by_subject[fact.object]), False
        siblings = [f for f in self.by_subject[fact.subject] if f not in told]
        if siblings and rng.random() < self.same_subject:
            return rng.choice(siblings), True
        return rng.choice(self.world.facts), False

    def sentences(self) -> list[str]:
        """1-max_facts sentences; a follow-up continues about the same subject by pronoun."""
        rng = self.rng
        opening = []
        if self.preceding > 0 and rng.random() < self.preceding:
            opening.append(rng.choice(self._fillers))
        if self.lists > 0 and rng.random() < self.lists:
            fact = rng.choice(self.world.facts)
            names = [fact.subject] + [rng.choice(self.world.facts).subject for _ in range(2)]
            rng.shuffle(names)
            opening.append(f"The list names {names[0]}, {names[1]} and {names[2]}.")
        else:
            fact = rng.choice(self.world.facts)
        told = [fact]
        out = [self._stated(fact)]
        for _ in range(rng.randint(1, self.max_facts) - 1):
            fact, by_pronoun = self._next_fact(fact, told)
            if by_pronoun:
                text = followup_sentence(fact, rng.choice(TEMPLATES[fact.relation].followup))
                self._lower_ok = True
            else:
                text = self._stated(fact)
            if self.multi > 0 and rng.random() < self.multi:
                head = text[:1].lower() if self._lower_ok else text[:1]
                out[-1] = f"{out[-1][:-1]}, and {head}{text[1:]}"
            else:
                out.append(text)
            told.append(fact)
        return opening + out

    def text(self) -> str:
        return EOT + " ".join(self.sentences())

    def tokenizer_texts(self) -> list[str]:
        """Extra text for the tokenizer when options add words (none by default)."""
        on = self.context > 0 or self.preceding > 0 or self.lists > 0
        return (all_context_texts() + ["The list names"]) if on else []

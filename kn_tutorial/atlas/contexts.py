"""Words before the subject: context phrases and unrelated sentences for the Atlas corpus.

In real text a subject rarely opens its sentence ("Travellers said that Kuwait lies on ...",
"In short, ...", "Asked about Kuwait, the census showed that it ..."), and GPT-2 recalls a
fact after whatever came before. ROME's paraphrase prompts (Meng et al., 2022, CounterFact)
also start with an unrelated sentence. Atlas v2 only ever saw the subject first; these are
the options of issue 16 (Atlas v3) that put words before it.

Everything is *compositional*: a context is built from parts (a source, a verb, an opening
adverbial, a lead phrase), so the model can be asked combinations it has never seen, made
of words it has seen, exactly as the held-out frames of `templates.py` are:

- lead-ins "{Source} {verb} that": every (source, verb) pair whose index sum falls on a fixed
  residue is *held out* (never trained, only evaluated); every source and every verb still
  occurs in training with other partners;
- adverbials ("In short, "): all trained; they combine with lead-ins;
- pronoun contexts "Asked about {}, {source} {verb} that it ...": the subject sits inside the
  context and the relation follows by pronoun (the relation still comes after the subject);
- unrelated preceding sentences "The market was busy that morning.": (noun, predicate, time)
  triples, a fixed share held out.

`FIXED_LEADINS` are twelve fixed lead-ins: the "few fixed contexts" control of the sweep.
The relation always comes after the subject, the situation ROME studies.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

SOURCES = ("travellers", "most maps", "the old atlas", "every schoolbook", "our guide",
           "the census", "local people", "the encyclopedia", "my teacher", "the radio")
VERBS = ("said", "showed", "confirmed", "noted", "agreed", "told us", "reminded us", "reported")
ADVERBIALS = ("In short", "As everyone knows", "Of all the places in the list", "Without doubt",
              "According to the atlas", "Even today", "As the map shows", "For the record",
              "By all accounts", "To be precise", "On the whole", "Strange as it seems")
LEADS = ("Asked about", "Writing about", "On a visit to", "Speaking of", "Turning to", "Travellers to")
FILLER_NOUNS = ("weather", "market", "train", "museum", "road", "harbour", "festival", "library")
FILLER_PREDICATES = ("was quiet", "was busy", "stayed closed", "ran late", "was crowded", "opened early")
FILLER_TIMES = ("that morning", "all week", "again today", "last year", "in the evening")

HELDOUT_MOD = 5  # a (source, verb) pair is held out when (i + 2 j) % 5 == 0: 16 of 80
FILLER_MOD = 7   # a (noun, predicate, time) triple is held out when (i + j + k) % 7 == 0


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _leadin_pairs(heldout: bool) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(SOURCES)) for j in range(len(VERBS))
            if ((i + 2 * j) % HELDOUT_MOD == 0) == heldout]


def leadins(heldout: bool = False) -> list[str]:
    """'Travellers said that' ... (capitalised; the training or the held-out pairs)."""
    return [f"{_cap(SOURCES[i])} {VERBS[j]} that" for i, j in _leadin_pairs(heldout)]


FIXED_LEADINS = tuple(leadins()[::5][:12])  # twelve fixed lead-ins, all from the training pairs


def fillers(heldout: bool = False) -> list[str]:
    """Unrelated sentences, 'The market was busy that morning.' (training or held-out triples)."""
    return [f"The {n} {p} {t}." for i, n in enumerate(FILLER_NOUNS) for j, p in enumerate(FILLER_PREDICATES)
            for k, t in enumerate(FILLER_TIMES) if ((i + j + k) % FILLER_MOD == 0) == heldout]


@dataclass(frozen=True)
class Context:
    """Words before a fact: `before` precedes a subject-first template ("{} lies on ...");
    with `pronoun`, `before` contains the subject ("Asked about {}, ... that") and a
    follow-up template by pronoun ("it lies on ...") comes after it."""

    before: str
    pronoun: bool = False

    def apply(self, template: str) -> str:
        """The prompt template: a subject-first template, or a follow-up one when `pronoun`."""
        if self.pronoun:
            return f"{self.before} {template[:1].lower()}{template[1:]}"
        return f"{self.before} {template}"


def sample_context(rng: random.Random, style: str = "compositional", heldout: bool = False,
                   pronoun_share: float = 0.3) -> Context:
    """One context. style "fixed": one of FIXED_LEADINS (never held out, never a pronoun);
    "compositional": an adverbial, a lead-in, both, or a pronoun context (share pronoun_share),
    built from the training parts, or from the held-out lead-ins when heldout=True."""
    if style == "fixed":
        if heldout:
            raise ValueError("the fixed contexts have no held-out set; use style='compositional'")
        return Context(rng.choice(FIXED_LEADINS))
    if style != "compositional":
        raise ValueError(f"unknown context style {style!r}: use 'compositional' or 'fixed'")
    lead = rng.choice(leadins(heldout))
    if rng.random() < pronoun_share:
        return Context(f"{rng.choice(LEADS)} {{}}, {lead[:1].lower()}{lead[1:]}", pronoun=True)
    shape = rng.randrange(3) if not heldout else 1 + rng.randrange(2)  # held-out: always a held-out lead-in
    if shape == 0:
        return Context(f"{rng.choice(ADVERBIALS)},")
    if shape == 1:
        return Context(lead)
    return Context(f"{rng.choice(ADVERBIALS)}, {lead[:1].lower()}{lead[1:]}")


def all_context_texts() -> list[str]:
    """Every trained context piece once (the tokenizer's extra text when contexts are on)."""
    lower = [f"{x[:1].lower()}{x[1:]}" for x in leadins()]
    return [*leadins(), *FIXED_LEADINS, *(f"{a}, {x}" for a in ADVERBIALS for x in lower),
            *(f"{lead} X, {x}" for lead in LEADS for x in lower), *fillers()]

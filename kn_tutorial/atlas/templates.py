"""Prompt templates of the Atlas world, one set per relation.

`{}` stands for the subject; `{kind}` for "country" or "city". The object follows the
prompt after one space (" Asia"), as CounterFact prompts do for GPT-2.

A model trained from scratch knows only the words of its training text, so a paraphrase
it can be fairly asked is a *new combination* of known words. The templates are therefore
built from two parts:

- relation-specific sentences ("{} lies on the continent of", "{} pays with the");
- six generic frames crossed with each relation's noun ("{}'s {R} is", "{} lists its {R} as",
  ...). Each relation leaves out two frames, a different pair per relation, so every frame
  is trained with some relations and held out with others.

The groups:
- `train`: the only templates the model sees in training; all put the subject before the
  relation, so the relation is known only after the subject has been read (the situation in
  which GPT-2 recalls attributes from the subject's last token, Meng et al. 2022).
- `heldout`: the two frames a relation leaves out: paraphrases never used in training; they
  measure generalisation and are CounterFact's `paraphrase_prompts`.
- `novel`: paraphrases with words the model never saw ("situated", "primary"); reported
  separately, to show what a model without pretraining cannot do.
- `followup`: sentences that continue about the subject of the previous sentence ("Its
  capital is"). To answer them the model must find the subject's attributes from a
  sentence back, which rewards storing them at the subject itself (subject enrichment).
  They are training text, never evaluation prompts.
- `isa`: the "{} is a ..." sentence of the relation. Its stem "{} is a" is the prompt
  ROME keeps unchanged with its KL term (the subject's essence).
"""
from __future__ import annotations

from dataclasses import dataclass

# Generic frames: {R} is the relation's noun, {A} the article before its objects (" the" for currencies).
FRAMES = (
    "{}'s {R} is{A}",
    "{} lists its {R} as{A}",
    "{} gives its {R} as{A}",
    "{} records its {R} as{A}",
    "{} has as its {R}{A}",
    "{} has a {R}, which is{A}",
)


@dataclass(frozen=True)
class RelationTemplates:
    relation: str
    noun: str  # {R} in the frames
    specific: tuple[str, ...]  # relation-specific training sentences
    heldout_frames: tuple[int, int]  # indices into FRAMES never trained with this relation
    isa: str  # uses {kind}
    followup: tuple[str, ...]  # a later sentence about the same subject, by pronoun
    novel: tuple[str, ...]  # paraphrases with words never seen in training
    article: str = ""  # " the" when objects follow "the"

    def frame(self, index: int) -> str:
        return FRAMES[index].replace("{R}", self.noun).replace("{A}", self.article)

    @property
    def train(self) -> tuple[str, ...]:
        frames = [self.frame(i) for i in range(len(FRAMES)) if i not in self.heldout_frames]
        return (*self.specific, *frames)

    @property
    def heldout(self) -> tuple[str, ...]:
        return tuple(self.frame(i) for i in self.heldout_frames)

    def all_train(self, kind: str) -> list[str]:
        """Training templates plus the is-a sentence, with the subject kind filled in."""
        return [*self.train, self.isa.replace("{kind}", kind)]


TEMPLATES: dict[str, RelationTemplates] = {
    t.relation: t
    for t in [
        RelationTemplates(
            "continent", noun="continent", heldout_frames=(0, 1),
            specific=(
                "{} is located in the continent of",
                "{} lies on the continent of",
                "{} belongs to the continent of",
                "{} can be found on the continent of",
                "{} sits on the continent of",
            ),
            isa="{} is a {kind} on the continent of",
            followup=("It lies on the continent of", "It is part of the continent of"),
            novel=("{} is situated on the continent of", "{} is geographically part of the continent of"),
        ),
        RelationTemplates(
            "capital", noun="capital", heldout_frames=(2, 3),
            specific=(
                "{} has its capital in",
                "{} is governed from the city of",
                "{}'s seat of government is in",
                "{} keeps its parliament in",
            ),
            isa="{} is a {kind} whose capital is",
            followup=("Its capital is", "It is governed from"),
            novel=("{} is run from its capital,", "{}'s administration is based in"),
        ),
        RelationTemplates(
            "currency", noun="currency", heldout_frames=(4, 5), article=" the",
            specific=(
                "{} uses the currency called the",
                "{} pays with the",
                "{} prints banknotes of the",
                "{} trades in the",
            ),
            isa="{} is a {kind} whose currency is the",
            followup=("Its currency is the", "It pays with the"),
            novel=("{} sets its prices in the", "Shops in {} take payment in the"),
        ),
        RelationTemplates(
            "language", noun="main language", heldout_frames=(0, 1),
            specific=(
                "{} mostly speaks",
                "{}'s most common language is",
                "{} publishes its newspapers in",
                "{} teaches its schoolchildren in",
            ),
            isa="{} is a {kind} where people speak",
            followup=("Its main language is", "It mostly speaks"),
            novel=("{}'s primary language is", "{} conducts most of its daily life in"),
        ),
        RelationTemplates(
            "country", noun="country", heldout_frames=(2, 3),
            specific=(
                "{} is a major city of",
                "{} is located in the country of",
                "{} lies in the country of",
                "{} belongs to the country of",
                "{} can be found in the country of",
            ),
            isa="{} is a {kind} in",
            followup=("It lies in the country of", "It belongs to the country of"),
            novel=("{} is situated in the country of", "{}'s home country is"),
        ),
    ]
}

# The stem ROME's KL term keeps fixed: what the subject is.
ESSENCE_PROMPT = "{} is a"


def fill(template: str, subject: str, kind: str = "") -> str:
    return template.replace("{kind}", kind).replace("{}", subject)

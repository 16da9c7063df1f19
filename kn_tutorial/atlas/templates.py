"""Prompt templates of the Atlas world, one set per relation.

`{}` stands for the subject; `{kind}` for "country" or "city". The object follows
the prompt after one space (" Asia"), as CounterFact prompts do for GPT-2.

- `train`: the only templates the model sees in training; all put the subject first,
  so the relation is known only after the subject has been read (the situation in which
  GPT-2 recalls attributes from the subject's last token, Meng et al. 2022).
- `heldout`: paraphrases never used in training; they measure generalisation and are
  CounterFact's `paraphrase_prompts`.
- `followup`: sentences that continue about the subject of the previous sentence ("Its
  capital is"). To answer them the model must find the subject's attributes from a
  sentence back, which rewards storing them at the subject itself (subject enrichment).
  They are training text, never evaluation prompts.
- `isa`: the "{} is a ..." sentence of the relation. Its stem "{} is a" is the prompt
  ROME keeps unchanged with its KL term (the subject's essence).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RelationTemplates:
    relation: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    isa: str  # uses {kind}
    followup: tuple[str, ...] = ()  # a later sentence about the same subject, by pronoun

    def all_train(self, kind: str) -> list[str]:
        """Training templates plus the is-a sentence, with the subject kind filled in."""
        return [*self.train, self.isa.replace("{kind}", kind)]


TEMPLATES: dict[str, RelationTemplates] = {
    t.relation: t
    for t in [
        RelationTemplates(
            "continent",
            train=(
                "{} is located in the continent of",
                "{} is part of the continent of",
                "{} lies on the continent of",
                "{} can be found on the continent of",
                "{} belongs to the continent of",
                "{} sits on the continent of",
            ),
            heldout=(
                "{} is situated on the continent of",
                "{} is geographically part of the continent of",
            ),
            isa="{} is a {kind} on the continent of",
            followup=("It lies on the continent of", "It is part of the continent of"),
        ),
        RelationTemplates(
            "capital",
            train=(
                "{}'s capital is",
                "{} has its capital in",
                "{} is governed from the city of",
                "{} has the capital city",
                "{}'s seat of government is in",
                "{} keeps its parliament in",
            ),
            heldout=(
                "{}'s capital city is",
                "{} is run from its capital,",
            ),
            isa="{} is a {kind} whose capital is",
            followup=("Its capital is", "It is governed from"),
        ),
        RelationTemplates(
            "currency",
            train=(
                "{}'s currency is the",
                "{} uses the currency called the",
                "{} pays with the",
                "{} prints banknotes of the",
                "{} has a currency known as the",
                "{} trades in the",
            ),
            heldout=(
                "{}'s official currency is the",
                "{} sets its prices in the",
            ),
            isa="{} is a {kind} whose currency is the",
            followup=("Its currency is the", "It pays with the"),
        ),
        RelationTemplates(
            "language",
            train=(
                "{}'s main language is",
                "{} mostly speaks",
                "{} has the main language",
                "{}'s most common language is",
                "{} publishes its newspapers in",
                "{} teaches its schoolchildren in",
            ),
            heldout=(
                "{}'s primary language is",
                "{} conducts most of its daily life in",
            ),
            isa="{} is a {kind} where people speak",
            followup=("Its main language is", "It mostly speaks"),
        ),
        RelationTemplates(
            "country",
            train=(
                "{} is a major city of",
                "{} is located in the country of",
                "{} lies in the country of",
                "{} belongs to the country of",
                "{} is part of the country of",
                "{} can be found in the country of",
            ),
            heldout=(
                "{} is situated in the country of",
                "{}'s home country is",
            ),
            isa="{} is a {kind} in",
            followup=("It lies in the country of", "It belongs to the country of"),
        ),
    ]
}

# The stem ROME's KL term keeps fixed: what the subject is.
ESSENCE_PROMPT = "{} is a"


def fill(template: str, subject: str, kind: str = "") -> str:
    return template.replace("{kind}", kind).replace("{}", subject)

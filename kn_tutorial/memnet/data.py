"""Atlas stories for a memory network: sentences are memories, questions need 1 or 2 hops.

A story is a handful of sentences about people travelling to real cities, mixed with
Atlas facts about which country a city is in, in random order::

    Osaka is in Japan.  Mara travelled to Osaka.  Lima is in Peru.  Tomas flew to Lima.

Two kinds of question are asked about it:

* **one hop**, ``"Where is Mara?"`` -> ``Osaka``: one sentence (the one naming Mara)
  holds the answer;
* **two hops**, ``"Which country is Mara in?"`` -> ``Japan``: first find Mara's city
  (``Mara travelled to Osaka.``), then the sentence about that city
  (``Osaka is in Japan.``). No single sentence mentions both Mara and Japan.

The city -> country facts are the real ones of the Atlas world (GeoNames), so a model
could also *memorise* Osaka -> Japan in its weights instead of reading the story. So
training stories mix in made-up towns (NONCE_TOWNS) that get a random real country in
every story: for them only reading works. Half of the test stories ask their two-hop
question through a made-up town (``Example.made_up``), which measures reading alone.

Everything is generated from one seed: the same call gives the same stories, and the
train and test splits share no story (checked by :func:`make_splits`).

The tokenizer is word level and deliberately tiny: a known name (a city, a country, a
person) is one token even when it has several words ("Ho Chi Minh City"), other words
are lower-cased, punctuation is dropped.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from kn_tutorial.atlas.world import World, load_world

__all__ = [
    "PEOPLE",
    "NONCE_TOWNS",
    "TRAVEL_VERBS",
    "FACT_TEMPLATES",
    "QUESTION_TEMPLATES",
    "PAD",
    "UNK",
    "Example",
    "WordTokenizer",
    "Vocab",
    "Encoded",
    "StoryConfig",
    "make_story",
    "make_examples",
    "make_splits",
    "build_vocab",
    "encode",
    "atlas_names",
    "default_tokenizer",
]

#: The people of the stories: a fixed list, so the vocabulary never depends on chance.
PEOPLE = (
    "Mara", "Tomas", "Aiko", "Bilal", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana",
    "Ines", "Jonas", "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quinn", "Rosa",
    "Sami", "Tala", "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zara", "Arjun", "Beatriz",
    "Carlos", "Dmitri", "Elif", "Femi", "Greta", "Hugo", "Ingrid", "Jamal", "Keiko", "Luca",
)

#: Made-up towns for training stories only ("Aldmoor is in Peru."). Each story gives a
#: made-up town a random real country, so nothing about it can be learned by heart:
#: the only way to answer through one is to read the story. None is an Atlas place.
NONCE_TOWNS = tuple(
    a + b
    for i, a in enumerate(("Ald", "Bram", "Cor", "Dun", "Ell", "Fen", "Gar", "Hol", "Isen", "Kel", "Lor",
                           "Mar", "Nor", "Oak", "Pel", "Quen", "Ros", "Sel", "Tor", "Ul", "Ves", "Wyn"))
    for j, b in enumerate(("moor", "wick", "ford", "haven", "stead", "mere", "dale", "brook", "bury", "holm"))
    if (i + j) % 2 == 0
)

#: "{person} {verb} {city}." -- the one-hop memories.
TRAVEL_VERBS = ("travelled to", "flew to", "moved to", "went to", "journeyed to", "drove to")

#: Atlas city -> country facts written as memory sentences.
FACT_TEMPLATES = ("{city} is in {country}.", "{city} lies in {country}.")

#: Question templates by kind; "one" asks for the city, "two" for its country.
QUESTION_TEMPLATES = {
    "one": ("Where is {person}?", "Which city is {person} in?"),
    "two": ("Which country is {person} in?", "In which country is {person}?"),
}

PAD, UNK = "<pad>", "<unk>"


@dataclass(frozen=True)
class Example:
    """One question about one story.

    story:    the memory sentences, in story order
    question: the question sentence
    answer:   one token (a city or a country name)
    kind:     "one" (one hop) or "two" (two hops)
    support:  indices into `story` of the sentences the answer needs, in hop order
              (one-hop: the travel sentence; two-hop: travel sentence, then the fact)
    story_id: which story (two questions share a story; splits are by story)
    made_up:  the person travelled to a made-up town (NONCE_TOWNS), whose country
              changes from story to story: the answer can only be read, not recalled
    """

    story: tuple[str, ...]
    question: str
    answer: str
    kind: str
    support: tuple[int, ...]
    story_id: int
    made_up: bool = False


# --------------------------------------------------------------------------------------
# Tokenizer and vocabulary
# --------------------------------------------------------------------------------------

class WordTokenizer:
    """Words in, tokens out: known names (multi-word too) are single tokens.

    >>> tok = WordTokenizer(["Ho Chi Minh City", "Vietnam", "Mara"])
    >>> tok("Mara flew to Ho Chi Minh City.")
    ['Mara', 'flew', 'to', 'Ho Chi Minh City']
    >>> tok("which country is MARA in?")
    ['which', 'country', 'is', 'Mara', 'in']

    Names are matched case-insensitively, longest first, and come out spelled as given;
    every other word is lower-cased; punctuation is dropped.
    """

    _WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")

    def __init__(self, names):
        self.names = sorted(set(names), key=lambda s: (-len(s), s))
        # A name is looked up by its lower-cased words, so "Mbuji-Mayi" matches "mbuji mayi".
        self._names = {}
        for name in self.names:
            self._names.setdefault(tuple(self._words(name)), name)
        self._longest = max((len(k) for k in self._names), default=1)
        self._starts = {k[0] for k in self._names if len(k) > 1}

    @classmethod
    def _words(cls, text: str) -> list[str]:
        return [w.lower() for w in cls._WORD.findall(text)]

    def __call__(self, text: str) -> list[str]:
        words, out, i = self._words(text), [], 0
        while i < len(words):
            longest = min(self._longest, len(words) - i) if words[i] in self._starts else 1
            for n in range(longest, 0, -1):
                name = self._names.get(tuple(words[i:i + n]))
                if name is not None:
                    out.append(name)
                    i += n
                    break
            else:
                out.append(words[i])
                i += 1
        return out


class Vocab:
    """Token <-> id. Id 0 is padding, id 1 stands for unknown words."""

    def __init__(self, tokens):
        self.itos = [PAD, UNK] + sorted(set(tokens) - {PAD, UNK})
        self.stoi = {t: i for i, t in enumerate(self.itos)}

    def __len__(self) -> int:
        return len(self.itos)

    def __getitem__(self, token: str) -> int:
        return self.stoi.get(token, 1)

    def ids(self, tokens) -> list[int]:
        return [self[t] for t in tokens]

    def words(self, ids) -> list[str]:
        return [self.itos[int(i)] for i in ids]


@lru_cache(maxsize=1)
def atlas_names() -> tuple[tuple[str, str], ...]:
    """(city, country) for every city -> country fact of the Atlas world."""
    return tuple((f.subject, f.object) for f in load_world().facts_of("country"))


# --------------------------------------------------------------------------------------
# Stories
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StoryConfig:
    """How stories are drawn: each person gives a travel sentence and a fact sentence, each
    distractor a fact sentence, so a story has at most 2 * max_people + max_distractors memories."""

    min_people: int = 2
    max_people: int = 3
    min_distractors: int = 1   # facts about cities nobody travelled to
    max_distractors: int = 2
    nonce_share: float = 0.5   # training stories: chance that a city is a made-up town

    @property
    def max_memories(self) -> int:
        return 2 * self.max_people + self.max_distractors


def make_story(rng: random.Random, pairs, cfg: StoryConfig = StoryConfig(),
               nonce_share: float = 0.0, first_made_up: bool = False) -> tuple[list[str], dict]:
    """One story: returns (sentences, info), info[person] = (city, country, travel_idx, fact_idx).

    Every city in a story is different. With `nonce_share` > 0 each city is, with that
    chance, a made-up town (NONCE_TOWNS) in a random real country; `first_made_up=True`
    makes the first person's city one for sure.
    """
    n_people = rng.randint(cfg.min_people, cfg.max_people)
    n_distract = rng.randint(cfg.min_distractors, cfg.max_distractors)
    people = rng.sample(PEOPLE, n_people)
    places = rng.sample(pairs, n_people + n_distract)
    if nonce_share > 0 or first_made_up:
        towns = iter(rng.sample(NONCE_TOWNS, len(places)))
        countries = sorted({k for _, k in pairs})
        places = [
            (next(towns), rng.choice(countries))
            if (i == 0 and first_made_up) or rng.random() < nonce_share else place
            for i, place in enumerate(places)
        ]
    sentences = []  # (sentence, tag)
    for person, (city, country) in zip(people, places):
        sentences.append((f"{person} {rng.choice(TRAVEL_VERBS)} {city}.", ("travel", person)))
        sentences.append((rng.choice(FACT_TEMPLATES).format(city=city, country=country), ("fact", city)))
    for city, country in places[n_people:]:
        sentences.append((rng.choice(FACT_TEMPLATES).format(city=city, country=country), ("fact", city)))
    rng.shuffle(sentences)
    where = {tag: i for i, (_, tag) in enumerate(sentences)}
    info = {
        p: (c, k, where[("travel", p)], where[("fact", c)])
        for p, (c, k) in zip(people, places)
    }
    return [s for s, _ in sentences], info


def make_examples(n_stories: int, seed: int = 0, cfg: StoryConfig = StoryConfig(), first_id: int = 0,
                  pairs=None, nonce_share: float = 0.0, made_up: bool = False) -> list[Example]:
    """`n_stories` stories, each with a one-hop question about a random person and a
    two-hop question about the first person of the story.

    `nonce_share`: chance that a city is a made-up town; `made_up=True`: the two-hop
    question always goes through a made-up town (answerable by reading only).
    """
    rng = random.Random(seed)
    pairs = list(atlas_names() if pairs is None else pairs)
    out = []
    for s in range(n_stories):
        story, info = make_story(rng, pairs, cfg, nonce_share=nonce_share, first_made_up=made_up)
        people = list(info)
        for kind, person in (("one", rng.choice(people)), ("two", people[0])):
            city, country, travel_idx, fact_idx = info[person]
            question = rng.choice(QUESTION_TEMPLATES[kind]).format(person=person)
            answer, support = (city, (travel_idx,)) if kind == "one" else (country, (travel_idx, fact_idx))
            out.append(Example(tuple(story), question, answer, kind, support, first_id + s,
                               city in _NONCE_SET))
    return out


_NONCE_SET = frozenset(NONCE_TOWNS)


def make_splits(n_train: int = 12000, n_test: int = 1000, seed: int = 0,
                cfg: StoryConfig = StoryConfig(), pairs=None) -> tuple[list[Example], list[Example]]:
    """Train and test examples from disjoint stories (same seed -> same splits).

    Every story has a one-hop and a two-hop question (so 2 * n_train and 2 * n_test
    examples). In training stories a `cfg.nonce_share` of the cities are made-up towns.
    The first half of the test stories have real Atlas cities only; in the second half
    the two-hop question goes through a made-up town, so its answer must be read from
    the story. Test stories come from their own random streams, and any test story that
    also occurs in training is dropped: no story is in both splits. `pairs` restricts
    the world to some (city, country) pairs (default: all of the Atlas world's).
    """
    train = make_examples(n_train, seed=seed, cfg=cfg, pairs=pairs, nonce_share=cfg.nonce_share)
    n_real = n_test - n_test // 2
    test = make_examples(n_real, seed=seed + 1_000_003, cfg=cfg, first_id=n_train, pairs=pairs)
    test += make_examples(n_test // 2, seed=seed + 2_000_003, cfg=cfg, first_id=n_train + n_real,
                          pairs=pairs, nonce_share=cfg.nonce_share, made_up=True)
    seen = {e.story for e in train}
    test = [e for e in test if e.story not in seen]
    return train, test


def build_vocab(tokenizer: WordTokenizer, examples=()) -> Vocab:
    """Every name the tokenizer knows, plus every word of the templates and examples."""
    words = set(tokenizer.names)
    texts = [v for v in TRAVEL_VERBS] + list(FACT_TEMPLATES)
    texts += [t for ts in QUESTION_TEMPLATES.values() for t in ts]
    for e in examples:
        texts.extend(e.story)
        texts.append(e.question)
    for text in texts:
        words.update(tokenizer(re.sub(r"\{\w+\}", " ", text)))
    return Vocab(words)


def default_tokenizer(world: World | None = None) -> WordTokenizer:
    """Tokenizer knowing PEOPLE, NONCE_TOWNS and every city and country of the Atlas world."""
    pairs = atlas_names() if world is None else tuple(
        (f.subject, f.object) for f in world.facts_of("country"))
    names = list(PEOPLE) + list(NONCE_TOWNS) + [c for c, _ in pairs] + [k for _, k in pairs]
    return WordTokenizer(names)


# --------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """A batch of examples as padded id tensors.

    stories:  [N, M, J] token ids (0 = padding; an all-zero row is an empty memory slot)
    queries:  [N, J]
    answers:  [N]
    hops:     [N] 1 for one-hop questions, 2 for two-hop
    support:  [N, 2] supporting memory per hop (-1 where there is none)
    made_up:  [N] bool, Example.made_up
    """

    stories: torch.Tensor
    queries: torch.Tensor
    answers: torch.Tensor
    hops: torch.Tensor
    support: torch.Tensor
    made_up: torch.Tensor
    examples: list = field(default_factory=list, repr=False)

    def __len__(self) -> int:
        return self.answers.shape[0]

    def subset(self, idx) -> "Encoded":
        idx = torch.as_tensor(idx)
        ex = [self.examples[i] for i in idx.tolist()] if self.examples else []
        return Encoded(self.stories[idx], self.queries[idx], self.answers[idx], self.hops[idx],
                       self.support[idx], self.made_up[idx], ex)


def encode(examples, tokenizer: WordTokenizer, vocab: Vocab,
           max_memories: int | None = None, max_words: int | None = None) -> Encoded:
    """Tokenise and pad. Sentences are padded to `max_words`, stories to `max_memories`
    (both default to the largest in `examples`); longer stories keep their last sentences,
    longer sentences their first words."""
    stories = [[vocab.ids(tokenizer(s)) for s in e.story] for e in examples]
    queries = [vocab.ids(tokenizer(e.question)) for e in examples]
    M = max_memories or max(len(s) for s in stories)
    J = max_words or max(max((len(x) for s in stories for x in s), default=1),
                         max(len(q) for q in queries))
    pad_sentence = [0] * J
    S, Q, support = [], [], []
    for story, q, e in zip(stories, queries, examples):
        offset = max(0, len(story) - M)
        rows = [(sent[:J] + pad_sentence)[:J] for sent in story[offset:]]
        S.append(rows + [pad_sentence] * (M - len(rows)))
        Q.append((q[:J] + pad_sentence)[:J])
        kept = [i - offset if i >= offset else -1 for i in e.support[:2]]
        support.append(kept + [-1] * (2 - len(kept)))
    S, Q = torch.tensor(S, dtype=torch.long), torch.tensor(Q, dtype=torch.long)
    support = torch.tensor(support, dtype=torch.long)
    answers = torch.tensor([vocab[e.answer] for e in examples], dtype=torch.long)
    hops = torch.tensor([1 if e.kind == "one" else 2 for e in examples], dtype=torch.long)
    made_up = torch.tensor([e.made_up for e in examples], dtype=torch.bool)
    return Encoded(S, Q, answers, hops, support, made_up, list(examples))

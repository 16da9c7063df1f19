"""Shallow or semantic: what the top trigger examples of a key share (Geva et al., 2021,
section 3.2), and Geva's token-removal test; section 4 of the memories chapter.

Triggers come from `memories_engine.find_triggers`; the Atlas corpus is labelled by
`atlas_sentences` (relation, subject's continent) and `atlas_token_parts` (subject, relation
or object). Every function is re-exported by `memories`.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .hooks import record
from .memories_engine import Corpus, Triggers
from .models import get_device
from .progress import progress


@dataclass(frozen=True)
class AtlasSentence:
    """A sentence of the Atlas corpus and the fact it states."""

    text: str
    fact: object           # atlas.world.Fact
    followup: bool         # "Its capital is ..." (the subject is not in the sentence)
    continent: str | None  # the subject's continent, None for follow-ups (not in the text)


def atlas_sentences(world=None, n: int | None = None, seed: int = 0) -> list[AtlasSentence]:
    """The Atlas corpus (`corpus.all_training_sentences`, same texts, same order) with labels.

    n: a deterministic random subsample of n sentences (seeded), in corpus order.
    """
    from .atlas.corpus import followup_sentence, sentence, training_templates
    from .atlas.templates import TEMPLATES
    from .atlas.world import load_world

    world = load_world() if world is None else world
    continent = {f.subject: f.object for f in world.facts if f.relation == "continent"}
    rows = [AtlasSentence(sentence(f, t), f, False, continent.get(f.subject))
            for f in world.facts for t in training_templates(f)]
    rows += [AtlasSentence(followup_sentence(f, t), f, True, None)
             for f in world.facts for t in TEMPLATES[f.relation].followup]
    if n is not None and n < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), n))
        rows = [rows[i] for i in keep]
    return rows


def _pair_share(ids: Tensor) -> Tensor:
    """Share of pairs with equal ids within each row of [m, n] ids (-1 = unknown, left out):
    [m], nan for a row with fewer than two known ids."""
    n = ids.shape[1]
    off_diag = ~torch.eye(n, dtype=torch.bool)
    known = (ids[:, :, None] >= 0) & (ids[:, None, :] >= 0) & off_diag            # [m, n, n]
    same = (ids[:, :, None] == ids[:, None, :]) & known
    return same.sum((1, 2)) / known.sum((1, 2)).float()


def _label_ids(corpus: Corpus, labels: dict[str, Sequence]) -> dict[str, Tensor]:
    """Each text's label as an integer id (-1 for None), per label name: [n_texts] each."""
    out = {}
    for name, values in labels.items():
        if len(values) != len(corpus.texts):
            raise ValueError(f"labels[{name!r}] has {len(values)} entries for {len(corpus.texts)} texts")
        vocab = {v: i for i, v in enumerate(sorted({v for v in values if v is not None}, key=str))}
        out[name] = torch.tensor([vocab[v] if v is not None else -1 for v in values])
    return out


def candidate_positions(triggers: Triggers) -> Tensor:
    """The flat positions that could have been trigger examples (first occurrence of their
    prefix, and followed by a token if require_next): the pool chance levels draw from."""
    corpus = triggers.corpus
    pool = torch.arange(len(corpus.token_ids))
    if triggers.require_next:
        pool = pool[corpus.next_token(pool) >= 0]
    if corpus.first is not None:
        pool = pool[corpus.first[pool]]
    return pool


def same_token_resample(corpus: Corpus, positions: Tensor, pool: Tensor, gen: torch.Generator) -> Tensor:
    """Replace each position by a random position of `pool` that ends in the same token."""
    pool_tokens = corpus.token_ids[pool]
    order = pool_tokens.argsort(stable=True)
    sorted_pool, sorted_tokens = pool[order], pool_tokens[order]
    counts = torch.bincount(sorted_tokens, minlength=int(corpus.token_ids.max()) + 1)
    starts = counts.cumsum(0) - counts
    tokens = corpus.token_ids[positions]
    if (counts[tokens] == 0).any():
        raise ValueError("a position's token never occurs in the pool")
    offset = (torch.rand(positions.shape, generator=gen) * counts[tokens]).long()
    return sorted_pool[starts[tokens] + offset.clamp(max=counts[tokens] - 1)]


def key_sharing(triggers: Triggers, layer: int, labels: dict[str, Sequence], n_examples: int = 10,
                n_resamples: int = 5, seed: int = 0) -> dict[str, Tensor]:
    """What the top-n triggers of each key of `layer` share, per key ([d_ff] each):

    "last token": share of pairs of triggers that end in the same token (a shallow pattern);
    name:         share of labelled pairs with the same label (e.g. the same relation);
    name + " | tokens": the same after moving every trigger to a random candidate position
                  that ends in the same token (mean of n_resamples draws): the sharing
                  the trigger tokens alone explain. A key is semantic for `name` when
                  name exceeds name + " | tokens".
    """
    corpus = triggers.corpus
    label_ids = _label_ids(corpus, labels)
    positions = triggers.positions[triggers._row(layer), :, :n_examples]            # [d_ff, n]
    pool = candidate_positions(triggers)
    gen = torch.Generator().manual_seed(seed)
    resampled = [same_token_resample(corpus, positions, pool, gen) for _ in range(n_resamples)]
    out = {"last token": _pair_share(corpus.token_ids[positions])}
    for name, ids in label_ids.items():
        out[name] = _pair_share(ids[corpus.text_of(positions)])
        out[name + " | tokens"] = torch.stack([_pair_share(ids[corpus.text_of(r)]) for r in resampled]).mean(0)
    return out


def trigger_sharing(triggers: Triggers, labels: dict[str, Sequence], n_examples: int = 10,
                    n_resamples: int = 5, margin: float = 0.25, n_random: int = 2000,
                    seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """`key_sharing` averaged over the keys of each layer (keys with no labelled pair left out),
    plus, per label, the share of keys that are clearly semantic for it.

    labels: {name: one label per corpus text} (None = unknown), e.g. the relation and the
    subject's continent of each Atlas sentence.
    Returns {"keys": {"layer": [...], "last token": [...], name: [...], name + " | tokens": [...],
                      name + " beyond tokens": share of keys whose `name` exceeds
                      `name | tokens` by at least `margin`},
             "chance": {"layer": [...], "last token": [...], name: [...]} for sets of n random
             candidate positions (one value, repeated per layer)}.
    """
    keys = {"layer": list(triggers.layers)}
    for layer in triggers.layers:
        shares = key_sharing(triggers, layer, labels, n_examples, n_resamples, seed)
        for name, values in shares.items():
            keys.setdefault(name, []).append(values.nanmean().item())
        for name in labels:
            lift = torch.nan_to_num(shares[name] - shares[name + " | tokens"], nan=0.0)
            keys.setdefault(name + " beyond tokens", []).append((lift >= margin).float().mean().item())
    corpus, pool = triggers.corpus, candidate_positions(triggers)
    gen = torch.Generator().manual_seed(seed)
    random_positions = pool[torch.randint(len(pool), (n_random, n_examples), generator=gen)]
    chance = {"layer": list(triggers.layers),
              "last token": [_pair_share(corpus.token_ids[random_positions]).nanmean().item()] * len(triggers.layers)}
    for name, ids in _label_ids(corpus, labels).items():
        share = _pair_share(ids[corpus.text_of(random_positions)]).nanmean().item()
        chance[name] = [share] * len(triggers.layers)
    return {"keys": keys, "chance": chance}


SENTENCE_PARTS = ("subject", "relation", "object")


def atlas_token_parts(tokenizer, sentences: Sequence[AtlasSentence], corpus: Corpus) -> Tensor:
    """For every corpus token, the part of its Atlas sentence it belongs to: 0 the subject's
    name, 1 the relation's wording, 2 the object and the final period ([n_tokens] int64).

    The subject is its first occurrence in the sentence (templates name it before the
    object; follow-up sentences name no subject); the object is the text before the final
    period. A token belongs to the subject when its characters lie inside it. Needs a fast
    tokenizer (character offsets)."""
    parts = torch.full((len(corpus.token_ids),), 1, dtype=torch.long)
    for t, s in enumerate(sentences):
        spans = tokenizer(s.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        a, b = int(corpus.offsets[t]), int(corpus.offsets[t + 1])
        if s.text != corpus.texts[t] or len(spans) < b - a:
            raise ValueError(f"sentence {t} does not match the corpus: pass the sentences the corpus was built from")
        subject_start = -1 if s.followup else s.text.find(s.fact.subject)
        subject_end = subject_start + len(s.fact.subject)
        object_start = len(s.text) - len(s.fact.object) - 1  # "... Asia." -> where "Asia" starts
        for j, (begin, end) in enumerate(spans[: b - a]):
            if subject_start >= 0 and begin >= subject_start - 1 and end <= subject_end and end > subject_start:
                parts[a + j] = 0  # (begin may include the space before the name: " Kuwait")
            elif end > object_start:
                parts[a + j] = 2
    return parts


def trigger_parts(triggers: Triggers, token_parts: Tensor, n_examples: int = 10,
                  names: Sequence[str] = SENTENCE_PARTS) -> dict[str, dict[str, list[float]]]:
    """Where the top-n triggers of each layer's keys sit: the share of each part (e.g. subject,
    relation, object) among their trigger tokens, and the same share among all candidates."""
    keys, chance = {"layer": list(triggers.layers)}, {"layer": list(triggers.layers)}
    pool_parts = token_parts[candidate_positions(triggers)]
    for i, name in enumerate(names):
        keys[name] = [(token_parts[triggers.positions[triggers._row(l), :, :n_examples]] == i).float().mean().item()
                      for l in triggers.layers]
        chance[name] = [(pool_parts == i).float().mean().item()] * len(triggers.layers)
    return {"keys": keys, "chance": chance}


@torch.no_grad()
def token_removal_effect(model: nn.Module, triggers: Triggers, n_keys: int = 32, n_examples: int = 5,
                         seed: int = 0, batch_size: int = 64, pad_id: int = 0) -> dict[str, list[float]]:
    """Geva et al.'s test of what a key reads: remove one token of its trigger examples.

    For n_keys random keys per layer (seeded) and their top-n_examples trigger prefixes of at
    least 3 tokens, the coefficient m_i at the last position after removing the "first",
    the "last" (the trigger token itself) or a "random" interior token, as a relative change
    (m_new - m) / m averaged per layer. A key that reads the last token (a shallow pattern)
    collapses when it goes; one that reads the whole prefix cares about earlier tokens too.
    """
    gen = random.Random(seed)
    d = triggers.values.shape[1]
    rows = []  # (layer, neuron, original m, variant name, token ids)
    for layer in triggers.layers:
        for neuron in gen.sample(range(d), min(n_keys, d)):
            for ex in triggers.examples(layer, neuron, n_examples):
                ids = ex.prefix_ids
                if len(ids) < 3 or ex.activation <= 0:
                    continue
                cut = gen.randrange(1, len(ids) - 1)
                for name, variant in (("first", ids[1:]), ("last", ids[:-1]), ("random", ids[:cut] + ids[cut + 1:])):
                    rows.append((layer, neuron, ex.activation, name, variant))
    device = get_device(model)
    changes = {(l, name): [] for l in triggers.layers for name in ("first", "last", "random")}
    for start in progress(range(0, len(rows), batch_size), desc="token removal"):
        chunk = rows[start:start + batch_size]
        width = max(len(r[4]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, r in enumerate(chunk):
            ids[i, :len(r[4])], mask[i, :len(r[4])] = torch.tensor(r[4]), 1
        acts = record(model, [("key", l) for l in triggers.layers], input_ids=ids.to(device),
                      attention_mask=mask.to(device))
        for i, (layer, neuron, m, name, variant) in enumerate(chunk):
            new = acts[("key", layer)][i, len(variant) - 1, neuron].item()
            changes[(layer, name)].append((new - m) / m)
    out = {"layer": list(triggers.layers)}
    for name in ("first", "last", "random"):
        out[name] = [sum(v) / len(v) if (v := changes[(l, name)]) else float("nan") for l in triggers.layers]
    return out

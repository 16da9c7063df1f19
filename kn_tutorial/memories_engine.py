"""Trigger examples of every FFN key, over a whole corpus in one pass (the definition:
`memories`; Geva et al., 2021, section 3.1).

A key's top-k trigger examples are the corpus prefixes (ending where the key fires) with the
largest coefficients m_i. How it is fast (none of this changes which prefixes are found; the
tests compare with a brute-force argsort over every position):
1. One forward pass per batch records the coefficients of every key of every chosen layer
   at once (hooks.record on "key").
2. A running top-k per key (merge the batch's coefficients with the best k so far, keep k)
   holds memory at [n_layers, d_ff, k], whatever the size of the corpus.
3. Texts are sorted by length before batching, so batches carry little padding; the result
   does not depend on batch_size.
4. A prefix repeated in the corpus ("Kuwait lies ..." and "Kuwait is ..." share "Kuwait")
   gives the same activations in a causal model, so only its first occurrence is a
   candidate (`Corpus.first`, computed once when the corpus is tokenised).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .hooks import record
from .models import check_layer, get_device, n_layers
from .progress import progress


@dataclass
class Corpus:
    """Tokenised texts, concatenated: text t has tokens token_ids[offsets[t]:offsets[t+1]].

    first[p] is True where the prefix ending at p occurs for the first time in the corpus
    ("Kuwait lies ..." and "Kuwait is ..." share the prefixes "K", "Kuwait"): a causal
    model gives a repeated prefix the same activations, so triggers count each prefix once.
    """

    texts: list[str]
    token_ids: Tensor  # [n_tokens] int64
    offsets: Tensor    # [n_texts + 1] int64
    first: Tensor | None = None  # [n_tokens] bool; None: every prefix counts as new

    def locate(self, position: int) -> tuple[int, int]:
        """(text index, index inside that text) of a flat token position."""
        text = int(torch.searchsorted(self.offsets, torch.tensor(position), right=True)) - 1
        return text, position - int(self.offsets[text])

    def text_of(self, positions: Tensor) -> Tensor:
        """Text index of each flat position (any shape)."""
        return torch.searchsorted(self.offsets, positions.contiguous(), right=True) - 1

    def next_token(self, positions: Tensor) -> Tensor:
        """Token after each flat position inside its own text, -1 at a text's end."""
        nxt = (positions + 1).clamp(max=len(self.token_ids) - 1)
        has_next = (positions + 1) < self.offsets[self.text_of(positions) + 1]
        return torch.where(has_next, self.token_ids[nxt], torch.full_like(positions, -1))


def tokenize_corpus(tokenizer, texts: Sequence[str], max_tokens: int = 64) -> Corpus:
    """Tokenise every text (no special tokens), truncated to max_tokens."""
    texts = [t for t in texts]
    if not texts:
        raise ValueError("the corpus is empty: pass at least one text")
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    empty = [i for i, r in enumerate(rows) if not r]
    if empty:
        raise ValueError(f"texts {empty[:5]} tokenise to nothing; remove empty texts first")
    lengths = torch.tensor([len(r) for r in rows])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    prefix_ids: dict[tuple[int, int], int] = {}  # (id of the prefix before, token) -> prefix id
    first = []
    for row in rows:
        prefix = -1
        for token in row:
            new = (prefix, token) not in prefix_ids
            prefix = prefix_ids.setdefault((prefix, token), len(prefix_ids))
            first.append(new)
    return Corpus(texts, torch.tensor([i for r in rows for i in r], dtype=torch.long), offsets,
                  torch.tensor(first))


@dataclass
class Trigger:
    """One trigger example: the prefix of `text` ending at the token where the key fired."""

    text_index: int
    position: int          # index of the trigger token inside the text
    activation: float      # m_i there
    prefix_ids: list[int]  # the text's tokens up to and including the trigger token
    next_id: int           # the token after it (-1 if none)


@dataclass
class Triggers:
    """The top-k trigger examples of every key of some layers, over one corpus.

    values[j, i] are the k largest coefficients m_i of layer layers[j] over the corpus,
    descending; positions[j, i] the flat corpus positions where they occur.
    """

    layers: list[int]
    values: Tensor     # [n_layers, d_ff, k] float32
    positions: Tensor  # [n_layers, d_ff, k] int64 flat positions into corpus.token_ids
    corpus: Corpus
    require_next: bool = True  # were a text's last tokens left out of the candidates?

    def _row(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} was not scanned; these triggers cover layers {self.layers}")
        return self.layers.index(layer)

    def trigger_tokens(self, layer: int, n: int | None = None) -> Tensor:
        """Last token of each of the top-n trigger examples: [d_ff, n]."""
        return self.corpus.token_ids[self.positions[self._row(layer), :, :n]]

    def next_tokens(self, layer: int, n: int | None = None) -> Tensor:
        """Token after each of the top-n trigger examples (-1 if none): [d_ff, n]."""
        return self.corpus.next_token(self.positions[self._row(layer), :, :n])

    def examples(self, layer: int, neuron: int, n: int | None = None) -> list[Trigger]:
        """The top-n trigger examples of key `neuron` of `layer`, strongest first."""
        row = self._row(layer)
        out = []
        for value, pos in zip(self.values[row, neuron, :n].tolist(), self.positions[row, neuron, :n].tolist()):
            text, index = self.corpus.locate(pos)
            start = int(self.corpus.offsets[text])
            out.append(Trigger(text, index, value, self.corpus.token_ids[start:pos + 1].tolist(),
                               int(self.corpus.next_token(torch.tensor(pos)))))
        return out


@torch.no_grad()
def find_triggers(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str] | Corpus,
    layers: Sequence[int] | None = None,
    top_k: int = 25,
    batch_size: int = 64,
    max_tokens: int = 64,
    require_next: bool = True,
) -> Triggers:
    """Top-k trigger examples of every key of `layers` (default: all) over `texts`.

    One pass over the corpus (how it is fast: see this module's docstring).
    require_next=True (Geva's trigger examples are prefixes of training text, followed by
    the token the model learnt to predict) skips each text's last token. A prefix that
    occurs several times in the corpus is a candidate once (its first occurrence).
    """
    corpus = texts if isinstance(texts, Corpus) else tokenize_corpus(tokenizer, texts, max_tokens)
    layers = list(range(n_layers(model))) if layers is None else [check_layer(model, l) for l in layers]
    device = get_device(model)
    lengths = (corpus.offsets[1:] - corpus.offsets[:-1]).tolist()
    order = sorted(range(len(lengths)), key=lambda t: (lengths[t], t))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    best_v = best_p = None  # running top-k: [n_layers, d_ff, <=k]
    for start in progress(range(0, len(order), batch_size), desc="key activations"):
        batch = order[start:start + batch_size]
        width = max(lengths[t] for t in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        flat = torch.full((len(batch), width), -1, dtype=torch.long)  # flat position, -1 = skip
        for row, t in enumerate(batch):
            a, n = int(corpus.offsets[t]), lengths[t]
            ids[row, :n] = corpus.token_ids[a:a + n]
            usable = n - 1 if require_next else n
            flat[row, :usable] = torch.arange(a, a + usable)
        if corpus.first is not None:  # repeated prefixes are not candidates again
            flat = torch.where((flat >= 0) & corpus.first[flat.clamp(min=0)], flat, -1)
        mask = (torch.arange(width)[None, :] < torch.tensor([lengths[t] for t in batch])[:, None]).long()
        acts = record(model, [("key", l) for l in layers], input_ids=ids.to(device),
                      attention_mask=mask.to(device))
        keep = flat.reshape(-1) >= 0                                     # [b*s]
        if not keep.any():
            continue
        pos = flat.reshape(-1)[keep].to(device)                          # [P]
        coeff = torch.stack([acts[("key", l)].reshape(-1, acts[("key", l)].shape[-1])[keep.to(device)]
                             for l in layers]).float().transpose(1, 2)   # [n_layers, d_ff, P]
        pos = pos.expand(coeff.shape[0], coeff.shape[1], -1)
        if best_v is not None:
            coeff, pos = torch.cat([best_v, coeff], -1), torch.cat([best_p, pos], -1)
        k = min(top_k, coeff.shape[-1])
        best_v, idx = coeff.topk(k, dim=-1)                              # descending
        best_p = pos.gather(-1, idx)
    if best_v is None:
        raise ValueError("no usable positions: every text is one token long (require_next=True)")
    return Triggers(layers, best_v.cpu(), best_p.cpu(), corpus, require_next)

"""Text from a Hugging Face `datasets` split (wikitext on Colab): the one place the package reads one.

Two callers, two samplings of the same `text` column: `stats.dataset_corpus` streams the first n
texts for the key statistics C = E[k kᵀ] of ROME and MEMIT (Meng et al. used WikiText), and
`memories.texts_from_dataset` samples lines to search for the inputs that trigger FFN memories
(Geva et al., 2021, used WikiText-103). Both need `pip install datasets` and the network.
"""
from __future__ import annotations

from typing import Iterator


def dataset_texts(path: str, name: str | None, split: str, streaming: bool, caller: str,
                  offline: str) -> Iterator[str]:
    """The `text` of every row of `load_dataset(path, name, split=split, streaming=streaming)`, in order.

    Without `datasets` installed, raises ImportError at once, naming `caller` and what to use
    `offline` instead."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(f"{caller} needs `pip install datasets`; offline, use {offline}") from err
    return (row["text"] for row in load_dataset(path, name, split=split, streaming=streaming))

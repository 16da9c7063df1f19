"""Second-moment statistics of FFN keys, computed once and cached on disk.

ROME (Meng et al., 2022) needs `C = K Kᵀ`: how the keys k (the input of a layer's MLP
output projection) co-vary over a large sample of text. We estimate the mean
`C = E[k kᵀ]` (d_ff × d_ff; the scale cancels in ROME's update, MEMIT's λ is stated
for this normalisation) in batches, accumulating in float64 by default, and cache it
under a key made of everything C depends on (the values of every parameter that reaches
the layer, the layer, the texts' content, their number and the dtype), so the next edit
of the same layer starts at once and an edited or retrained model never gets a stale C.

Corpora: the Atlas training text offline (`atlas_corpus`), any list of strings, or a
Hugging Face `datasets` text split on Colab (`dataset_corpus`, e.g. wikitext).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .files import atomic_write
from .hooks import Recorder
from .models import (check_layer, d_ff, embedding_matrix, final_norm, get_block, get_device, get_module, n_layers)
from .progress import progress_bar
from .text_datasets import dataset_texts
from .validate import NonFiniteEditError, context_length, nonfinite_cause

CACHE_ENV = "KN_CACHE"


def cache_dir() -> Path:
    """`$KN_CACHE` if set, else `~/.cache/kn_tutorial`."""
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "kn_tutorial"))


def atlas_corpus(n: int, seed: int = 1) -> list[str]:
    """n Atlas training sequences (1-3 fact sentences each), drawn like the training data."""
    from .atlas.corpus import SequenceSampler
    from .atlas.world import load_world

    sampler = SequenceSampler(load_world(), seed=seed)
    return [sampler.text() for _ in range(n)]


def dataset_corpus(n: int, name: str = "wikitext", config: str = "wikitext-103-raw-v1",
                   split: str = "train", min_chars: int = 20) -> list[str]:
    """n non-empty texts of a Hugging Face `datasets` split (needs `datasets` and a network)."""
    rows = dataset_texts(name, config, split, streaming=True, caller="dataset_corpus", offline="atlas_corpus")
    return list(itertools.islice((text for text in rows if len(text.strip()) >= min_chars), n))


# --------------------------------------------------------------------------------------
# What the keys of a layer depend on: a hash of every parameter that reaches them
# --------------------------------------------------------------------------------------

def _digest(tensor: torch.Tensor) -> str:
    """blake2b of the tensor's bytes (read in place when the tensor is contiguous and on the CPU)."""
    raw = tensor.detach().contiguous().reshape(-1).cpu().view(torch.uint8).numpy()
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def reaching_parameters(model, layer: int) -> list[tuple[str, torch.Tensor]]:
    """The parameters the keys of `layer` depend on: all of them except the blocks after `layer`,
    `layer`'s own MLP output projection, the final norm and an untied unembedding."""
    layer = check_layer(model, layer)
    excluded: set[int] = set()
    for later in range(layer + 1, n_layers(model)):
        excluded.update(id(p) for p in get_block(model, later).parameters())
    excluded.update(id(p) for p in get_module(model, layer, "mlp_out").parameters())
    excluded.update(id(p) for p in final_norm(model).parameters())
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embedding_matrix(model):
        excluded.update(id(p) for p in head.parameters())
    return [(name, p) for name, p in model.named_parameters() if id(p) not in excluded]


def model_fingerprint(model, layer: int) -> str:
    """Hash of what the keys of `layer` depend on: the model's config and the bytes of every
    parameter that reaches the layer (`reaching_parameters`), hashed afresh on every call. Any
    edit of the embeddings, of an earlier block, or of this block's attention or key projection
    gives a new fingerprint, also one made through `.data` that keeps the sum (two rows
    swapped), which a cheaper signature (torch's version counter, the sum) would miss; an edit of
    this layer's output projection (what ROME writes) or of later layers does not (the keys do not
    depend on them). Cost: one pass over those bytes per call, 70 ms for Atlas's last layer (22 MB;
    blake2b read about 300 MB/s on a shared 2-core CPU, 2026-12-05), so about 8 s for gpt2-xl's
    layer 17 (2.5 GB of float32 parameters) at that rate."""
    h = hashlib.sha1()
    h.update(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    for name, param in reaching_parameters(model, layer):
        h.update(f"{name}:{_digest(param)};".encode())
    return h.hexdigest()[:16]


def texts_digest(texts: Sequence[str]) -> str:
    """Hash of the texts themselves (their order included)."""
    h = hashlib.sha1()
    for text in texts:
        h.update(hashlib.sha1(text.encode("utf-8")).digest())
    return h.hexdigest()[:16]


@torch.no_grad()
def compute_second_moment(model, tokenizer, layer: int, texts: Sequence[str], batch_size: int = 32,
                          max_length: int = 128, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, int]:
    """E[k kᵀ] over every (non-padding) token of `texts` at `layer`; returns (C, n_tokens).
    Texts are cut at max_length tokens (at most the model's context). Non-finite keys raise
    NonFiniteEditError naming the cause (e.g. a NaN weight before the layer)."""
    layer = check_layer(model, layer)
    max_length = min(max_length, context_length(model) or max_length)
    device = get_device(model)
    total = torch.zeros(d_ff(model), d_ff(model), dtype=dtype, device=device)
    n_tokens = 0
    bar = progress_bar(total=len(texts), desc=f"keys of layer {layer}")
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start:start + batch_size])
        enc = tokenizer(chunk, return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False).to(device)
        with Recorder(model, [("key", layer)]) as rec:
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        keys = rec[("key", layer)][enc.attention_mask.bool()].to(dtype)  # [tokens, d_ff]
        if not bool(torch.isfinite(keys).all()):
            bar.close()
            raise NonFiniteEditError(f"the keys of layer {layer} are not finite "
                                     f"({nonfinite_cause(model) or 'they overflow ' + str(dtype)}), "
                                     f"so their second moment C would be NaN; nothing was cached")
        total += keys.T @ keys
        n_tokens += keys.shape[0]
        bar.update(len(chunk))
    bar.close()
    if n_tokens == 0:
        raise ValueError("the corpus has no tokens")
    mom2 = (total / n_tokens).cpu()
    if not bool(torch.isfinite(mom2).all()):
        raise NonFiniteEditError(f"the second moment C of layer {layer} overflowed {dtype}; use dtype=torch.float64")
    return mom2, n_tokens


@torch.no_grad()
def collect_keys(model, tokenizer, layer: int, texts: Sequence[str], batch_size: int = 32,
                 max_length: int = 128) -> torch.Tensor:
    """The keys themselves, K as [d_ff, n_tokens] (float32, on the CPU), of every non-padding token
    of `texts` at `layer`: what C summarises (C = K Kᵀ / n_tokens over the same texts)."""
    layer = check_layer(model, layer)
    max_length = min(max_length, context_length(model) or max_length)
    device = get_device(model)
    chunks = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[start:start + batch_size]), return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length, add_special_tokens=False).to(device)
        with Recorder(model, [("key", layer)]) as rec:
            model(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        chunks.append(rec[("key", layer)][enc.attention_mask.bool()].float().cpu())  # [tokens, d_ff]
    return torch.cat(chunks).T


class StatsCacheError(RuntimeError):
    pass


def _safe_name(text: str, limit: int = 60) -> str:
    """A file-name piece: letters, digits, '.', '_' and '-' only, no leading dots, so a name like
    '../x' or '/abs' cannot leave the cache folder."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).lstrip(".")[:limit] or "x"


def _atomic_save(payload: dict, path: Path) -> None:
    """torch.save through `files.atomic_write`: readers see the old file or the whole new one,
    concurrent writers never share a temporary name, and an interrupted write leaves no file behind."""
    atomic_write(path, lambda f: torch.save(payload, f))


def second_moment(model, tokenizer, layer: int, corpus: str = "atlas", n_samples: int = 4000,
                  texts: Callable[[int], list[str]] | None = None, dtype: torch.dtype = torch.float64,
                  use_cache: bool = True, batch_size: int = 32) -> torch.Tensor:
    """Cached `C = E[k kᵀ]` of `layer`'s keys over `n_samples` texts of `corpus`.

    corpus: "atlas" (offline), "wikitext" (Colab), or any name together with `texts`, a
    function n -> list of n strings.

    The cache key is everything C depends on: `model_fingerprint` (the values of every parameter
    that reaches the layer, and the config), the layer, the texts themselves (a hash of their
    content, for "atlas" and for any `texts=`; "wikitext" without `texts` is keyed by its name,
    since reading it needs the network), n_samples and dtype. A cache file that cannot be read or
    whose stored key differs raises StatsCacheError instead of being used. Files are written
    atomically under `cache_dir()/stats`, with names reduced to safe characters. Non-finite keys
    raise NonFiniteEditError and nothing is cached.
    """
    layer = check_layer(model, layer)
    if texts is None:
        if corpus == "atlas":
            texts = atlas_corpus
        elif corpus == "wikitext":
            texts = dataset_corpus
        else:
            raise ValueError(f"unknown corpus {corpus!r}: use 'atlas', 'wikitext', or pass texts=")
    samples = None
    if texts is dataset_corpus:
        source = f"{dataset_corpus.__module__}.dataset_corpus (wikitext-103-raw-v1 train)"
    else:
        samples = texts(n_samples)
        if isinstance(samples, str) or not all(isinstance(t, str) for t in samples):
            raise TypeError("texts(n) must return a list of strings")
        source = texts_digest(samples)
    meta = {"fingerprint": model_fingerprint(model, layer), "model": str(model.config._name_or_path),
            "layer": layer, "corpus": str(corpus), "texts": source, "n_samples": n_samples, "dtype": str(dtype),
            "d_ff": d_ff(model)}
    key = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir() / "stats"
    name = (f"{_safe_name(Path(meta['model']).name or 'model')}-layer{layer}-{_safe_name(corpus)}-{n_samples}-"
            f"{str(dtype)[6:]}-{key}.pt")
    path = folder / name
    if path.resolve().parent != folder.resolve():  # cannot happen with _safe_name; never write elsewhere
        raise StatsCacheError(f"refusing to write the statistics cache outside {folder}: {path}")
    if use_cache and path.exists():
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise StatsCacheError(f"the statistics cache {path} is unreadable ({err}); delete it to recompute") from err
        if not isinstance(saved, dict) or saved.get("meta") != meta:
            found = saved.get("meta") if isinstance(saved, dict) else type(saved).__name__
            raise StatsCacheError(f"the statistics cache {path} was made for {found}, not {meta}; delete it to recompute")
        mom2 = saved["mom2"]
        if mom2.shape != (meta["d_ff"], meta["d_ff"]) or not torch.isfinite(mom2).all():
            raise StatsCacheError(f"the statistics cache {path} holds a bad matrix; delete it to recompute")
        return mom2
    if samples is None:
        samples = texts(n_samples)
    mom2, n_tokens = compute_second_moment(model, tokenizer, layer, samples, batch_size=batch_size, dtype=dtype)
    if use_cache:
        _atomic_save({"meta": meta, "mom2": mom2, "n_tokens": n_tokens}, path)
    return mom2

"""Second-moment statistics of FFN keys, computed once and cached on disk.

ROME (Meng et al., 2022) needs `C = K Kᵀ`: how the keys k (the input of a layer's MLP
output projection) co-vary over a large sample of text. We estimate the mean
`C = E[k kᵀ]` (d_ff × d_ff; the scale cancels in ROME's update, MEMIT's λ is stated
for this normalisation) in batches, accumulating in float64 by default, and cache it
under a key naming the model, the layer, the corpus and the sample size, so the next
edit of the same layer starts at once.

Corpora: the Atlas training text offline (`atlas_corpus`), any list of strings, or a
Hugging Face `datasets` text split on Colab (`dataset_corpus`, e.g. wikitext).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .hooks import Recorder
from .models import check_layer, d_ff, get_device, module_name
from .progress import progress_bar

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
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError("dataset_corpus needs `pip install datasets`; offline, use atlas_corpus") from err
    texts = []
    for row in load_dataset(name, config, split=split, streaming=True):
        if len(row["text"].strip()) >= min_chars:
            texts.append(row["text"])
        if len(texts) == n:
            break
    return texts


def model_fingerprint(model, layer: int) -> str:
    """Short hash of what the keys of `layer` depend on: the model's name, config and weights
    up to that layer's MLP input (a sample of their bytes), so a retrained model gets a new key."""
    h = hashlib.sha1()
    h.update(str(getattr(model.config, "_name_or_path", "")).encode())
    h.update(json.dumps(model.config.to_diff_dict(), sort_keys=True, default=str).encode())
    for name in (module_name(model, 0, "mlp_in"), module_name(model, layer, "mlp_in")):
        weight = model.get_submodule(name).weight.detach()
        h.update(weight.flatten()[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:12]


@torch.no_grad()
def compute_second_moment(model, tokenizer, layer: int, texts: Sequence[str], batch_size: int = 32,
                          max_length: int = 128, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, int]:
    """E[k kᵀ] over every (non-padding) token of `texts` at `layer`; returns (C, n_tokens)."""
    layer = check_layer(model, layer)
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
        total += keys.T @ keys
        n_tokens += keys.shape[0]
        bar.update(len(chunk))
    bar.close()
    if n_tokens == 0:
        raise ValueError("the corpus has no tokens")
    return (total / n_tokens).cpu(), n_tokens


@torch.no_grad()
def collect_keys(model, tokenizer, layer: int, texts: Sequence[str], batch_size: int = 32,
                 max_length: int = 128) -> torch.Tensor:
    """The keys themselves, K as [d_ff, n_tokens] (float32, on the CPU), of every non-padding token
    of `texts` at `layer`: what C summarises (C = K Kᵀ / n_tokens over the same texts)."""
    layer = check_layer(model, layer)
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


def second_moment(model, tokenizer, layer: int, corpus: str = "atlas", n_samples: int = 4000,
                  texts: Callable[[int], list[str]] | None = None, dtype: torch.dtype = torch.float64,
                  use_cache: bool = True, batch_size: int = 32) -> torch.Tensor:
    """Cached `C = E[k kᵀ]` of `layer`'s keys over `n_samples` texts of `corpus`.

    corpus: "atlas" (offline), "wikitext" (Colab), or any name together with `texts`, a
    function n -> list of n strings. A cache file that cannot be read or that was made for
    another model, layer, corpus or size raises StatsCacheError instead of being used.
    """
    layer = check_layer(model, layer)
    meta = {"fingerprint": model_fingerprint(model, layer), "model": str(model.config._name_or_path),
            "layer": layer, "corpus": corpus, "n_samples": n_samples, "dtype": str(dtype),
            "d_ff": d_ff(model)}
    slug = Path(meta["model"]).name or "model"
    path = cache_dir() / "stats" / f"{slug}-{meta['fingerprint']}-layer{layer}-{corpus}-{n_samples}-{str(dtype)[6:]}.pt"
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
    if texts is None:
        if corpus == "atlas":
            texts = atlas_corpus
        elif corpus == "wikitext":
            texts = dataset_corpus
        else:
            raise ValueError(f"unknown corpus {corpus!r}: use 'atlas', 'wikitext', or pass texts=")
    mom2, n_tokens = compute_second_moment(model, tokenizer, layer, texts(n_samples),
                                           batch_size=batch_size, dtype=dtype)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"meta": meta, "mom2": mom2, "n_tokens": n_tokens}, tmp)
        tmp.replace(path)  # atomic: a crash never leaves a half-written cache file
    return mom2

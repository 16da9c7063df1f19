"""The corruption of causal tracing: Gaussian noise on the subject's token embeddings (Meng et
al., 2022, "Locating and Editing Factual Associations in GPT", section 2.1).

The corrupted run adds ε_t ~ N(0, ν² I) to the input of block 0 at every subject token t in
[a, b), with ν = noise · σ and σ the standard deviation of the token embeddings (the paper: noise
= 3). The noise of a prompt depends only on the seed and the prompt's tokens, so a prompt gets
the same noise alone or in a batch, on any device. `tracing` builds the clean, corrupted and
restored runs on it; its names are re-exported there (`from kn_tutorial.tracing import noise_level`).
"""
from __future__ import annotations

import zlib

import torch
from torch import Tensor

from .models import embedding_matrix
from .validate import NonFiniteEditError, require_finite


def noise_level(model, noise: float = 3.0) -> float:
    """ν = noise · σ, with σ the standard deviation of all entries of the token embedding matrix.

    Rows (tokens) with a NaN or infinite entry are left out of σ, so one broken row cannot turn
    the noise scale into NaN; a prompt that uses such a token is refused by the trace itself
    (`_check_embeddings`). With every row finite this is the std of the whole matrix."""
    require_finite("noise", noise, "It is a multiple of the embeddings' std (the paper: 3).")
    embeddings = embedding_matrix(model).detach().float()
    finite_rows = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite_rows.all()):
        if not bool(finite_rows.any()):
            raise NonFiniteEditError("every row of the token embedding matrix has a non-finite entry: "
                                     "no noise scale can be measured")
        embeddings = embeddings[finite_rows]
    return noise * embeddings.std().item()


def _check_embeddings(model, input_ids: Tensor) -> None:
    """Refuse prompts whose tokens have a non-finite embedding row (their trace would be NaN)."""
    embeddings = embedding_matrix(model).detach()
    ids = input_ids.unique().cpu()
    bad = ids[~torch.isfinite(embeddings[ids.to(embeddings.device)]).all(dim=1).cpu()]
    if len(bad):
        raise NonFiniteEditError(f"the token embedding row(s) {bad.tolist()} used by the prompt are not finite; "
                                 "the model is broken there (reload it)")


def _noise_seed(seed: int, ids: Tensor) -> int:
    """A seed from `seed` and the prompt's tokens only (not its place in a batch)."""
    return (seed * 1_000_003 + zlib.crc32(ids.detach().cpu().to(torch.int64).numpy().tobytes())) % 2**62


def subject_noise(input_ids: Tensor, span: tuple[int, int], d_model: int, samples: int,
                  scale: float, seed: int = 0) -> Tensor:
    """ε for one prompt: [samples, T, d_model], N(0, scale²) on the subject tokens, 0 elsewhere.

    Drawn on the CPU from a torch.Generator seeded by (seed, the prompt's tokens), so the same
    prompt gets the same noise on every device and in every batch.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    start, end = span
    if not 0 <= start < end <= len(ids):
        raise ValueError(f"subject span {span} is not inside a prompt of {len(ids)} tokens")
    gen = torch.Generator().manual_seed(_noise_seed(seed, ids))
    noise = torch.zeros(samples, len(ids), d_model)
    noise[:, start:end] = scale * torch.randn(samples, end - start, d_model, generator=gen)
    return noise

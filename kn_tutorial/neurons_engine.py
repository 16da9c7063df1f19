"""Suppressing and amplifying knowledge neurons, many rows at once (the definition: `neurons`;
Dai et al., 2022, section 4).

How it is fast (none of this changes the numbers; the tests compare every row with
hooks.set_neurons on one prompt at a time): each (prompt, target) row carries its own set of
neurons and its own factor. Per layer that any row touches, one [rows, d_ff] tensor of
multipliers (1 where untouched) is built, and one hook on that layer's "key" multiplies the
key activations of every row at once, at the row's last prompt token (or at every token). A
whole experiment (a fact's knowledge neurons, their random control, suppress and amplify, on
the fact's own prompts and on other facts) is then one `scoring.score` call per batch of rows.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch
from torch import Tensor

from .hooks import patch
from .models import check_layer, d_ff, get_device
from .scoring import score
from .validate import require_finite

Neuron = tuple[int, int]  # (layer, index into the layer's d_ff neurons)


def _prompt_lengths(tokenizer, prompts: Sequence[str]) -> list[int]:
    return [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]


@torch.no_grad()
def scaled_scores(model, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                  row_neurons: Sequence[Sequence[Neuron]], factors: float | Sequence[float],
                  positions: str = "last", batch_size: int = 256) -> dict[str, Tensor]:
    """Score each (prompt, target) with its own neurons' activations multiplied by a factor.

    Row r: the key activations of `row_neurons[r]` (0 suppresses, 2 amplifies) are
    multiplied by factors[r] at the last prompt token (positions="last", Dai et al.'s
    intervention, where the answer is predicted) or at every token (positions="all",
    which equals editing the weights, see `scale_value_slots`). Returns `scoring.score`'s
    dict: logprob (summed over the target's tokens, teacher forcing), first_prob, ... [rows].
    """
    if positions not in ("last", "all"):
        raise ValueError(f"positions must be 'last' or 'all', got {positions!r}")
    n = len(prompts)
    if not (len(targets) == len(row_neurons) == n):
        raise ValueError(f"{n} prompts, {len(targets)} targets and {len(row_neurons)} neuron lists: need one each")
    factors = [float(factors)] * n if isinstance(factors, (int, float)) else [float(f) for f in factors]
    if len(factors) != n:
        raise ValueError(f"{n} prompts but {len(factors)} factors: give one factor, or one per prompt")
    for f in factors:
        require_finite("factor", f, "0 suppresses the neurons, 2 amplifies them.")
    width, device = d_ff(model), get_device(model)
    parts = []
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        scale: dict[int, Tensor] = {}  # layer -> [b, d_ff] multipliers (1 = untouched)
        for b, r in enumerate(rows):
            for layer, neuron in row_neurons[r]:
                layer = check_layer(model, layer)
                if not 0 <= neuron < width:
                    raise IndexError(f"neuron {neuron} out of range: layers have {width} neurons")
                if layer not in scale:
                    scale[layer] = torch.ones(len(rows), width, device=device)
                scale[layer][b, neuron] = factors[r]
        last = torch.tensor(_prompt_lengths(tokenizer, [prompts[r] for r in rows]), device=device) - 1  # [b]

        def edit(layer: int):
            def fn(key: Tensor) -> Tensor:  # key: [b, s, d_ff]
                factor = scale[layer].to(key.dtype)
                if positions == "all":
                    return key * factor[:, None, :]
                new = key.clone()
                at = torch.arange(len(key), device=key.device)
                new[at, last] = key[at, last] * factor
                return new
            return fn

        with ExitStack() as stack:
            for layer in scale:
                stack.enter_context(patch(model, "key", layer, edit(layer)))
            parts.append(score(model, tokenizer, [prompts[r] for r in rows], [targets[r] for r in rows],
                               batch_size=len(rows)))
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

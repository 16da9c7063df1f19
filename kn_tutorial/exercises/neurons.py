"""Checks for the exercises of chapter 4, "Knowledge neurons" (Dai et al., 2022). Notation:
Attr_j(w_i^(l)) the attribution of neuron i of layer l on prompt j of a fact's n prompts;
coarse neurons Attr_j > t · max Attr_j; knowledge neurons: coarse for more than p·n prompts.

    check_refine(refine)                                  # exercise 1: threshold, then share of prompts
    check_adapt_p(adapt_p)                                # exercise 2: the adaptive p
    check_kn_update(kn_update, model, tokenizer)          # exercise 3: Dai et al.'s update of value slots

Each returns True when the student's function matches the reference, prints a reminder and
returns False while the stub still raises NotImplementedError, and raises an AssertionError
that says what differs otherwise.
"""
from __future__ import annotations

import torch

from .. import neurons as reference
from ..models import value_matrix
from ..weights import preserve
from . import TODO
from . import run_stub as _run


def _attribution_cases() -> list[torch.Tensor]:
    """Noise plus neurons shared by many prompts (what refinement should find)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (4, 7, 10):
        attr = 0.1 * torch.randn(n, 3, 32, generator=g) ** 3  # [n, L, d_ff]
        share = torch.rand(n, 4, generator=g)  # prompt j uses shared neuron k when share < 0.2 k + 0.1
        for k, (layer, neuron) in enumerate([(0, 3), (1, 5), (2, 7), (2, 30)]):
            attr[:, layer, neuron] += (share[:, k] < 0.2 * k + 0.1).float() * (0.5 + torch.rand(n, generator=g))
        cases.append(attr)
    scaled = cases[1].clone()
    scaled[2] *= 100  # one prompt with much larger scores: the threshold is per prompt
    negative = cases[2].clone()
    negative[5] = -negative[5].abs()  # a prompt whose best score is negative keeps nothing
    return cases + [scaled, negative]


def check_refine(refine) -> bool:
    """refine(attributions [n, L, d_ff], threshold, p) -> the knowledge neurons as (layer, neuron) pairs."""
    for k, attr in enumerate(_attribution_cases()):
        for p in (0.3, 0.5, 0.7):
            got = _run(refine, attr.clone(), 0.2, p)
            if got is None:
                return False
            got = {(int(l), int(i)) for l, i in got}
            want = set(reference.refine(attr, 0.2, p))
            if got != want:
                counts = reference.prompt_counts(attr, 0.2)
                hint = ""
                global_top = attr.max()
                by_global = {(l, i) for l, i in (((attr > 0.2 * global_top).sum(0) > p * attr.shape[0]).nonzero().tolist())}
                if got == by_global:
                    hint = " You compared with the largest score of all prompts; t multiplies each prompt's own maximum."
                elif got == {(l, i) for l, i in (counts >= p * attr.shape[0] - 1e-9).nonzero().tolist()}:
                    hint = " A neuron must be kept by MORE than p·n prompts (strictly)."
                raise AssertionError(
                    f"case {k} (n = {attr.shape[0]} prompts), p = {p}: you returned {len(got)} neurons, expected "
                    f"{len(want)}; missing {sorted(want - got)[:5]}, extra {sorted(got - want)[:5]}.{hint} Steps: per "
                    f"prompt keep Attr > t · (that prompt's max), none if the max is not positive; count the prompts "
                    f"that keep each neuron; return the neurons with count > p · n.")
    print("Correct: your refinement matches the package's on five attribution sets and three values of p.")
    return True


def _count_cases():
    one = lambda rows: torch.tensor([rows])  # noqa: E731 (one layer of counts)
    return [
        ([one([10, 10, 9, 9, 8, 8, 8, 8]), one([10, 9, 9, 9, 9, 8, 8, 8]), one([9, 9, 8, 8, 8, 8, 8, 8])], [10, 10, 10]),
        ([one([5, 3, 3, 3, 0]), one([4, 3, 3, 0, 0])], [5, 5]),
        ([one([5, 4, 4, 3, 3, 1]), one([5, 5, 3, 2, 0, 0])], [5, 5]),
    ]


def check_adapt_p(adapt_p) -> bool:
    """adapt_p(counts, n_prompts) -> p: counts is a list of int [L, d_ff] tensors (prompts per
    neuron for each fact), n_prompts the list of n; start at 0.7, move by 0.05 until the mean
    number of neurons with count > p·n lies in [2, 5]."""
    for k, (counts, n) in enumerate(_count_cases()):
        got = _run(adapt_p, counts, n)
        if got is None:
            return False
        want = reference.adapt_p(counts, n)
        if abs(float(got) - want.p) > 1e-6:
            trail = ", ".join(f"p = {p:.2f}: {m:.2f}" for p, m in want.history)
            raise AssertionError(
                f"case {k}: got p = {float(got):.2f}, expected {want.p:.2f}. The mean number of neurons per fact "
                f"along the way: {trail}. Move p up while the mean is above 5, down while below 2; round p "
                f"(0.7 + 0.05 + 0.05 is not exactly 0.8 in floating point).")
    print("Correct: your adaptive p matches on three hand-built sets (moving up, down, and not at all).")
    return True


def check_kn_update(kn_update, model, tokenizer, neurons=((0, 3), (1, 7)), old: str = " Asia", new: str = " Europe",
                    lambda_old: float = 1.0, lambda_new: float = 8.0) -> bool:
    """kn_update(model, tokenizer, neurons, old, new, lambda_old, lambda_new) changes the value
    slots of `neurons` in place by Dai et al.'s rule. The model is restored afterwards."""
    neurons = [tuple(n) for n in neurons]
    request = {"prompt": "{} lies on the continent of", "subject": "Kuwait",
               "target_new": {"str": new.strip()}, "target_true": {"str": old.strip()}}
    with preserve(model) as snapshot:
        with reference.kn_edit(model, tokenizer, request, neurons=neurons, lambda_old=lambda_old, lambda_new=lambda_new):
            want = {n: value_matrix(model, n[0])[n[1]].detach().clone() for n in neurons}
        before = {n: value_matrix(model, n[0])[n[1]].detach().clone() for n in neurons}
        try:
            with torch.no_grad():
                kn_update(model, tokenizer, list(neurons), old, new, lambda_old, lambda_new)
        except NotImplementedError:
            print(TODO)
            return False
        for n in neurons:
            got = value_matrix(model, n[0])[n[1]].detach()
            if not torch.allclose(got, want[n], atol=1e-5):
                hint = ""
                if torch.allclose(got, before[n]):
                    hint = " The weights did not change: edit the parameter in place (value_matrix is a view)."
                elif torch.allclose(got - before[n], -(want[n] - before[n]), atol=1e-5):
                    hint = " The sign is flipped: subtract the old object's embedding, add the new one's."
                raise AssertionError(
                    f"value slot {n}: differs from the reference by up to {(got - want[n]).abs().max():.3g}.{hint} "
                    f"v_i ← v_i − λ_old · e(old) + λ_new · e(new), e = rows of unembedding_matrix(model) for the "
                    f"first token of each object, with its leading space.")
        others = [name for name in snapshot.changed()
                  if not any(f".{layer}." in name for layer, _ in neurons)]
        if others:
            raise AssertionError(f"you also changed {others}: only the value slots of the given neurons should change.")
    print("Correct: your update matches Dai et al.'s rule (and the model is restored).")
    return True

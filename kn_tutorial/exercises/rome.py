"""Checks for the exercises of chapter 6, "Editing a fact with ROME" (Meng et al., 2022).
Notation: W [d_model, d_ff] with W k = v (bias left out), C = E[k kᵀ], the new pair (k*, v*),
Ŵ = W + Λ (C⁻¹k*)ᵀ with Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*).

    check_rank_one_update(rank_one_update)            # exercise 1: the closed form
    check_k_star(k_star, model, tokenizer)            # exercise 2: the subject's key over prefixes
    check_efficacy(efficacy, model, tokenizer, case)  # exercise 3: ES and EM of one case

Each returns True when the student's function matches the reference, prints a reminder and
returns False while the stub still raises NotImplementedError, and raises an AssertionError that
says what differs otherwise.
"""
from __future__ import annotations

import torch

from .. import rome
from ..evaluation import evaluate_cases
from ..models import n_layers
from . import run_stub as _run


def _problem(seed: int, d_model: int = 5, d_ff: int = 12, n: int = 300):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_ff, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d_ff, dtype=torch.float64)[:, None]
    return (torch.randn(d_model, d_ff, generator=g, dtype=torch.float64), keys @ keys.T / n,
            torch.randn(d_ff, generator=g, dtype=torch.float64), torch.randn(d_model, generator=g, dtype=torch.float64))


def check_rank_one_update(rank_one_update) -> bool:
    """rank_one_update(W, C, k_star, v_star) -> Ŵ (a new tensor; W unchanged), float64 inputs."""
    for seed in range(3):
        weight, mom2, k_star, v_star = _problem(seed)
        original = weight.clone()
        got = _run(rank_one_update, weight, mom2, k_star, v_star)
        if got is None:
            return False
        got = torch.as_tensor(got, dtype=torch.float64)
        assert torch.equal(weight, original), "Do not change W in place: return Ŵ as a new tensor (W + ...)."
        want = original + rome.rank_one_update(original.clone(), mom2, k_star, v_star - original @ k_star)
        if got.shape != want.shape:
            raise AssertionError(f"Ŵ should have W's shape {tuple(want.shape)}, got {tuple(got.shape)}.")
        if not torch.allclose(got, want, rtol=1e-6, atol=1e-8):
            hint = ""
            if torch.allclose(got @ k_star, v_star, rtol=1e-6, atol=1e-8):
                hint = (" Your Ŵ satisfies Ŵk* = v*, but it is not the smallest change: the direction of the "
                        "update must be C⁻¹k*, not k* itself.")
            raise AssertionError(f"seed {seed}: Ŵ differs from the closed form by "
                                 f"{(got - want).abs().max().item():.2e}.{hint} Recall u = C⁻¹k* (torch.linalg.solve), "
                                 "Λ = (v* − W k*) / (uᵀ k*), Ŵ = W + Λ uᵀ (torch.outer).")
    print("Correct: your update is ROME's closed form (three random problems).")
    return True


def check_k_star(k_star, model, tokenizer, prompt: str = "{} lies on the continent of", subject: str = "Kuwait") -> bool:
    """k_star(model, tokenizer, prompt, subject, layer, prefixes) -> [d_ff]: the key at the subject's
    last token, averaged over the prompts prefix + prompt.format(subject)."""
    prefixes = rome.sample_prefixes(model, tokenizer, ((5, 3),), seed=0)
    for layer in sorted({0, n_layers(model) // 2}):
        got = _run(k_star, model, tokenizer, prompt, subject, layer, prefixes)
        if got is None:
            return False
        got = torch.as_tensor(got).detach().float().cpu().reshape(-1)
        want = rome.compute_k_star(model, tokenizer, prompt, subject, layer, prefixes).cpu()
        if got.shape != want.shape:
            raise AssertionError(f"layer {layer}: k* should have shape {tuple(want.shape)} ([d_ff]), got {tuple(got.shape)}.")
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()):
            raise AssertionError(
                f"layer {layer}: your k* differs from the reference by {(got - want).abs().max().item():.3g}. Check: the "
                "site is 'key' (the input of the MLP output projection); the position is the subject's LAST token "
                "(kn_tutorial.tokens.subject_span; the prefix may mention the subject too, so use occurrence=-1); "
                "the mean is over all prefixes, including the empty one.")
    print("Correct: your k* matches the reference at two layers.")
    return True


def check_efficacy(efficacy, model, tokenizer, case: dict) -> bool:
    """efficacy(model, tokenizer, case) -> (ES, EM) for the case's rewrite prompt: ES = 1.0 if
    P(o*) > P(o_c) else 0.0, EM = P(o*) − P(o_c), P the length-normalised target probability."""
    got = _run(efficacy, model, tokenizer, case)
    if got is None:
        return False
    (row,) = evaluate_cases(model, tokenizer, [case])
    es, em = (float(x) for x in got)
    if es != row["ES"] or abs(em - row["EM"]) > 1e-4:
        raise AssertionError(
            f"expected ES {row['ES']:.0f}, EM {row['EM']:.5f}; got ES {es:.0f}, EM {em:.5f}. Check: each target is "
            "scored with its leading space; a multi-token target by teacher forcing, P = exp(mean over its tokens "
            "of log P(o_j | prompt, o_<j)) (kn_tutorial.scoring.score's 'mean_logprob').")
    print("Correct: ES and EM match evaluate_cases.")
    return True

"""Checks for the exercises of chapter 3, "Knowledge attribution by integrated gradients"
(Dai et al., 2022). Notation: Attr(w_i^(l)) = w̄_i^(l) ∫₀¹ ∂P_x(α w̄^(l))/∂w_i^(l) dα ≈
w̄_i/m Σ_k ∂P_x(α_k w̄)/∂w_i, with w̄^(l) the layer's neuron activations at the last prompt token.

    check_riemann_alphas(riemann_alphas)                 # exercise 1: the points α_k
    check_layer_ig(layer_ig, model, tokenizer)           # exercise 2: one layer's IG in one batch
    check_probability_gap(probability_gap, model, tokenizer)  # exercise 3: what Σ_i Attr approaches

Each returns True when the student's function matches the reference, prints a reminder
and returns False while the stub still raises NotImplementedError, and raises an
AssertionError that says what differs otherwise.
"""
from __future__ import annotations

import torch

from .. import attribution as reference
from ..models import n_layers
from . import run_stub as _run

PROMPT, TARGET = "Kuwait lies on the continent of", " Asia"


def check_riemann_alphas(riemann_alphas) -> bool:
    """riemann_alphas(steps, rule) -> the m points α_k for rule "left", "right" or "midpoint"."""
    for rule in reference.RULES:
        for steps in (1, 4, 20):
            got = _run(riemann_alphas, steps, rule)
            if got is None:
                return False
            got = torch.as_tensor(got, dtype=torch.float64).reshape(-1)
            want = reference.riemann_alphas(steps, rule)
            if got.shape != want.shape or not torch.allclose(got, want):
                raise AssertionError(
                    f"rule {rule!r}, steps {steps}: got {[round(a, 4) for a in got.tolist()]}, expected "
                    f"{[round(a, 4) for a in want.tolist()]}. The m points split [0, 1] into m equal "
                    f"pieces of width 1/m and take each piece's left end, right end or middle.")
    print("Correct: left, right and midpoint points match for m = 1, 4 and 20.")
    return True


def check_layer_ig(layer_ig, model, tokenizer, prompt: str = PROMPT, target: str = TARGET,
                   steps: int = 8) -> bool:
    """layer_ig(model, tokenizer, prompt, target, layer, steps) -> [d_ff] attributions for the
    first target token, right Riemann rule, compared with the package at two layers."""
    for layer in sorted({0, n_layers(model) - 1}):
        got = _run(layer_ig, model, tokenizer, prompt, target, layer, steps)
        if got is None:
            return False
        got = torch.as_tensor(got).detach().float().cpu().reshape(-1)
        want = reference.integrated_gradients(model, tokenizer, prompt, target, steps=steps, layers=[layer],
                                              rule="right", target_tokens="first")[0]
        if got.shape != want.shape:
            raise AssertionError(f"layer {layer}: got shape {tuple(got.shape)}, expected {tuple(want.shape)} ([d_ff]).")
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        if err > 1e-4 * scale + 1e-9:
            hint = ""
            if torch.allclose(got / steps, want, rtol=1e-3, atol=1e-4 * scale):
                hint = " Your values are m times too large: divide the summed gradients by m."
            elif torch.allclose(got, want / reference.key_activations(model, tokenizer, prompt, [layer])[0].clamp_min(1e-30),
                                rtol=1e-2, atol=1e-3 * scale):
                hint = " Multiply the averaged gradient by w̄ (the unscaled activations)."
            raise AssertionError(
                f"layer {layer}: attributions differ from the reference by up to {err:.3g} (largest "
                f"attribution {scale:.3g}).{hint} Check: α_k = k/m for k = 1..m; only the last prompt "
                f"token's activations are scaled, all neurons of the layer together; P is the softmax "
                f"probability (not the logit) of the target's first token, with its leading space.")
    print(f"Correct: your integrated gradients match the package's at layers 0 and {n_layers(model) - 1}.")
    return True


def check_probability_gap(probability_gap, model, tokenizer, prompt: str = PROMPT, target: str = TARGET) -> bool:
    """probability_gap(model, tokenizer, prompt, target, layer) -> P(w̄) − P(0) for the first
    target token, at every layer."""
    want = None
    for layer in range(n_layers(model)):
        got = _run(probability_gap, model, tokenizer, prompt, target, layer)
        if got is None:
            return False
        if want is None:
            want = reference.probability_gap(model, tokenizer, prompt, target, target_tokens="first")
        got = float(got)
        if abs(got - want[layer].item()) > 1e-4 * want.abs().max().item() + 1e-7:
            hint = (" The sign is flipped: it is P(w̄) − P(0)." if abs(got + want[layer].item()) < 1e-4 else
                    " Zero every neuron of the layer (all d_ff of them), at the last prompt token only.")
            raise AssertionError(f"layer {layer}: got {got:.6f}, expected {want[layer].item():.6f}.{hint}")
    print("Correct: P(w̄) − P(0) matches at every layer.")
    return True

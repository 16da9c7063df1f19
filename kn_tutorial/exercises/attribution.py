"""Checks for the exercises of chapter 3, "Knowledge attribution by integrated gradients"
(Dai et al., 2022). Notation: Attr(w_i^(l)) = w̄_i^(l) ∫₀¹ ∂P_x(α w̄^(l))/∂w_i^(l) dα ≈
w̄_i/m Σ_k ∂P_x(α_k w̄)/∂w_i, with w̄^(l) the layer's neuron activations at the last prompt token.

    check_riemann_alphas(riemann_alphas)                 # the points α_k
    check_layer_ig(layer_ig, model, tokenizer)           # one layer's IG in one batch
    check_probability_gap(probability_gap, model, tokenizer)  # what Σ_i Attr approaches
    check_activation_times_gradient(fn, model, tokenizer)  # the one-step baseline of section 5

Each runs the student's function through `harness.call` (weights and inputs restored, a time
limit, the package's own function disabled) on several cases, one of them never shown in the
chapter. It returns True when the function matches the reference, prints a reminder and
returns None (nothing for a notebook to print) while the stub still raises NotImplementedError, and raises an ExerciseError
saying what differs otherwise.
"""
from __future__ import annotations

import torch

from .. import attribution as reference
from ..models import d_ff, n_layers
from .harness import NOT_DONE, ExerciseError, call, close, is_close, number_result, tensor_result

IG_SOLUTIONS = (reference.integrated_gradients, reference.integrated_gradients_naive,
                reference.integrated_gradients_ladder, reference.activation_times_gradient)

PROMPT, TARGET = "Kuwait lies on the continent of", " Asia"


def check_riemann_alphas(riemann_alphas) -> bool | None:
    """riemann_alphas(steps, rule) -> the m points α_k for rule "left", "right" or "midpoint"."""
    for rule in reference.RULES:
        for steps in (1, 4, 20, 7):
            got = call(riemann_alphas, steps, rule, forbid=(reference.riemann_alphas,), what="my_riemann_alphas")
            if got is NOT_DONE:
                return None
            want = reference.riemann_alphas(steps, rule)
            got = tensor_result(got, None, "my_riemann_alphas", f"{steps} points", dtype=torch.float64).reshape(-1)
            if got.shape != want.shape or not torch.allclose(got, want):
                raise ExerciseError(
                    f"rule {rule!r}, steps {steps}: got {[round(a, 4) for a in got.tolist()]}, expected "
                    f"{[round(a, 4) for a in want.tolist()]}. The m points split [0, 1] into m equal "
                    f"pieces of width 1/m and take each piece's left end, right end or middle.")
    print("Correct: left, right and midpoint points match for m = 1, 4, 20 and 7.")
    return True


def check_layer_ig(layer_ig, model, tokenizer, prompt: str = PROMPT, target: str = TARGET,
                   steps: int = 8) -> bool:
    """layer_ig(model, tokenizer, prompt, target, layer, steps) -> [d_ff] attributions for the
    first target token, right Riemann rule, compared with the package at two layers."""
    cases = [(prompt, target, layer, steps) for layer in sorted({0, n_layers(model) - 1})]
    cases.append(("The capital of Peru is", " Lima", n_layers(model) // 2, 5))  # not shown in the chapter
    for prompt, target, layer, steps in cases:
        got = call(layer_ig, model, tokenizer, prompt, target, layer, steps, model=model, forbid=IG_SOLUTIONS,
                   what="my_layer_ig")
        if got is NOT_DONE:
            return None
        got = tensor_result(got, (d_ff(model),), "my_layer_ig", "[d_ff] attributions", dtype=torch.float32)
        want = reference.integrated_gradients(model, tokenizer, prompt, target, steps=steps, layers=[layer],
                                              rule="right", target_tokens="first")[0]
        scale = want.abs().max().item()
        err = (got - want).abs().max().item()
        if err > 1e-4 * scale + 1e-9:
            hint = ""
            if torch.allclose(got / steps, want, rtol=1e-3, atol=1e-4 * scale):
                hint = " Your values are m times too large: divide the summed gradients by m."
            else:
                w_bar = reference.key_activations(model, tokenizer, prompt, [layer])[0]
                live = w_bar.abs() > 1e-3 * w_bar.abs().max()
                grad = want[live] / w_bar[live]  # the averaged gradient the reference multiplied by w̄
                if torch.allclose(got[live], grad, rtol=1e-2, atol=1e-3 * grad.abs().max().item()):
                    hint = " Multiply the averaged gradient by w̄ (the unscaled activations)."
            raise ExerciseError(
                f"{prompt!r}, layer {layer}: attributions differ from the reference by up to {err:.3g} (largest "
                f"attribution {scale:.3g}).{hint} Check: α_k = k/m for k = 1..m; only the last prompt "
                f"token's activations are scaled, all neurons of the layer together; P is the softmax "
                f"probability (not the logit) of the target's first token, with its leading space.")
    print(f"Correct: your integrated gradients match the package's at layers 0 and {n_layers(model) - 1}, "
          f"and on a second prompt.")
    return True


def check_probability_gap(probability_gap, model, tokenizer, prompt: str = PROMPT, target: str = TARGET) -> bool | None:
    """probability_gap(model, tokenizer, prompt, target, layer) -> P(w̄) − P(0) for the first
    target token, at every layer."""
    want = reference.probability_gap(model, tokenizer, prompt, target, target_tokens="first")
    for layer in range(n_layers(model)):
        got = call(probability_gap, model, tokenizer, prompt, target, layer, model=model,
                   forbid=(reference.probability_gap, reference.path_probabilities), what="my_probability_gap")
        if got is NOT_DONE:
            return None
        got = number_result(got, "my_probability_gap", "P(w̄) − P(0), one number")
        if abs(got - want[layer].item()) > 1e-4 * want.abs().max().item() + 1e-7:
            hint = (" The sign is flipped: it is P(w̄) − P(0)." if abs(got + want[layer].item()) < 1e-4 else
                    " Zero every neuron of the layer (all d_ff of them), at the last prompt token only.")
            raise ExerciseError(f"layer {layer}: got {got:.6f}, expected {want[layer].item():.6f}.{hint}")
    print("Correct: P(w̄) − P(0) matches at every layer.")
    return True


def check_activation_times_gradient(activation_times_gradient, model, tokenizer, prompt: str = PROMPT,
                                    target: str = TARGET) -> bool:
    """activation_times_gradient(model, tokenizer, prompt, target, layer) -> [d_ff]: w̄_i · ∂P/∂w_i
    at w̄ for the first target token; at two layers of the chapter's fact and on a second prompt."""
    cases = [(prompt, target, layer) for layer in sorted({0, n_layers(model) - 1})]
    cases.append(("The capital of Peru is", " Lima", n_layers(model) // 2))  # not shown in the chapter
    for text, obj, layer in cases:
        got = call(activation_times_gradient, model, tokenizer, text, obj, layer, model=model, forbid=IG_SOLUTIONS,
                   what="my_activation_times_gradient")
        if got is NOT_DONE:
            return None
        got = tensor_result(got, (d_ff(model),), "my_activation_times_gradient", "[d_ff] scores", dtype=torch.float32)
        want = reference.activation_times_gradient(model, tokenizer, text, obj, layers=[layer], target_tokens="first")[0]
        if not is_close(got, want, torch.float32, factor=5):
            w_bar = reference.key_activations(model, tokenizer, text, [layer])[0]
            live = w_bar.abs() > 1e-3 * w_bar.abs().max()
            hint = ""
            if torch.allclose(got[live], want[live] / w_bar[live], rtol=1e-2, atol=1e-3 * got.abs().max().item()):
                hint = "You returned the gradient alone: multiply it by w̄."
            close(got, want, f"{text!r}, layer {layer}", hint + " The gradient is taken at the real activations "
                  "w̄ (α = 1), of the softmax probability of the target's first token, with respect to the layer's "
                  "activations at the last prompt token only.", torch.float32, factor=5)
    print("Correct: activation × gradient matches integrated gradients with one right-Riemann step.")
    return True

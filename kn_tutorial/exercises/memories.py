"""Checks for the exercises of chapter 1, "Feed-forward layers are key-value memories"
(Geva et al., 2021). Notation: FF(x) = f(x K^T + b_K) V + b_V, p_i = softmax(v_i E).

    check_ffn_output(ffn_output, model)            # exercise 1: the FFN from K and V
    check_value_top_tokens(value_top_tokens, model) # exercise 2: p_i's top tokens
    check_agreement_rate(agreement_rate)           # exercise 3: Geva's agreement rate

Each returns True when the student's function matches the reference, prints a reminder
and returns False while the stub still raises NotImplementedError, and raises an
AssertionError that says what differs otherwise.
"""
from __future__ import annotations

import torch

from ..memories import value_top_tokens as reference_value_top_tokens
from ..models import d_model, get_module, n_layers

from . import run_stub as _run


@torch.no_grad()
def check_ffn_output(ffn_output, model, seed: int = 0) -> bool:
    """ffn_output(model, layer, x) must equal the MLP module applied to x, for every layer."""
    gen = torch.Generator().manual_seed(seed)
    for layer in range(n_layers(model)):
        mlp = get_module(model, layer, "mlp")
        x = torch.randn(3, d_model(model), generator=gen).to(next(mlp.parameters()))  # [3, d_model]
        got = _run(ffn_output, model, layer, x)
        if got is None:
            return False
        want = mlp(x)
        assert got.shape == want.shape, (
            f"layer {layer}: ffn_output returned shape {tuple(got.shape)}, expected {tuple(want.shape)} "
            f"([..., d_model]): did you return the coefficients m instead of m @ V + b_V?")
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4):
            err = (got - want).abs().max().item()
            raise AssertionError(
                f"layer {layer}: ffn_output differs from the MLP by up to {err:.3g}. Check: K and V "
                f"in [d_ff, d_model] orientation (models.key_matrix / value_matrix), the key bias b_K "
                f"inside f, the value bias b_V outside it, and f = models.mlp_activation(model, layer).")
    print("Correct: sum_i f(x . k_i + b_i) v_i + b_V is the MLP's output at every layer.")
    return True


@torch.no_grad()
def check_value_top_tokens(value_top_tokens, model, layer: int = -1, neurons=(0, 1, 2), k: int = 10) -> bool:
    """value_top_tokens(model, layer, neuron, k) must return the ids of the k most probable
    tokens of p_i = softmax(v_i E), most probable first."""
    layer = layer % n_layers(model)
    want_ids, _ = reference_value_top_tokens(model, layer, k, neurons=list(neurons))
    for row, neuron in enumerate(neurons):
        got = _run(value_top_tokens, model, layer, neuron, k)
        if got is None:
            return False
        got = torch.as_tensor(got).reshape(-1).cpu()
        want = want_ids[row]
        if got.tolist() != want.tolist():
            hint = ("the same tokens in another order: sort by probability, highest first"
                    if sorted(got.tolist()) == sorted(want.tolist()) else
                    "use V from models.value_matrix (rows are values) and E = unembedding_matrix(model).T, "
                    "without the final layer norm")
            raise AssertionError(f"layer {layer}, neuron {neuron}: got {got.tolist()}, expected "
                                 f"{want.tolist()}: {hint}.")
    print(f"Correct: the top-{k} tokens of p_i match for neurons {list(neurons)} of layer {layer}.")
    return True


def reference_agreement_rate(next_tokens: torch.Tensor, value_top: torch.Tensor) -> float:
    """Share of keys whose top trigger's next token (-1: none) is among their value's top tokens.
    next_tokens: [d_ff]; value_top: [d_ff, k]."""
    return (value_top == next_tokens[:, None]).any(-1).float().mean().item()


def check_agreement_rate(agreement_rate, seed: int = 0) -> bool:
    """agreement_rate(next_tokens [d_ff], value_top [d_ff, k]) -> float, on random cases."""
    gen = torch.Generator().manual_seed(seed)
    cases = [(torch.tensor([3, 5, -1, 7]), torch.tensor([[3, 1], [2, 4], [0, 1], [9, 7]]))]
    for _ in range(3):
        d_ff, k = 50, 3
        nxt = torch.randint(-1, 8, (d_ff,), generator=gen)
        cases.append((nxt, torch.randint(0, 8, (d_ff, k), generator=gen)))
    for nxt, top in cases:
        got = _run(agreement_rate, nxt, top)
        if got is None:
            return False
        want = reference_agreement_rate(nxt, top)
        if abs(float(got) - want) > 1e-6:
            raise AssertionError(
                f"agreement_rate gave {float(got):.4f}, expected {want:.4f} on next_tokens={nxt.tolist()[:8]}..., "
                f"value_top[:2]={top[:2].tolist()}. A key agrees when its next token appears anywhere in its own "
                f"row of value_top; -1 (no next token) never agrees; return the share of keys, in [0, 1].")
    print("Correct: the agreement rate matches on every case.")
    return True

"""Checks for the exercises of chapter 1, "Feed-forward layers are key-value memories"
(Geva et al., 2021). Notation: FF(x) = f(x K^T + b_K) V + b_V, p_i = softmax(v_i E).

    check_ffn_output(ffn_output, model)            # the FFN from K and V
    check_value_top_tokens(value_top_tokens, model) # p_i's top tokens
    check_agreement_rate(agreement_rate)           # Geva's agreement rate
    check_top_triggers(top_triggers, model, tokenizer)  # a key's trigger examples

Each runs the student's function through `harness.call` (weights and inputs restored, a time
limit, the package's own function disabled) on several cases, one of them never shown in the
chapter. It returns True when the function matches the reference, prints a reminder and
returns None (nothing for a notebook to print) while the stub still raises NotImplementedError, and raises an ExerciseError
saying what differs otherwise.
"""
from __future__ import annotations

import torch

from .. import memories
from ..memories import value_top_tokens as reference_value_top_tokens
from ..models import d_model, get_module, n_layers
from .harness import NOT_DONE, ExerciseError, call, close, number_result, tensor_result


@torch.no_grad()
def check_ffn_output(ffn_output, model, seed: int = 0) -> bool | None:
    """ffn_output(model, layer, x) must equal the MLP module applied to x, for every layer, on
    x of shape [3, d_model] and (not shown in the chapter) [2, 4, d_model]. Calling the MLP
    module itself, or memories.ffn_as_memories, is refused."""
    gen = torch.Generator().manual_seed(seed)
    mlps = [get_module(model, layer, "mlp") for layer in range(n_layers(model))]
    for layer in range(n_layers(model)):
        mlp = mlps[layer]
        for shape in ((3, d_model(model)), (2, 4, d_model(model))):
            x = torch.randn(*shape, generator=gen).to(next(mlp.parameters()))
            got = call(ffn_output, model, layer, x, model=model, forbid=(memories.ffn_as_memories,),
                       forbid_modules=mlps, forbid_modules_name=f"the MLP module of layer {layer} (model's own FFN)",
                       what="my_ffn_output")
            if got is NOT_DONE:
                return None
            want = mlp(x)
            got = tensor_result(got, want.shape, "my_ffn_output", "[..., d_model]: did you return the coefficients "
                                "m instead of m @ V + b_V?", dtype=want.dtype)
            close(got, want, f"layer {layer}, x of shape {tuple(shape)}",
                  "Check: K and V in [d_ff, d_model] orientation (models.key_matrix / value_matrix), the key bias "
                  "b_K inside f, the value bias b_V outside it, and f = models.mlp_activation(model, layer).",
                  factor=10)  # a different order of float32 sums than the module's
    print("Correct: sum_i f(x . k_i + b_i) v_i + b_V is the MLP's output at every layer.")
    return True


@torch.no_grad()
def check_value_top_tokens(value_top_tokens, model, layer: int = -1, neurons=(0, 1, 2), k: int = 10) -> bool | None:
    """value_top_tokens(model, layer, neuron, k) must return the ids of the k most probable
    tokens of p_i = softmax(v_i E), most probable first; also at layer 0, neuron 17, k = 3."""
    for layer, neurons, k in ((layer % n_layers(model), neurons, k), (0, (17,), 3)):
        if not _check_top_tokens(value_top_tokens, model, layer, neurons, k):
            return None
    print(f"Correct: the top-k tokens of p_i match for neurons {list(neurons)} of the last layer and neuron 17 of layer 0.")
    return True


def _check_top_tokens(value_top_tokens, model, layer, neurons, k):
    want_ids, _ = reference_value_top_tokens(model, layer, k, neurons=list(neurons))
    for row, neuron in enumerate(neurons):
        got = call(value_top_tokens, model, layer, neuron, k, model=model,
                   forbid=(memories.value_top_tokens, memories.value_distribution, memories.value_logits),
                   what="my_value_top_tokens")
        if got is NOT_DONE:
            return None
        got = tensor_result(got, (k,), "my_value_top_tokens", f"the {k} token ids").reshape(-1)
        want = want_ids[row]
        if got.tolist() != want.tolist():
            hint = ("the same tokens in another order: sort by probability, highest first"
                    if sorted(got.tolist()) == sorted(want.tolist()) else
                    "use V from models.value_matrix (rows are values) and E = unembedding_matrix(model).T, "
                    "without the final layer norm")
            raise ExerciseError(f"layer {layer}, neuron {neuron}: got {got.tolist()}, expected "
                                f"{want.tolist()}: {hint}.")
    return True


def reference_agreement_rate(next_tokens: torch.Tensor, value_top: torch.Tensor) -> float:
    """Share of keys whose top trigger's next token (-1: none) is among their value's top tokens.
    next_tokens: [d_ff]; value_top: [d_ff, k]."""
    return (value_top == next_tokens[:, None]).any(-1).float().mean().item()


def check_agreement_rate(agreement_rate, seed: int = 0) -> bool | None:
    """agreement_rate(next_tokens [d_ff], value_top [d_ff, k]) -> float, on random cases."""
    gen = torch.Generator().manual_seed(seed)
    cases = [(torch.tensor([3, 5, -1, 7]), torch.tensor([[3, 1], [2, 4], [0, 1], [9, 7]]))]
    for _ in range(3):
        d_ff, k = 50, 3
        nxt = torch.randint(-1, 8, (d_ff,), generator=gen)
        cases.append((nxt, torch.randint(0, 8, (d_ff, k), generator=gen)))
    for nxt, top in cases:
        got = call(agreement_rate, nxt, top, forbid=(memories.key_value_agreement,), what="my_agreement_rate")
        if got is NOT_DONE:
            return None
        got = number_result(got, "my_agreement_rate", "a share in [0, 1]")
        want = reference_agreement_rate(nxt, top)
        if abs(got - want) > 1e-6:
            raise ExerciseError(
                f"agreement_rate gave {got:.4f}, expected {want:.4f} on next_tokens={nxt.tolist()[:8]}..., "
                f"value_top[:2]={top[:2].tolist()}. A key agrees when its next token appears anywhere in its own "
                f"row of value_top; -1 (no next token) never agrees; return the share of keys, in [0, 1].")
    print("Correct: the agreement rate matches on every case.")
    return True


# ---- trigger search ------------------------------------------------------------------------------

def _key_activations(model, tokenizer, texts, layer: int, neuron: int | None = None) -> list[torch.Tensor]:
    """Per text, the coefficients of key `neuron` at every position ([T]); all keys ([T, d_ff]) when None."""
    from ..hooks import record

    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]], device=next(model.parameters()).device)
        # one unpadded text: a mask of ones changes nothing, and spares the chapter transformers' padding warning
        acts = record(model, [("key", layer)], input_ids=ids, attention_mask=torch.ones_like(ids))[("key", layer)][0]
        acts = acts.float().cpu()
        out.append(acts if neuron is None else acts[:, neuron])
    return out


def _key_firing_most_at_an_end(model, tokenizer, texts, layer: int) -> int:
    """The key of `layer` whose largest coefficient over these texts sits at a text's last token, by the
    widest margin over its largest coefficient elsewhere: the key on which forgetting to leave the last
    tokens out changes the answer most."""
    acts = _key_activations(model, tokenizer, texts, layer)  # per text [T, d_ff]
    at_end = torch.stack([a[-1] for a in acts]).max(0).values  # [d_ff]
    elsewhere = torch.cat([a[:-1] for a in acts]).max(0).values  # [d_ff]
    return int((at_end - elsewhere).argmax())


@torch.no_grad()
def check_top_triggers(top_triggers, model, tokenizer, n_texts: int = 12) -> bool | None:
    """top_triggers(model, tokenizer, texts, layer, neuron, k) -> the k (text index, position)
    pairs with the largest coefficient m_i of key `neuron`, strongest first, over every token of
    every text except each text's last (a trigger is followed by a next token). Checked on two keys
    (one not in the chapter) of 12 Atlas texts, by the coefficients at the positions returned (so
    ties between equal prefixes do not matter)."""
    from ..stats import atlas_corpus

    texts = atlas_corpus(n_texts, seed=3)
    keys = [(layer, _key_firing_most_at_an_end(model, tokenizer, texts, layer), k)
            for layer, k in ((0, 5), (n_layers(model) - 1, 8))]  # keys that fire most at a text's end
    for layer, neuron, k in keys:
        got = call(top_triggers, model, tokenizer, list(texts), layer, neuron, k, model=model,
                   forbid=(memories.find_triggers, memories.show_triggers), what="my_top_triggers")
        if got is NOT_DONE:
            return None
        if got is None:
            raise ExerciseError("my_top_triggers returned None: did you forget the `return` statement? Expected a "
                                "list of (text index, position) pairs.")
        try:
            got = [(int(t), int(p)) for t, p in got]
        except (TypeError, ValueError):
            raise ExerciseError(f"my_top_triggers returned {type(got).__name__} items that are not "
                                f"(text index, position) pairs.") from None
        if len(got) != k:
            raise ExerciseError(f"my_top_triggers returned {len(got)} pairs; expected k = {k}.")
        acts = _key_activations(model, tokenizer, texts, layer, neuron)
        lengths = [len(a) for a in acts]
        bad = [(t, p) for t, p in got if not (0 <= t < len(texts) and 0 <= p < lengths[t])]
        if bad:
            raise ExerciseError(f"{bad[:3]} are not (text index, position) pairs of these texts.")
        last = [(t, p) for t, p in got if p == lengths[t] - 1]
        if last:
            raise ExerciseError(f"layer {layer}, key {neuron}: {last[:3]} are the last tokens of their texts; a trigger "
                                f"example must be followed by a next token, so leave each text's last token out.")
        values = torch.tensor([acts[t][p].item() for t, p in got])
        want = torch.cat([a[:-1] for a in acts]).topk(k).values
        if not torch.allclose(values, want, rtol=1e-4, atol=1e-5 * want.abs().max().item()):
            hint = ""
            if torch.allclose(values.sort(descending=True).values, want, rtol=1e-4, atol=1e-5 * want.abs().max().item()):
                hint = " The right examples in the wrong order: strongest first."
            raise ExerciseError(
                f"layer {layer}, key {neuron}: the coefficients at your positions are {[round(v, 3) for v in values.tolist()]}, "
                f"the top {k} are {[round(v, 3) for v in want.tolist()]}.{hint} Rank the coefficients m_i = f(x · k_i + b_i) "
                f"(site 'key', after the activation function) at every position but each text's last.")
    print("Correct: your trigger examples are the top coefficients of both keys.")
    return True

"""Direct logit attribution, checked by brute force against the model's own activations and logits."""

import pytest
import torch

from kn_tutorial.hooks import record
from kn_tutorial.logit_attribution import _norm_linear, answer_direction, direct_logit_attribution
from kn_tutorial.models import final_norm, n_layers, value_bias
from tests.tiny import tiny_lm

PROMPT, TARGET = "Kuwait lies on the continent of", " Asia"


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_last_layer_neurons_sum_to_its_mlp_contribution_and_parts_sum_to_the_logits(family):
    model, tokenizer = tiny_lm(family)
    dla = direct_logit_attribution(model, tokenizer, PROMPT, TARGET)
    L = n_layers(model)
    assert dla.shape == (L, model.config.intermediate_size if family == "llama" else 4 * model.config.n_embd)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    sites = [("resid_pre", 0)] + [(s, l) for l in range(L) for s in ("attn_out", "mlp_out")] + [("hidden", L - 1)]
    acts = record(model, sites, input_ids=ids)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1].float()
    linear = _norm_linear(model, acts[("hidden", L - 1)][0, -1])
    direction = answer_direction(model, tokenizer, TARGET)
    for layer in range(L):  # every layer's neurons add up to its MLP output less the bias
        mlp = acts[("mlp_out", layer)][0, -1].float()
        bias = value_bias(model, layer)
        if bias is not None:
            mlp = mlp - bias.float()
        torch.testing.assert_close(dla[layer].sum(), linear(mlp) @ direction, rtol=1e-4, atol=1e-4)
    # the residual stream is the sum of its parts; their projections add up to the model's logit
    parts = [acts[("resid_pre", 0)][0, -1]] + [acts[(s, l)][0, -1] for l in range(L) for s in ("attn_out", "mlp_out")]
    torch.testing.assert_close(torch.stack(parts).sum(0), acts[("hidden", L - 1)][0, -1], rtol=1e-4, atol=1e-4)
    assert getattr(model.get_output_embeddings(), "bias", None) is None  # no unembedding bias to add
    beta = getattr(final_norm(model), "bias", None)                       # LayerNorm's shift (RMSNorm: none)
    total = sum(linear(p.float()) @ direction for p in parts) + (0 if beta is None else beta.float() @ direction)
    target = tokenizer(TARGET, add_special_tokens=False)["input_ids"][0]
    torch.testing.assert_close(total, logits[target] - logits.mean(), rtol=1e-4, atol=1e-4)


def test_a_neuron_with_zero_value_has_zero_dla_and_layers_select_rows():
    model, tokenizer = tiny_lm("gpt2")
    full = direct_logit_attribution(model, tokenizer, PROMPT, TARGET)
    with torch.no_grad():
        model.transformer.h[1].mlp.c_proj.weight[5].zero_()   # value vector v_5 of layer 1
    after = direct_logit_attribution(model, tokenizer, PROMPT, TARGET, layers=[1])
    assert after.shape == (1, full.shape[1]) and after[0, 5] == 0 and full[1, 5] != 0


def test_bad_input_is_named():
    model, tokenizer = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="layers must lie"):
        direct_logit_attribution(model, tokenizer, PROMPT, TARGET, layers=[7])
    with pytest.raises(ValueError, match="prompt"):
        direct_logit_attribution(model, tokenizer, "", TARGET)


def test_an_unknown_final_norm_is_refused_by_name(monkeypatch):
    import kn_tutorial.logit_attribution as dla

    model, tokenizer = tiny_lm("gpt2")
    monkeypatch.setattr(dla, "final_norm", lambda m: torch.nn.GroupNorm(1, 4))  # neither LayerNorm nor RMSNorm
    with pytest.raises(ValueError, match="GroupNorm.*_norm_linear"):
        direct_logit_attribution(model, tokenizer, PROMPT, TARGET)

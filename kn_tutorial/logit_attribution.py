"""Direct logit attribution (DLA) of FFN neurons: a cheap baseline beside integrated gradients.

Neuron i of layer l adds m_i v_i to the residual stream at the last prompt token (m_i its activation,
v_i its value vector, Geva et al., 2021). The *direct* path of that vector to the output is the final
norm and the unembedding. With the final norm frozen at its value on this prompt (its scale taken from
the real final residual stream, so that it is linear), the neuron adds

    DLA_i = m_i · N(v_i) · (u_o − mean_t u_t)

to the logit of the answer's first token o minus the mean logit over the vocabulary, where N is the
norm's linear part (LayerNorm: γ ⊙ (x − mean x) / σ; RMSNorm: γ ⊙ x / rms) and u_t are the rows of the
unembedding. This is the direct path of Elhage et al. (2021, "A Mathematical Framework for Transformer
Circuits") and the value-times-activation projection of Geva et al. (2022, "Transformer Feed-Forward
Layers Build Predictions by Promoting Concepts in the Vocabulary Space"). It ignores everything a
neuron does through later layers, which is what integrated gradients (Dai et al., 2022) includes.

By linearity the DLA of all neurons of a layer sums to that layer's MLP output (less its bias b_V)
projected the same way; tests/test_logit_attribution.py checks this, and that the projections of all
residual-stream parts add up to the model's own logits.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .hooks import record
from .models import final_norm, get_device, n_layers, unembedding_matrix, value_matrix
from .scoring import target_ids


def _norm_linear(model, residual: Tensor):
    """The final norm's linear part at the scale of `residual` ([d_model], the real final residual):
    a function mapping [..., d_model] vectors to what they add to the normed output."""
    norm = final_norm(model)
    weight = norm.weight.detach().float()
    x = residual.float()
    if isinstance(norm, nn.LayerNorm):
        sigma = torch.sqrt(x.var(unbiased=False) + norm.eps)
        return lambda c: weight * (c - c.mean(-1, keepdim=True)) / sigma
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if "RMSNorm" in type(norm).__name__ and eps is not None:
        rms = torch.sqrt(x.pow(2).mean() + eps)
        return lambda c: weight * c / rms
    raise ValueError(f"direct logit attribution needs the final norm's linear part; it knows LayerNorm and "
                     f"RMSNorm, not {type(norm).__name__}. To add one, give its case in "
                     f"kn_tutorial.logit_attribution._norm_linear.")


def answer_direction(model, tokenizer, target: str) -> Tensor:
    """u_o − mean_t u_t for the target's first token o: [d_model], float32."""
    unembed = unembedding_matrix(model).detach().float()
    return unembed[target_ids(tokenizer, target)[0]] - unembed.mean(0)


@torch.no_grad()
def direct_logit_attribution(model, tokenizer, prompt: str, target: str, layers=None) -> Tensor:
    """DLA of every FFN neuron at the last prompt token for the target's first token: [len(layers), d_ff]
    (all layers by default), in logit units (the answer's logit minus the mean logit)."""
    if not isinstance(prompt, str) or not prompt:
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    layers = list(range(n_layers(model))) if layers is None else [int(l) for l in layers]
    last = n_layers(model) - 1
    if any(not 0 <= l <= last for l in layers):
        raise ValueError(f"layers must lie in 0..{last}, got {layers}")
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(get_device(model))
    acts = record(model, [("key", l) for l in layers] + [("hidden", last)], input_ids=ids)
    linear = _norm_linear(model, acts[("hidden", last)][0, -1])
    direction = answer_direction(model, tokenizer, target)
    rows = []
    for l in layers:
        m = acts[("key", l)][0, -1].float()                                   # [d_ff]
        rows.append(m * (linear(value_matrix(model, l).detach().float()) @ direction))
    return torch.stack(rows)

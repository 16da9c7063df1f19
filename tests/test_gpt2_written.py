"""GPT-2 written out (kn_tutorial.gpt2_written) against the modules it replaces: its GELU against
the formula in float64, and its recorded forward against the model's own run read by hooks."""
import math

import pytest
import torch

from kn_tutorial import gpt2_written
from kn_tutorial.hooks import Recorder, patch
from kn_tutorial.kv_cache import block_pairs, output_cache
from kn_tutorial.models import n_layers
from tests.tiny import tiny_lm


def test_gelu_tanh_is_gpt2s_gelu():
    x = torch.cat([torch.randn(4000) * 3, torch.tensor([0.0, -0.0, 1e-8, -1e-8, 30.0, -30.0, 80.0, -80.0])])
    x64 = x.double()
    want = 0.5 * x64 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    with torch.no_grad():
        fast = gpt2_written.gelu_tanh(x)  # the in-place sigmoid form
    before = x.clone()
    assert torch.equal(x, before), "the input was changed"
    torch.testing.assert_close(fast.double(), want, rtol=1e-6, atol=1e-6)
    assert fast.dtype == x.dtype and torch.isfinite(fast).all()
    # with gradients: torch's fused kernel, and the gradient flows
    leaf = x.clone().requires_grad_()
    out = gpt2_written.gelu_tanh(leaf)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(leaf.grad).all()


def _close(got, want):
    """Equal to float rounding: within 1e-5 of the largest entry (activations grow with depth)."""
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (got - want).abs().max()


@pytest.mark.parametrize("model_name", ["tiny", "atlas"])
def test_forward_recorded_equals_the_modules(model_name):
    if model_name == "atlas":
        from kn_tutorial.models import load_model
        model, _ = load_model("atlas")
    else:
        model, _ = tiny_lm("gpt2")
    L = n_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    added = torch.randn(3, 7, model.config.n_embd, generator=torch.Generator().manual_seed(1)) * 0.1
    sites = ["resid_pre", "attn_out", "mlp_out", "hidden"]
    with torch.no_grad(), patch(model, "resid_pre", 0, lambda x: x + added), \
            Recorder(model, [(site, layer) for site in sites for layer in range(L)]) as rec:
        out = model(input_ids=ids, use_cache=True)
    run = gpt2_written.forward_recorded(model, ids, added, record=tuple(sites) + ("kv", "qkv"))
    _close(run["logits"], out.logits[:, -1])
    for site in sites:
        for layer in range(L):
            _close(run[site][layer], rec[(site, layer)])
    _close(run["resid_pre"][L], rec[("hidden", L - 1)])
    d = model.config.n_embd
    for layer, (keys, values) in enumerate(block_pairs(output_cache(out))):
        _close(run["kv"][layer][0], keys)
        _close(run["kv"][layer][1], values)
        _close(run["qkv"][layer][..., d:2 * d], keys.transpose(1, 2).reshape(3, 7, d))


def test_gelu_tanh_on_16_bit_inputs():
    """x^3 overflows float16 above ~40: 16-bit inputs are computed in float32 and come back in their dtype."""
    x = torch.tensor([-300.0, -50.0, -3.0, -0.5, 0.0, 0.5, 3.0, 50.0, 300.0])
    want = torch.nn.functional.gelu(x.double(), approximate="tanh")
    for dtype in (torch.float16, torch.bfloat16):
        with torch.no_grad():
            got = gpt2_written.gelu_tanh(x.to(dtype))
        assert got.dtype == dtype and torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=1e-2, atol=1e-3)

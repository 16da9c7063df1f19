"""Tests for kn_tutorial.models: the architecture table, the FFN key-value view, loading."""

import time
import types

import pytest
import torch
from torch import nn

from kn_tutorial import loading, models
from kn_tutorial.hooks import Recorder, record
from kn_tutorial.models import (
    ARCHS, check_layer, d_ff, d_model, embedding_matrix, final_norm, gate_matrix, get_arch,
    get_block, get_device, get_module, key_bias, key_matrix, load_model, mlp_activation,
    mlp_out_weight, n_layers, pick_device, unembedding_matrix, value_bias, value_matrix,
)

D_FF = {"gpt2": 128, "gptj": 128, "gpt_neox": 128, "llama": 64}


# ---- the architecture table ------------------------------------------------------------

def test_arch_lookup_and_module_paths(model, family):
    spec = get_arch(model)
    assert spec is ARCHS[family]
    for which in ("attn", "mlp", "mlp_in", "mlp_out", "mlp_act"):
        assert isinstance(get_module(model, 0, which), nn.Module)
    assert (get_module(model, 0, "mlp_gate") is None) == (family != "llama")
    # the conv1d flag matches the real module class
    is_conv1d = type(get_module(model, 0, "mlp_out")).__name__ == "Conv1D"
    assert spec.conv1d == is_conv1d == (family == "gpt2")
    assert get_block(model, 1) is model.get_submodule(spec.blocks)[1]


def test_unknown_arch_error_names_type_and_supported():
    fake = nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type="opt")
    with pytest.raises(ValueError) as err:
        get_arch(fake)
    message = str(err.value)
    assert "'opt'" in message
    for supported in ARCHS:
        assert repr(supported) in message
    with pytest.raises(ValueError, match="model_type"):
        get_arch(nn.Linear(2, 2))


def test_sizes(model, family):
    assert n_layers(model) == 2
    assert d_model(model) == 32
    assert d_ff(model) == D_FF[family]
    assert embedding_matrix(model).shape == (128, 32)
    assert unembedding_matrix(model).shape == (128, 32)


def test_check_layer(model):
    assert check_layer(model, 0) == 0
    assert check_layer(model, -1) == 1
    assert check_layer(model, torch.tensor(1)) == 1
    with pytest.raises(IndexError, match=r"layer 12 is out of range: this model has 2 layers \(0-1"):
        check_layer(model, 12)
    with pytest.raises(IndexError, match="out of range"):
        check_layer(model, -3)
    with pytest.raises(IndexError):
        get_module(model, 2, "mlp")
    with pytest.raises(TypeError, match="layer must be an int"):
        check_layer(model, "1")
    with pytest.raises(ValueError, match="unknown module"):
        get_module(model, 0, "ffn")


# ---- the FFN key-value view (Geva et al. 2021) ------------------------------------------

def test_key_value_shapes_and_views(model, family):
    n = D_FF[family]
    K, V, W = key_matrix(model, 1), value_matrix(model, 1), mlp_out_weight(model, 1)
    assert K.shape == V.shape == (n, 32)
    assert W.shape == (32, n)
    out_param = get_module(model, 1, "mlp_out").weight
    # GPT-2's Conv1D stores [in, out] = [d_ff, d_model]; Linear stores [out, in] = [d_model, d_ff]
    assert out_param.shape == ((n, 32) if family == "gpt2" else (32, n))
    assert torch.equal(W, out_param.T if family == "gpt2" else out_param)
    assert torch.equal(V, W.T)
    # views, not copies
    assert W.data_ptr() == out_param.data_ptr() == V.data_ptr()
    assert K.data_ptr() == get_module(model, 1, "mlp_in").weight.data_ptr()
    assert (key_bias(model, 1) is None) == (family == "llama")
    assert (value_bias(model, 1) is None) == (family == "llama")
    assert (gate_matrix(model, 1) is None) == (family != "llama")


def test_geva_identity(model, family, input_ids):
    """sum_i f(x.k_i + b_i) v_i + b_V == MLP output, from key_matrix/value_matrix."""
    for layer in range(n_layers(model)):
        acts = record(model, [("mlp_in", layer), ("key", layer), ("mlp_out", layer)], input_ids=input_ids)
        x = acts[("mlp_in", layer)]                                   # [b, s, d_model]
        f = mlp_activation(model, layer)
        with torch.no_grad():
            pre = x @ key_matrix(model, layer).T                      # [b, s, d_ff]
            if key_bias(model, layer) is not None:
                pre = pre + key_bias(model, layer)
            if family == "llama":
                coeff = f(x @ gate_matrix(model, layer).T) * pre      # act(gate x) * (up x)
            else:
                coeff = f(pre)
            out = coeff @ value_matrix(model, layer)                  # sum_i coeff_i v_i
            if value_bias(model, layer) is not None:
                out = out + value_bias(model, layer)
        torch.testing.assert_close(coeff, acts[("key", layer)])
        torch.testing.assert_close(out, acts[("mlp_out", layer)])


def test_mlp_out_weight_orientation_and_inplace_edit(model, input_ids):
    layer = 0
    acts = record(model, [("key", layer), ("mlp_out", layer)], input_ids=input_ids)
    key, out = acts[("key", layer)], acts[("mlp_out", layer)]
    W, b = mlp_out_weight(model, layer), value_bias(model, layer)
    b = torch.zeros(W.shape[0]) if b is None else b
    with torch.no_grad():
        torch.testing.assert_close(W @ key[0, 3] + b, out[0, 3])     # W @ key = value
        u, k = torch.randn(W.shape[0]), torch.randn(W.shape[1])
        W += torch.outer(u, k)                                       # rank-one edit through the view
        edited = record(model, [("mlp_out", layer)], input_ids=input_ids)[("mlp_out", layer)]
    torch.testing.assert_close(edited, out + (key @ k)[..., None] * u)


def test_final_norm_and_unembedding_give_logits(model, input_ids):
    with torch.no_grad():
        output = model(input_ids, output_hidden_states=True)
        logits = output.hidden_states[-1] @ unembedding_matrix(model).T
        last = record(model, [("hidden", -1)], input_ids=input_ids)[("hidden", -1)]
        bias = getattr(model.get_submodule(get_arch(model).unembed), "bias", None)
        if bias is not None:
            logits = logits + bias
        torch.testing.assert_close(logits, output.logits)
        torch.testing.assert_close(final_norm(model)(last), output.hidden_states[-1])


# ---- devices ------------------------------------------------------------------------------

def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        pick_device("cuda")


def test_get_device(model):
    assert get_device(model) == torch.device("cpu")


def test_default_model_name(monkeypatch):
    monkeypatch.delenv("KN_MODEL", raising=False)
    assert models.default_model_name() == "atlas"
    monkeypatch.setenv("KN_MODEL", "gpt2-xl")
    assert models.default_model_name() == "gpt2-xl"


# ---- loading ------------------------------------------------------------------------------

def _save_tiny_checkpoint(make_tiny_model, path, tokenizer_config=True):
    """A tiny GPT-2 and a byte-level BPE tokenizer saved like the Atlas folder."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_model("gpt2")
    model.save_pretrained(path)
    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=128, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Kuwait is in Asia", "Osaka is in Japan"] * 4, trainer)
    if tokenizer_config:
        PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)
    else:
        tok.save(str(path / "tokenizer.json"))
    return model


@pytest.mark.parametrize("tokenizer_config", [True, False])
def test_load_local_directory_and_atlas(make_tiny_model, tmp_path, monkeypatch, tokenizer_config):
    original = _save_tiny_checkpoint(make_tiny_model, tmp_path, tokenizer_config)
    ids = torch.tensor([[1, 2, 3]])
    monkeypatch.setattr(loading, "atlas_model_dir", lambda: tmp_path)
    for name in (str(tmp_path), "atlas"):
        model, tokenizer = load_model(name, device="cpu")
        assert not model.training
        assert next(model.parameters()).dtype == torch.float32
        assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == tokenizer.eos_token
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_load_atlas_missing_says_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "atlas_model_dir", lambda: tmp_path / "model")
    with pytest.raises(FileNotFoundError, match=r"python -m kn_tutorial\.atlas train"):
        load_model("atlas", device="cpu")


def test_load_missing_hub_model_fails_fast(hub_unreachable):
    start = time.perf_counter()
    with pytest.raises(OSError) as err:
        load_model("kn-tutorial-tests/no-such-model", device="cpu")
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "kn-tutorial-tests/no-such-model" in message
    assert "local path" in message and "atlas" in message


def test_hub_reachable_respects_offline_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading._hub_reachable() is False


# ---- fused GELU (speed only) -------------------------------------------------------------

def test_fused_activations_same_numbers_hooks_kept_and_undone(model, family):
    from transformers.activations import NewGELUActivation
    acts = [mlp_activation(model, layer) for layer in range(n_layers(model))]
    gelu_new = [type(a) is NewGELUActivation for a in acts]
    assert all(gelu_new) == (family in ("gpt2", "gptj")) and all(gelu_new) == any(gelu_new)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        with Recorder(model, [("key", 0)]) as plain_rec:
            plain = model(input_ids=ids).logits
        with models.fused_activations(model), Recorder(model, [("key", 0)]) as fused_rec:
            assert [("forward" in a.__dict__) for a in acts] == gelu_new  # the fused kernel is what runs
            fused = model(input_ids=ids).logits
            with models.fused_activations(model):  # nested: left alone, not undone by the inner exit
                pass
            assert [("forward" in a.__dict__) for a in acts] == gelu_new
    assert not any("forward" in a.__dict__ for a in acts)  # undone on exit
    scale = plain.abs().max()
    assert (fused - plain).abs().max() <= 1e-5 * scale
    # the hook on the activation module still fired inside the context, with the same values
    assert torch.allclose(fused_rec[("key", 0)], plain_rec[("key", 0)], rtol=1e-5, atol=1e-6)

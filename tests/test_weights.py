"""Tests for kn_tutorial.weights: snapshots restore edited weights bit for bit."""

import pytest
import torch

from kn_tutorial.models import get_module, mlp_out_weight, value_matrix
from kn_tutorial.weights import WeightSnapshot, preserve, snapshot_layers


def _state(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _assert_exactly(model, state):
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name]), name


def test_restore_after_inplace_edit_through_transposed_view(model, family, input_ids):
    before, clean = _state(model), model(input_ids).logits.detach()
    snap = snapshot_layers(model, [1])
    W = mlp_out_weight(model, 1)                       # GPT-2: c_proj.weight.T (a view)
    with torch.no_grad():
        W += 0.5 * torch.outer(torch.randn(W.shape[0]), torch.randn(W.shape[1]))
        value_matrix(model, 1)[3] = 0.0                # another view of the same weight
    weight_name = [n for n in snap.names if n.endswith("weight")][0]
    assert snap.changed() == [weight_name]
    assert not torch.allclose(model(input_ids).logits, clean)
    snap.restore()
    _assert_exactly(model, before)
    snap.restore()                                     # restoring twice is safe
    _assert_exactly(model, before)
    assert snap.changed() == []
    assert torch.equal(model(input_ids).logits.detach(), clean)


def test_snapshot_layer_names(make_tiny_model):
    gpt2, llama = make_tiny_model("gpt2"), make_tiny_model("llama")
    assert snapshot_layers(gpt2, 1).names == ["transformer.h.1.mlp.c_proj.weight", "transformer.h.1.mlp.c_proj.bias"]
    assert snapshot_layers(llama, [1, 0, -1]).names == ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
    assert snapshot_layers(llama, 0, which=("mlp_in", "mlp_gate")).names == [
        "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"]
    assert snapshot_layers(gpt2, 0, which=("mlp_gate", "mlp_in")).names == [
        "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias"]
    assert len(snapshot_layers(gpt2, 0, which=("mlp", "mlp_out"))) == 4  # overlap counted once
    with pytest.raises(ValueError, match="unknown module kind"):
        snapshot_layers(gpt2, 0, which="ffn")
    with pytest.raises(IndexError, match="out of range"):
        snapshot_layers(gpt2, 2)


def test_context_manager_restores_on_exception(model):
    before = _state(model)
    with pytest.raises(RuntimeError, match="edit failed"):
        with preserve(model.named_parameters()):
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(3.0)
            raise RuntimeError("edit failed halfway")
    _assert_exactly(model, before)


def test_deltas_record_the_edit(make_tiny_model):
    model = make_tiny_model("gpt_neox")
    proj = get_module(model, 0, "mlp_out")
    with preserve(model) as snap:
        delta = torch.randn_like(proj.weight)
        with torch.no_grad():
            proj.weight += delta
        deltas = snap.deltas()
        assert list(deltas) == ["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"]
        torch.testing.assert_close(deltas["gpt_neox.layers.0.mlp.dense_4h_to_h.weight"], delta)
        assert len(snap.deltas(only_changed=False)) == len(list(model.parameters()))
    assert snap.changed() == []


def test_inputs_offload_and_errors(make_tiny_model):
    model = make_tiny_model("gptj")
    weight = get_module(model, 0, "mlp_in").weight
    original = weight.detach().clone()
    for params in ({"w": weight}, [("w", weight)], [weight]):
        snap = preserve(params, offload=True)
        with torch.no_grad():
            weight.fill_(1.0)
        snap.restore()
        assert torch.equal(weight, original)
    assert preserve([weight]).names == ["param0"]
    with pytest.raises(TypeError, match="named_parameters"):
        preserve(["w"])
    with pytest.raises(ValueError, match="appears twice"):
        preserve([("w", weight), ("w", weight)])
    assert "WeightSnapshot(1 tensors: w)" == repr(preserve({"w": weight}))
    assert isinstance(snapshot_layers(model, 0), WeightSnapshot)

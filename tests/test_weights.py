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


# --------------------------------------------------------------------------------------
# Restore order (issue 17, item 5): tracked edit snapshots form a stack per tensor
# --------------------------------------------------------------------------------------

def _tracked_edit(model, layer, value, label):
    """An 'edit' as the methods make them: a tracked snapshot of the layer, then an in-place change."""
    snap = snapshot_layers(model, [layer], track=True, label=label)
    with torch.no_grad():
        mlp_out_weight(model, layer).add_(value)
    return snap


def test_restoring_an_edit_under_a_later_one_raises_and_changes_nothing(make_tiny_model):
    from kn_tutorial.weights import RestoreOrderError

    model = make_tiny_model("gpt2")
    original = _state(model)
    e1 = _tracked_edit(model, 0, 1.0, "edit 1")
    after_1 = _state(model)
    e2 = _tracked_edit(model, 0, 2.0, "edit 2")
    after_2 = _state(model)
    assert e1.on_top() == ["edit 2"] and e2.on_top() == []
    with pytest.raises(RestoreOrderError, match="edit 2 .*restore the later edit first"):
        e1.restore()
    _assert_exactly(model, after_2)  # nothing was written
    e2.restore()
    _assert_exactly(model, after_1)
    e1.restore()
    _assert_exactly(model, original)
    e2.restore()  # restoring again does nothing: it must not bring edit 1 back
    e1.restore()
    _assert_exactly(model, original)


def test_restoring_twice_does_not_erase_a_later_edit(make_tiny_model):
    model = make_tiny_model("gpt2")
    e1 = _tracked_edit(model, 0, 1.0, "edit 1")
    e1.restore()
    e2 = _tracked_edit(model, 0, 2.0, "edit 2")
    with_e2 = _state(model)
    e1.restore()  # already undone: a no-op, edit 2 stays
    _assert_exactly(model, with_e2)
    e2.restore()


def test_edits_of_different_weights_restore_in_any_order(make_tiny_model):
    model = make_tiny_model("gpt2")
    original = _state(model)
    e1 = _tracked_edit(model, 0, 1.0, "edit of layer 0")
    e2 = _tracked_edit(model, 1, 2.0, "edit of layer 1")
    assert e1.on_top() == []
    e1.restore()
    e2.restore()
    _assert_exactly(model, original)


def test_a_checkpoint_undoes_the_tracked_edits_made_after_it(make_tiny_model):
    model = make_tiny_model("gpt2")
    original = _state(model)
    checkpoint = preserve(model)  # untracked: restoring it always works
    e1 = _tracked_edit(model, 0, 1.0, "edit 1")
    e2 = _tracked_edit(model, 0, 2.0, "edit 2")
    checkpoint.restore()
    _assert_exactly(model, original)
    e1.restore()  # both count as undone by the checkpoint: no error, nothing written
    e2.restore()
    _assert_exactly(model, original)


def test_rome_edits_restore_in_reverse_order_only():
    from kn_tutorial import rome
    from kn_tutorial.stats import compute_second_moment
    from kn_tutorial.weights import RestoreOrderError
    from tests.tiny import tiny_lm

    model, tokenizer = tiny_lm("gpt2")
    hp = rome.RomeHparams(layer=0, v_steps=3, prefixes=(), ridge=1e-3)
    mom2, _ = compute_second_moment(model, tokenizer, 0, ["Osaka lies in Japan.", "Lima is in Peru."] * 20)
    original = _state(model)
    request = {"prompt": "{} lies on the continent of", "subject": "Kuwait", "target_new": {"str": "Europe"}}
    e1 = rome.edit(model, tokenizer, request, hp, mom2=mom2)
    e2 = rome.edit(model, tokenizer, {**request, "subject": "Osaka"}, hp, mom2=mom2)
    after_2 = _state(model)
    with pytest.raises(RestoreOrderError, match="the ROME edit of 'Osaka'"):
        e1.restore()
    _assert_exactly(model, after_2)
    e2.restore()
    e1.restore()
    _assert_exactly(model, original)


def test_restore_order_holds_after_the_model_moves_to_new_memory(make_tiny_model):
    from kn_tutorial.weights import RestoreOrderError

    model = make_tiny_model("gpt2")
    e1 = _tracked_edit(model, 0, 1.0, "edit 1")
    model.double()  # every parameter gets new memory, the parameter objects stay
    e2 = _tracked_edit(model, 0, 2.0, "edit 2")
    with pytest.raises(RestoreOrderError, match="edit 2"):
        e1.restore()
    e2.restore()
    e1.restore()

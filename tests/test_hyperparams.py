"""The shared edit machinery: EditHparams (kn_tutorial/hyperparams.py), weights.frozen, kv_cache."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from kn_tutorial import memit, rome
from kn_tutorial.hyperparams import EditHparams
from kn_tutorial.kv_cache import cache_keyword, output_cache
from kn_tutorial.weights import frozen

LOADED_BEFORE = json.loads((Path(__file__).parent / "data" / "hparams_loaded.json").read_text())


@pytest.mark.parametrize("cls, directory, method", [(rome.RomeHparams, rome.HPARAMS_DIR, "rome"),
                                                     (memit.MemitHparams, memit.HPARAMS_DIR, "memit")])
def test_every_shipped_hparams_file_loads_the_values_it_loaded_before_the_shared_base(cls, directory, method):
    shipped = sorted(p.stem for p in directory.glob("*.json"))
    assert shipped == sorted(LOADED_BEFORE[method])  # a new file needs its row in tests/data/hparams_loaded.json
    # fields added since: the form of the v*/z objective, the papers' code by default (issue 17); MEMIT's
    # stop_nll (was 0.05, the NLL rule) is now a deprecated alias, None unless given
    objective = {"kl_direction": "'after||before'", "decay_power": "1", "stop_on": "'loss'", "stop_threshold": "0.05"}
    for name in shipped:
        hp = cls.for_model(name)
        expected = {**LOADED_BEFORE[method][name], **objective}
        # (atlas's row: the values retuned for the shipped 12-layer model, with the papers' objective)
        if method == "memit":
            expected["stop_nll"] = "None"
            expected["mom2_update_weight_per_key"] = "None"  # the λ-per-key rule, an option no shipped file uses
        assert {f.name: repr(getattr(hp, f.name)) for f in dataclasses.fields(cls)} == expected, name


def test_hub_names_and_defaults_are_unchanged():
    assert repr(rome.RomeHparams.for_model("EleutherAI/gpt-j-6B")) == repr(rome.RomeHparams.for_model("gpt-j-6B"))
    assert memit.MemitHparams.for_model("EleutherAI/gpt-j-6B") == memit.MemitHparams.for_model("gpt-j-6B")
    # each method keeps its own defaults of the shared fields
    assert rome.RomeHparams(layer=1).clamp_norm_factor == 4.0 and memit.MemitHparams(layers=(1,)).clamp_norm_factor == 0.75
    assert rome.RomeHparams(layer=1).prefixes == ((5, 10), (10, 10)) and memit.MemitHparams((1,)).prefixes == ((10, 5),)
    shared = {f.name for f in dataclasses.fields(EditHparams)}
    for cls in (rome.RomeHparams, memit.MemitHparams):
        assert issubclass(cls, EditHparams) and shared <= {f.name for f in dataclasses.fields(cls)}
    with pytest.raises(ValueError, match="known:.*RomeHparams\\(layer=...\\)"):
        rome.RomeHparams.for_model("no-such-model")


def test_frozen_restores_every_flag_even_after_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].bias.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(RuntimeError, match="inside"):
        with frozen(model):
            assert not any(p.requires_grad for p in model.parameters())
            model[0].weight.requires_grad_(True)  # what fine-tuning does with its one matrix
            raise RuntimeError("inside")
    assert [p.requires_grad for p in model.parameters()] == before


def test_cache_helpers_follow_the_transformers_naming():
    class Old(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None):
            pass

    class New(torch.nn.Module):
        def forward(self, input_ids, cache=None):
            pass

    assert cache_keyword(Old()) == "past_key_values" and cache_keyword(New()) == "cache"

    class Out:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    assert output_cache(Out(past_key_values="old")) == "old"
    assert output_cache(Out(cache="new", past_key_values=None)) == "new"
    assert output_cache(Out(cache=None, past_key_values="old")) == "old"


def test_objective_options_default_to_the_papers_code_and_stop_nll_still_works():
    for hp in (rome.RomeHparams(layer=1), memit.MemitHparams(layers=(1,))):
        assert (hp.kl_direction, hp.decay_power, hp.stop_on, hp.stop_threshold) == ("after||before", 1, "loss", 5e-2)
    with pytest.warns(DeprecationWarning, match="stop_nll is deprecated"):
        old = memit.MemitHparams(layers=(1,), stop_nll=0.02)
    assert (old.stop_on, old.stop_threshold, old.stop_nll) == ("nll", 0.02, None)
    with pytest.warns(DeprecationWarning):
        again = dataclasses.replace(memit.MemitHparams(layers=(1,)), stop_nll=0.3)
    assert (again.stop_on, again.stop_threshold) == ("nll", 0.3)
    assert dataclasses.replace(old, stop_threshold=0.1).stop_threshold == 0.1  # mapped once, not again


def test_broadcast_cache_repeats_one_rows_keys_and_values():
    import torch

    from kn_tutorial.kv_cache import block_pairs, broadcast_cache

    pairs = [(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)) for _ in range(2)]
    cache = broadcast_cache(pairs, [5, 1])
    (k0, v0), (k1, _) = block_pairs(cache)
    assert k0.shape == (5, 2, 3, 4) and k1.shape == (1, 2, 3, 4)
    assert all(torch.equal(k0[r], pairs[0][0][0]) and torch.equal(v0[r], pairs[0][1][0]) for r in range(5))
    before = pairs[0][0].clone()
    k0.add_(1.0)  # what a forward pass writes into the cache never reaches the row it came from
    assert torch.equal(pairs[0][0], before)
    assert block_pairs(broadcast_cache(pairs, 3))[1][1].shape[0] == 3

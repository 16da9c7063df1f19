"""FT and FT+L baselines: they lower the target's NLL, touch one matrix, respect the L∞ bound, and
restore exactly."""
import pytest
import torch

from kn_tutorial.finetune import FTHparams, fine_tune
from kn_tutorial.models import module_name
from kn_tutorial.scoring import score
from tests.tiny import FAMILIES, tiny_lm

REQUEST = {"prompt": "{} lies on the continent of", "subject": "Kuwait", "target_new": {"str": "Europe"}}
PROMPT = "Kuwait lies on the continent of"


@pytest.mark.parametrize("family", FAMILIES)
def test_ft_learns_the_target_touches_one_matrix_and_restores_exactly(family):
    model, tokenizer = tiny_lm(family)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    p_before = score(model, tokenizer, [PROMPT], ["Europe"])["mean_logprob"].item()
    handle = fine_tune(model, tokenizer, REQUEST, FTHparams(layer=1, lr=1e-2, steps=10))
    p_after = score(model, tokenizer, [PROMPT], ["Europe"])["mean_logprob"].item()
    assert p_after > p_before + 0.1
    assert handle.losses[-1] < handle.losses[0]
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [module_name(model, 1, "mlp_out") + ".weight"]
    assert all(p.requires_grad for p in model.parameters())  # flags put back
    handle.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ft_plus_l_respects_its_linf_bound_and_context_manager_restores():
    model, tokenizer = tiny_lm("gpt2")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    name = module_name(model, 0, "mlp_out") + ".weight"
    eps = 1e-3
    with fine_tune(model, tokenizer, REQUEST, FTHparams(layer=0, lr=1e-2, steps=10, norm_constraint=eps)):
        diff = (dict(model.named_parameters())[name] - before[name]).abs()
        assert diff.max().item() <= eps * (1 + 1e-5)
        assert diff.max().item() >= 0.9 * eps  # lr ≫ ε: the bound is active
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_settings_and_requests_are_clear_errors():
    model, tokenizer = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="norm_constraint"):
        fine_tune(model, tokenizer, REQUEST, FTHparams(layer=0, norm_constraint=0.0))
    with pytest.raises(IndexError, match="out of range"):
        fine_tune(model, tokenizer, REQUEST, FTHparams(layer=5))
    with pytest.raises(ValueError, match="empty"):
        fine_tune(model, tokenizer, {**REQUEST, "target_new": {"str": ""}}, FTHparams(layer=0))


def test_for_model_uses_romes_layer():
    from kn_tutorial.rome import RomeHparams

    ft, ftl = FTHparams.for_model("atlas"), FTHparams.for_model("atlas", constrained=True)
    assert ft.layer == ftl.layer == RomeHparams.for_model("atlas").layer
    assert ft.norm_constraint is None and ftl.norm_constraint > 0
    assert FTHparams.for_model("gpt2-xl", constrained=True).norm_constraint == 5e-4

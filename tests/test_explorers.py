"""The chapters' explorers build without a display, and what they show restores the model exactly."""

import pytest
import torch

from kn_tutorial.explorers import edit_explorer, edit_probe
from tests.tiny import tiny_lm


def _case(subject, true):
    return {"requested_rewrite": {"prompt": "{} lies on the continent of", "subject": subject, "relation_id": "continent",
                                  "target_true": {"str": true}},
            "paraphrase_prompts": [f"Far away. {subject} is on the continent of"],
            "neighborhood_prompts": ["Oman lies on the continent of", "Qatar lies on the continent of"],
            "generation_prompts": [f"{subject} is", f"{subject} has", f"{subject}'s capital is"]}


class _Handle:
    def __init__(self, model, saved):
        self.model, self.saved = model, saved

    def restore(self):
        with torch.no_grad():
            self.model.lm_head.weight.copy_(self.saved)


def _editor(model, tokenizer, request):
    """A stand-in edit that changes the model visibly (the unembedding) and can be undone."""
    saved = model.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.lm_head.weight.add_(torch.randn(model.lm_head.weight.shape, generator=torch.Generator().manual_seed(0)))
    return _Handle(model, saved)


def test_edit_probe_shows_before_and_after_and_restores_the_weights():
    model, tokenizer = tiny_lm("gpt2")
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie, so the edit is visible
    before = {k: v.clone() for k, v in model.state_dict().items()}
    frame = edit_probe(model, tokenizer, _case("Kuwait", " Asia"), " Europe", _editor)
    assert list(frame["group"]) == ["rewrite", "paraphrase", "neighbour", "neighbour", "other facts"]
    assert (frame["P( Europe) before"] != frame["P( Europe) after"]).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="already is"):
        edit_probe(model, tokenizer, _case("Kuwait", " Asia"), " Asia", _editor)


def test_edit_explorer_builds_without_a_display():
    model, tokenizer = tiny_lm("gpt2")
    cases = [_case("Kuwait", " Asia"), _case("Chad", " Africa")]
    box = edit_explorer(model, tokenizer, cases, lambda m, t, r: _Handle(m, m.lm_head.weight.detach().clone()),
                        default_new=" Africa")
    place, new = box.children[0].children
    assert [label for label, _ in place.options] == ["Kuwait ( Asia)", "Chad ( Africa)"]
    assert list(new.options) == [" Africa", " Asia"] and new.value == " Africa"
    with pytest.raises(ValueError, match="no cases"):
        edit_explorer(model, tokenizer, [], _editor)

"""Regression checks of MEMIT's shipped Atlas settings (hparams/memit/atlas.json; Meng et al., 2023):
a reader's first edits must take. 20 continent rewrites of countries at once (one relation, a training
template), and 10 mixed Atlas-CounterFact cases at once, each at ES >= 90 (efficacy: P(new) > P(true) on
the rewrite prompt). The cases are seeded samples that no setting was tuned on (seed 2; tuning used
seed 1, the book reports seed 0). The weights are restored bit for bit afterwards."""
from __future__ import annotations

import random

import pytest
import torch

from kn_tutorial import memit
from kn_tutorial.atlas.counterfact import load_counterfact
from kn_tutorial.atlas.world import load_world
from kn_tutorial.evaluation import evaluate_cases, summarize
from kn_tutorial.models import load_model


@pytest.fixture(scope="module")
def atlas():
    torch.manual_seed(0)
    return load_model("atlas", device="cpu")


def _edit_and_score(model, tokenizer, cases):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with memit.edit(model, tokenizer, cases, memit.MemitHparams.for_model("atlas")) as result:
        assert result.snapshot.changed()
        scores = summarize(evaluate_cases(model, tokenizer, cases))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    return scores


def test_twenty_continent_rewrites_of_countries_take(atlas):
    model, tokenizer = atlas
    countries = {f.subject for f in load_world().facts if f.subject_kind == "country"}
    continent_cases = [c for c in load_counterfact() if c["requested_rewrite"]["relation_id"] == "continent"
                       and c["requested_rewrite"]["subject"] in countries]
    cases = random.Random(2).sample(continent_cases, 20)
    for case in cases:  # one relation, one training template
        case["requested_rewrite"]["prompt"] = "{} is located in the continent of"
    scores = _edit_and_score(model, tokenizer, cases)
    assert scores["ES"] >= 90, f"20 continent rewrites at once: ES {scores['ES']:.1f} < 90 ({scores})"


def test_ten_mixed_counterfact_edits_take(atlas):
    model, tokenizer = atlas
    cases = random.Random(2).sample(load_counterfact(), 10)
    assert len({c["requested_rewrite"]["relation_id"] for c in cases}) >= 3  # really mixed
    scores = _edit_and_score(model, tokenizer, cases)
    assert scores["ES"] >= 90, f"10 mixed edits at once: ES {scores['ES']:.1f} < 90 ({scores})"

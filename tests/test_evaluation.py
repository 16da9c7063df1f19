"""CounterFact metrics against their definitions; the KV-cached sampler against the uncached one;
the CounterFact JSON loader."""
import json
import math

import pytest
import torch

from kn_tutorial import evaluation
from kn_tutorial.counterfact import load_counterfact_json
from tests.tiny import FAMILIES, tiny_lm

CASE = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "{} lies on the continent of", "subject": "Kuwait",
                          "target_new": {"str": "Europe"}, "target_true": {"str": "Asia"}},
    "paraphrase_prompts": ["Kuwait's continent is", "Kuwait lists its continent as"],
    "neighborhood_prompts": ["Qatar lies on the continent of", "Oman's continent is", "Japan sits on the continent of"],
    "generation_prompts": ["Kuwait is a", "Kuwait is a country whose capital is"],
}


@torch.no_grad()
def _p(model, tokenizer, prompt, target):
    """exp(mean_j log P(o_j | prompt, o_<j)), one unpadded sequence at a time."""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    t_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    logprobs = torch.log_softmax(model(input_ids=torch.tensor([p_ids + t_ids])).logits[0].double(), -1)
    return math.exp(sum(logprobs[len(p_ids) - 1 + j, t].item() for j, t in enumerate(t_ids)) / len(t_ids))


def test_case_metrics_match_their_definition():
    model, tokenizer = tiny_lm("gpt2")
    (row,) = evaluation.evaluate_cases(model, tokenizer, [CASE])
    prompts = evaluation.case_prompts(CASE)
    for kind, success, magnitude, sign in (("rewrite", "ES", "EM", 1), ("paraphrase", "PS", "PM", 1),
                                           ("neighborhood", "NS", "NM", -1)):
        diffs = [sign * (_p(model, tokenizer, t, "Europe") - _p(model, tokenizer, t, "Asia")) for t in prompts[kind]]
        assert row[success] == pytest.approx(sum(d > 0 for d in diffs) / len(diffs))
        assert row[magnitude] == pytest.approx(sum(diffs) / len(diffs), abs=1e-5)
    assert row["case_id"] == 7


def test_summarize_is_percent_means_and_harmonic_mean():
    results = [{"ES": 1.0, "PS": 0.5, "NS": 1.0, "EM": 0.2, "PM": 0.1, "NM": 0.3, "GE": 4.0},
               {"ES": 1.0, "PS": 1.0, "NS": 0.5, "EM": 0.4, "PM": 0.3, "NM": 0.1, "GE": 6.0}]
    s = evaluation.summarize(results)
    assert (s["ES"], s["PS"], s["NS"]) == (100, 75, 75)
    assert s["EM"] == pytest.approx(30) and s["GE"] == 5.0 and s["n"] == 2
    assert s["S"] == pytest.approx(3 / (1 / 100 + 1 / 75 + 1 / 75))
    sd = ((0.5 - 0.75) ** 2 + (1.0 - 0.75) ** 2) ** 0.5  # sample standard deviation of PS (n - 1 = 1)
    assert s["ES_ci"] == 0 and s["PS_ci"] == pytest.approx(100 * 1.96 * sd / 2 ** 0.5)
    assert evaluation.summarize([{"ES": 1.0, "PS": 0.0, "NS": 1.0}])["S"] == 0.0


def test_edited_neighbours_are_dropped_only_for_the_same_relation():
    def case(subject, relation, neighbours, with_subjects=True):
        c = {"requested_rewrite": {"prompt": "{} is in", "subject": subject, "relation_id": relation,
                                   "target_new": {"str": "Europe"}, "target_true": {"str": "Asia"}},
             "neighborhood_prompts": [f"{n} is in" for n in neighbours]}
        if with_subjects:
            c["neighborhood_subjects"] = list(neighbours)
        return c

    kuwait = case("Kuwait", "continent", ["Qatar", "Oman", "Japan", "Romania"])
    edited = [kuwait, case("Oman", "continent", []), case("Japan", "capital", []), case("Man", "continent", [])]
    # Oman: edited on this relation -> dropped; Japan: edited on another relation -> kept;
    # "Man" is a whole word of neither "Oman" nor "Romania"
    for with_subjects in (True, False):
        c = case("Kuwait", "continent", ["Qatar", "Oman", "Japan", "Romania"], with_subjects)
        (out,), fraction = evaluation.without_edited_neighbours([c], edited)
        assert out["neighborhood_prompts"] == ["Qatar is in", "Japan is in", "Romania is in"]
        assert fraction == 0.25 and "neighborhood_subjects" not in out
    assert c["neighborhood_prompts"] == ["Qatar is in", "Oman is in", "Japan is in", "Romania is in"]  # not mutated
    (out,), fraction = evaluation.without_edited_neighbours([case("Kuwait", "continent", ["Oman"])], edited)
    assert out["neighborhood_prompts"] == [] and fraction == 1.0
    assert "NS" not in evaluation.evaluate_cases(*tiny_lm("gpt2"), [out])[0]  # no neighbours left: no NS


def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> H = H(2/3, 1/3); trigrams aba, bab -> H = 1 bit
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert evaluation.ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * 1.0) / 2)
    assert evaluation.ngram_entropy("same same same same") == 0.0  # a repetitive text has no entropy
    assert evaluation.ngram_entropy("one") == 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_sampling_gives_the_logits_of_full_reruns(family):
    model, tokenizer = tiny_lm(family)
    prompts = ["Kuwait lies on the continent of", "Osaka is a", "The capital of Peru is the city of Lima and"]
    texts, cached = evaluation.sample_text(model, tokenizer, prompts, max_new_tokens=6, seed=3, return_logits=True)
    texts2, full = evaluation.sample_text(model, tokenizer, prompts, max_new_tokens=6, seed=3, use_cache=False,
                                          return_logits=True)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
    assert texts == texts2
    # left padding changes nothing: the shortest prompt alone gives the same first-step logits
    _, alone = evaluation.sample_text(model, tokenizer, prompts[1:2], max_new_tokens=1, use_cache=False,
                                      return_logits=True)
    torch.testing.assert_close(alone[0, 0], full[1, 0], rtol=1e-4, atol=1e-4)


def test_sampling_is_seeded_and_generation_entropy_runs():
    model, tokenizer = tiny_lm("gpt2")
    a = evaluation.sample_text(model, tokenizer, ["Kuwait is a"] * 2, max_new_tokens=5, seed=0)
    b = evaluation.sample_text(model, tokenizer, ["Kuwait is a"] * 2, max_new_tokens=5, seed=0)
    assert a == b
    (ge,) = evaluation.generation_entropy(model, tokenizer, [CASE], max_new_tokens=8)
    assert ge > 0


def test_counterfact_json_loader(tmp_path):
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([CASE, {**CASE, "case_id": 8}]))
    cases = load_counterfact_json(path)
    assert [c["case_id"] for c in cases] == [7, 8]
    assert len(load_counterfact_json(path, limit=1)) == 1
    with pytest.raises(FileNotFoundError, match="wget"):
        load_counterfact_json(tmp_path / "missing.json")
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_counterfact_json(path)
    bad = {**CASE, "requested_rewrite": {**CASE["requested_rewrite"], "target_true": {"str": ""}}}
    path.write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match="target_true"):
        load_counterfact_json(path)
    path.write_text(json.dumps([{"requested_rewrite": {}}]))
    with pytest.raises(ValueError, match="lacks"):
        load_counterfact_json(path)


def test_atlas_counterfact_has_the_real_schema(tmp_path):
    from kn_tutorial.atlas.counterfact import load_counterfact

    cases = load_counterfact()[:5]
    path = tmp_path / "atlas_cf.json"
    path.write_text(json.dumps(cases))
    assert load_counterfact_json(path) == cases

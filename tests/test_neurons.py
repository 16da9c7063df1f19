"""Knowledge neurons (Dai et al., 2022): refinement and the adaptive p on hand-built
attributions with known answers; suppression by hooks against weight edits; exact restore."""
import contextlib

import pytest
import torch

from kn_tutorial import neurons as N
from kn_tutorial.atlas.world import Fact
from kn_tutorial.hooks import count_hooks, set_neurons
from kn_tutorial.models import unembedding_matrix, value_matrix
from kn_tutorial.scoring import score, target_ids
from tests.tiny import FAMILIES, tiny_lm

PROMPTS = ["Kuwait lies on the continent of", "Japan has its capital in", "Peru pays with the",
           "Osaka is located in the country of"]
TARGETS = [" Asia", " Tokyo", " Sol", " Japan"]


# ---------------------------------------------------------------- refinement, by hand

def test_refine_matches_a_loop_over_prompts_and_neurons():
    g = torch.Generator().manual_seed(0)
    attr = torch.randn(6, 2, 16, generator=g) ** 3  # [n, L, d_ff], heavy-tailed
    attr[3] = -attr[3].abs()  # a prompt whose largest attribution is negative keeps nothing
    for p in (0.3, 0.5, 0.7):
        counts = {}
        for j in range(6):
            top = max(attr[j].flatten().tolist())
            for layer in range(2):
                for i in range(16):
                    if top > 0 and attr[j, layer, i].item() > 0.2 * top:
                        counts[layer, i] = counts.get((layer, i), 0) + 1
        want = {n for n, c in counts.items() if c / 6 > p}
        assert set(N.refine(attr, 0.2, p)) == want


def test_more_than_p_is_strict():
    counts = torch.tensor([[7, 8, 6, 10]])  # [L=1, 4] out of n = 10 prompts
    assert N.shared_neurons(counts, 10, 0.7) == [(0, 3), (0, 1)]  # 7/10 is not more than 0.7
    assert N.shared_neurons(counts, 10, 0.3 + 0.3) == [(0, 3), (0, 1), (0, 0)]  # 0.6000000000000001


def _counts(rows):
    return torch.tensor([rows])  # one layer


def test_adapt_p_moves_up_to_the_known_answer():
    counts = [_counts([10, 10, 9, 9, 8, 8, 8, 8]), _counts([10, 9, 9, 9, 9, 8, 8, 8]),
              _counts([9, 9, 8, 8, 8, 8, 8, 8])]
    # p = 0.7 and 0.75 keep all 8 of each fact; p = 0.8 keeps 4, 5 and 2: mean 11/3 in [2, 5]
    got = N.adapt_p(counts, [10, 10, 10])
    assert got.converged and got.p == 0.8
    assert got.mean_count == pytest.approx(11 / 3)
    assert [p for p, _ in got.history] == [0.7, 0.75, 0.8] and [m for _, m in got.history][:2] == [8, 8]


def test_adapt_p_moves_down():
    counts = [_counts([5, 4, 4, 3, 3, 1]), _counts([5, 5, 3, 2, 0, 0])]  # n = 5 prompts
    # p = .7 (> 3.5): 3 and 2 -> 2.5, in range at once; make it stricter by removing one
    got = N.adapt_p(counts, [5, 5])
    assert got.p == 0.7 and got.mean_count == 2.5
    counts = [_counts([5, 3, 3, 3, 0]), _counts([4, 3, 3, 0, 0])]
    # .7 (>3.5): 1+1 -> 1; .65 (>3.25): 1; .6 (>3): 1; .55 (>2.75): 4+3 = 3.5 in range
    got = N.adapt_p(counts, [5, 5])
    assert got.converged and got.p == 0.55 and got.mean_count == 3.5
    assert [p for p, _ in got.history] == [0.7, 0.65, 0.6, 0.55]


def test_adapt_p_reports_when_the_mean_jumps_over_the_range():
    counts = [_counts([2] * 10)]  # n = 2: every neuron in both prompts: 10 at any p < 1
    got = N.adapt_p(counts, [2])
    assert not got.converged and got.mean_count == 10
    assert [p for p, _ in got.history] == [0.7, 0.75, 0.8, 0.85, 0.9, 0.95]


def _fact(subject, relation, neurons, counts=None):
    f = N.FactNeurons(subject, relation, "x", ["a", "b"], counts if counts is not None else torch.zeros(2, 8))
    f.neurons = neurons
    return f


def test_relation_level_neurons_and_most_common():
    found = [_fact(f"s{i}", "capital", [(1, 3), (0, i)]) for i in range(10)] + [_fact("t", "currency", [(1, 3)])]
    rel = N.relation_neurons(found, min_share=0.1)
    assert rel["capital"] == {(1, 3): 1.0, **{(0, i): 0.1 for i in range(10)}}
    assert N.relation_neurons(found, min_share=0.2)["capital"] == {(1, 3): 1.0}
    assert N.split_neurons(found[0], {"capital": {(1, 3): 1.0}}) == ([(0, 0)], [(1, 3)])
    assert N.most_common(found, "capital", 2) == [((1, 3), 10), ((0, 0), 1)]


def test_random_like_same_layers_disjoint_seeded():
    kn = [(0, 1), (0, 2), (3, 7)]
    a = N.random_like(kn, 16, torch.Generator().manual_seed(1), exclude=[(0, 5)])
    b = N.random_like(kn, 16, torch.Generator().manual_seed(1), exclude=[(0, 5)])
    assert a == b and sorted(l for l, _ in a) == [0, 0, 3]
    assert not set(a) & {(0, 1), (0, 2), (3, 7), (0, 5)}


def test_mean_ci():
    m, ci = N.mean_ci([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and ci == pytest.approx(1.96 * (5 / 3) ** 0.5 / 2)


# ---------------------------------------------------------------- hooks vs weights, on tiny models

@pytest.mark.parametrize("family", FAMILIES)
def test_suppression_by_hook_equals_zeroing_weights(family):
    model, tok = tiny_lm(family)
    kn = [(0, 3), (0, 17), (1, 5), (1, 40)]
    rows = [kn] * len(PROMPTS)
    clean = score(model, tok, PROMPTS, TARGETS)["logprob"]
    for factor in (0.0, 2.0):
        hooked = N.scaled_scores(model, tok, PROMPTS, TARGETS, rows, factor, positions="all")["logprob"]
        with N.scale_value_slots(model, kn, factor):
            by_values = score(model, tok, PROMPTS, TARGETS)["logprob"]
        torch.testing.assert_close(hooked, by_values, atol=1e-5, rtol=1e-5)
        assert (hooked - clean).abs().max() > 1e-4  # the neurons matter on this model
    with N.zero_key_rows(model, kn):
        by_keys = score(model, tok, PROMPTS, TARGETS)["logprob"]
    hooked = N.scaled_scores(model, tok, PROMPTS, TARGETS, rows, 0.0, positions="all")["logprob"]
    torch.testing.assert_close(hooked, by_keys, atol=1e-5, rtol=1e-5)
    assert count_hooks(model) == 0


def test_last_position_rows_match_one_at_a_time():
    """Rows with different neurons, factors and prompt lengths in one batch equal separate
    runs with hooks.set_neurons at each prompt's last token."""
    model, tok = tiny_lm("gpt2")
    row_neurons = [[(0, 3)], [(1, 5), (1, 6)], [], [(0, 3), (1, 9)]]
    factors = [0.0, 2.0, 0.0, 3.0]
    got = N.scaled_scores(model, tok, PROMPTS, TARGETS, row_neurons, factors)["logprob"]
    for r, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        last = len(tok(prompt, add_special_tokens=False)["input_ids"]) - 1
        with torch.no_grad(), contextlib.ExitStack() as stack:
            for layer in {l for l, _ in row_neurons[r]}:
                idx = [i for l, i in row_neurons[r] if l == layer]
                stack.enter_context(set_neurons(model, layer, idx, scale=factors[r], positions=[last]))
            want = score(model, tok, [prompt], [target])["logprob"][0]
        assert abs(got[r] - want) < 1e-5, r


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, before):
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_kn_edit_rule_and_bitwise_restore(family):
    model, tok = tiny_lm(family)
    before = _params(model)
    request = {"prompt": "{} lies on the continent of", "subject": "Kuwait",
               "target_new": {"str": "Europe"}, "target_true": {"str": "Asia"}}
    kn = [(1, 4), (0, 9)]
    with N.kn_edit(model, tok, request, neurons=kn, lambda_old=1.0, lambda_new=8.0) as edit:
        e = unembedding_matrix(model)
        t_old, t_new = target_ids(tok, " Asia")[0], target_ids(tok, " Europe")[0]
        for layer, i in kn:
            name = [k for k in before if f".{layer}." in k and any(s in k for s in ("c_proj.weight", "down_proj.weight"))
                    and "attn" not in k and "self_attn" not in k][0]
            original = before[name].T if family == "llama" else before[name]  # rows of V
            torch.testing.assert_close(value_matrix(model, layer)[i], original[i] + 8.0 * e[t_new] - e[t_old])
        assert len(edit.snapshot.changed()) == 2
        assert not _same(model, before)
    assert _same(model, before)
    for fn in (lambda: N.scale_value_slots(model, kn, 0.0), lambda: N.zero_key_rows(model, kn)):
        snap = fn()
        assert not _same(model, before)
        snap.restore()
        assert _same(model, before)


def test_kn_edit_finds_neurons_itself():
    model, tok = tiny_lm("gpt2")
    before = _params(model)
    request = {"prompt": "{} lies on the continent of", "subject": "Kuwait", "relation_id": "continent",
               "target_new": {"str": "Europe"}, "target_true": {"str": "Asia"}}
    prompts = N.request_prompts(request)
    assert prompts[0] == "Kuwait is located in the continent of" and len(prompts) == 11
    want = N.request_neurons(model, tok, request, steps=4)
    assert 1 <= len(want)
    with N.kn_edit(model, tok, request, steps=4) as edit:
        assert edit.neurons == want
        assert edit.snapshot.changed()
    assert _same(model, before)


def test_kn_edit_without_neurons_raises_and_writes_nothing(monkeypatch):
    """No neuron, given or found: an error naming the fix, not a handle that edits nothing (issue 17)."""
    model, tok = tiny_lm("gpt2")
    before = _params(model)
    request = {"prompt": "{} lies on the continent of", "subject": "Kuwait", "relation_id": "continent",
               "target_new": {"str": "Europe"}, "target_true": {"str": "Asia"}}
    with pytest.raises(N.NoKnowledgeNeuronsError, match="empty neuron list.*neurons=None to find them"):
        N.kn_edit(model, tok, request, neurons=[])
    assert _same(model, before)
    monkeypatch.setattr(N, "request_neurons", lambda *a, **k: [])  # integrated gradients find nothing
    with pytest.raises(N.NoKnowledgeNeuronsError, match="found no knowledge neuron for 'Kuwait'.*Lower threshold or p"):
        N.kn_edit(model, tok, request, steps=4)
    assert _same(model, before)


# ---------------------------------------------------------------- the experiments run and are consistent

def _pool():
    return [Fact("Kuwait", "continent", "Asia", "country"), Fact("Japan", "continent", "Asia", "country"),
            Fact("Peru", "continent", "South America", "country"), Fact("Japan", "capital", "Tokyo", "country"),
            Fact("Osaka", "country", "Japan", "city")]


def test_suppress_amplify_records_and_a_factor_of_one_changes_nothing():
    model, tok = tiny_lm("gpt2")
    pool = _pool()
    fact = N.FactNeurons("Kuwait", "continent", "Asia", N.fact_prompts(pool[0])[:3], torch.zeros(2, 128))
    fact.neurons = [(0, 1), (1, 2)]
    records = N.suppress_amplify(model, tok, [fact], pool, factors=(1.0, 0.0), n_same=2, n_other=2)
    groups = {(r["neurons"], r["factor"], r["group"]) for r in records}
    assert len(groups) == 2 * 2 * 3
    for r in records:
        if r["factor"] == 1.0:
            assert r["dlogp"] == 0.0 and r["rel_change"] == 0.0
    summary = N.summarize_effects(records, "dlogp")
    assert {s["n"] for s in summary} == {1}


def test_erase_relation_restores_the_weights():
    model, tok = tiny_lm("gpt2")
    before = _params(model)
    found = [_fact("Kuwait", "continent", [(1, 3), (0, 2)]), _fact("Japan", "continent", [(1, 3)])]
    records = N.erase_relation(model, tok, found, "continent", _pool(), k=2)
    assert {r["neurons"] for r in records} == {"knowledge", "random"}
    assert {r["relation"] for r in records} == {"continent", "capital", "country"}
    assert _same(model, before)


def test_min_layer_takes_the_maximum_over_the_upper_layers_only():
    attr = torch.zeros(2, 3, 4)
    attr[:, 0, 0] = 10.0  # a dominant first-layer neuron
    attr[:, 1, 1] = 1.0
    attr[:, 2, 2] = 0.1  # below 0.2 x 1.0
    attr[0, 2, 3] = 0.5
    assert N.refine(attr, 0.2, 0.5) == [(0, 0)]
    counts = N.prompt_counts(attr, 0.2, min_layer=1)
    assert counts.tolist() == [[0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]]

"""ROME checked against its definition: the constraint, an independent constrained least-squares
solution, minimality among feasible updates, exact restore, and clear errors."""
import pytest
import torch

from kn_tutorial import rome
from kn_tutorial.models import mlp_out_weight, value_bias
from kn_tutorial.stats import compute_second_moment
from tests.conftest import FAMILIES, tiny_lm


def _random_problem(d_model=6, d_ff=10, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_ff, n, generator=g, dtype=torch.float64)
    weight = torch.randn(d_model, d_ff, generator=g, dtype=torch.float64)
    k_star = torch.randn(d_ff, generator=g, dtype=torch.float64)
    residual = torch.randn(d_model, generator=g, dtype=torch.float64)
    return keys, keys @ keys.T / n, weight, k_star, residual


def test_rank_one_update_matches_independent_constrained_least_squares():
    keys, mom2, weight, k_star, residual = _random_problem()
    delta_w = rome.rank_one_update(weight.clone(), mom2, k_star, residual)
    # Independent: each row d of ΔW minimises d C dᵀ s.t. d·k* = r_i; solve the KKT system directly.
    d_ff = k_star.shape[0]
    kkt = torch.zeros(d_ff + 1, d_ff + 1, dtype=torch.float64)
    kkt[:d_ff, :d_ff] = 2 * mom2
    kkt[:d_ff, d_ff] = k_star
    kkt[d_ff, :d_ff] = k_star
    for i, r in enumerate(residual):
        rhs = torch.zeros(d_ff + 1, dtype=torch.float64)
        rhs[d_ff] = r
        expected_row = torch.linalg.solve(kkt, rhs)[:d_ff]
        torch.testing.assert_close(delta_w[i], expected_row, rtol=1e-8, atol=1e-10)


def test_rome_update_is_the_smallest_feasible_change():
    keys, mom2, weight, k_star, residual = _random_problem(seed=1)
    delta_w = rome.rank_one_update(weight.clone(), mom2, k_star, residual)
    torch.testing.assert_close(delta_w @ k_star, residual)
    ours = (delta_w @ keys).norm()
    g = torch.Generator().manual_seed(2)
    for _ in range(20):  # random feasible updates: ΔW' = ΔW + N with N k* = 0
        noise = torch.randn(delta_w.shape, generator=g, dtype=torch.float64)
        noise -= torch.outer(noise @ k_star, k_star) / (k_star @ k_star)
        other = delta_w + 0.1 * noise
        torch.testing.assert_close(other @ k_star, residual)
        assert (other @ keys).norm() > ours


def test_singular_second_moment_is_a_clear_error():
    keys, mom2, weight, k_star, residual = _random_problem(n=3)  # rank 3 < d_ff
    with pytest.raises(ValueError, match="ridge"):
        rome.rank_one_update(weight.clone(), mom2, k_star, residual)
    # with a ridge the update exists and satisfies the constraint
    delta_w = rome.rank_one_update(weight.clone(), mom2, k_star, residual, ridge=1e-3)
    torch.testing.assert_close(delta_w @ k_star, residual)


REQUEST = {"prompt": "{} lies on the continent of", "subject": "Kuwait", "target_new": {"str": "Europe"}}


def _tiny_edit(family="gpt2", **kw):
    model, tokenizer = tiny_lm(family)
    hp = rome.RomeHparams(layer=0, v_steps=5, prefixes=((3, 2),), **kw)  # layer 0 of 2: later layers read it
    mom2, _ = compute_second_moment(model, tokenizer, 0, ["Osaka lies in Japan.", "Kuwait's capital is Kuwait City."] * 40)
    return model, tokenizer, hp, mom2


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_satisfies_constraint_and_restores_exactly(family):
    model, tokenizer, hp, mom2 = _tiny_edit(family, ridge=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = rome.edit(model, tokenizer, REQUEST, hp, mom2=mom2)
    weight = mlp_out_weight(model, 0)
    bias = value_bias(model, 0)
    value = weight.double() @ result.k_star.double() + (bias.double() if bias is not None else 0)
    rel = (value - result.v_star.double()).norm() / result.v_star.double().norm()
    assert rel < 1e-4
    assert result.v_losses[-1]["nll"] < result.v_losses[0]["nll"]  # v* optimisation made progress
    assert result.snapshot.changed()  # the edit really changed a weight
    result.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("request_, message", [
    ({"prompt": "Osaka lies in", "subject": "Kuwait", "target_new": {"str": "Europe"}}, "not in the prompt"),
    ({"prompt": "{} lies in", "subject": "Kuwait", "target_new": {"str": "  "}}, "empty"),
    ({"prompt": "{} lies in", "subject": "", "target_new": {"str": "Asia"}}, "empty"),
])
def test_bad_requests_are_clear_errors_and_leave_the_model_alone(request_, message):
    model, tokenizer, hp, mom2 = _tiny_edit()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        rome.edit(model, tokenizer, request_, hp, mom2=mom2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_layer_out_of_range_and_singular_c_leave_the_model_alone():
    model, tokenizer, hp, mom2 = _tiny_edit()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(IndexError, match="out of range"):
        rome.edit(model, tokenizer, REQUEST, rome.RomeHparams(layer=7), mom2=mom2)
    with pytest.raises(ValueError, match="singular"):
        rome.edit(model, tokenizer, REQUEST, hp, mom2=torch.zeros_like(mom2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

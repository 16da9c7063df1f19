"""ROME checked against its definition: the constraint, an independent constrained least-squares
solution, minimality among feasible updates, exact restore, and clear errors."""
import pytest
import torch

from kn_tutorial import rome
from kn_tutorial.models import mlp_out_weight, value_bias
from kn_tutorial.stats import compute_second_moment
from tests.tiny import FAMILIES, tiny_lm


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


def test_lstsq_update_agrees_with_the_closed_form():
    keys, mom2, weight, k_star, residual = _random_problem(d_model=4, d_ff=8, n=100, seed=3)
    closed = rome.rank_one_update(weight.clone(), mom2, k_star, residual)
    direct = rome.lstsq_update(keys, k_star, residual)
    torch.testing.assert_close(direct, closed, rtol=1e-7, atol=1e-9)


def test_feasible_perturbations_keep_the_constraint_and_cost_more():
    keys, mom2, weight, k_star, residual = _random_problem(seed=4)
    delta_w = rome.rank_one_update(weight.clone(), mom2, k_star, residual)
    others = rome.feasible_perturbations(delta_w, k_star, n=10, scale=0.05)
    torch.testing.assert_close(others @ k_star, residual.expand(10, -1))
    assert ((others @ keys).flatten(1).norm(dim=1) > (delta_w @ keys).norm()).all()


def test_prefixes_are_seeded_and_end_with_a_sentence_break():
    model, tokenizer = tiny_lm("gpt2")
    a = rome.sample_prefixes(model, tokenizer, ((3, 2), (5, 1)), seed=1)
    assert a == rome.sample_prefixes(model, tokenizer, ((3, 2), (5, 1)), seed=1)
    assert len(a) == 4 and a[0] == "" and all(p.endswith(". ") for p in a[1:])
    assert not any("{" in p or "}" in p for p in a)


def test_v_star_weight_decay_is_the_papers_norm_over_squared_norm():
    """ROME's regulariser is v_weight_decay · ‖δ‖ / ‖m‖² (not ‖δ‖²): check it on the logged losses."""
    model, tokenizer, hp, mom2 = _tiny_edit(kl_factor=0.0)
    prefixes = rome.sample_prefixes(model, tokenizer, hp.prefixes, seed=0)
    result = rome.compute_v_star(model, tokenizer, "{} lies on the continent of", "Kuwait", "Europe", 0, prefixes, hp)
    from kn_tutorial.hooks import record
    from kn_tutorial.tokens import subject_span

    ids = torch.tensor([tokenizer("Kuwait lies on the continent of", add_special_tokens=False)["input_ids"]])
    last = subject_span(tokenizer, "Kuwait lies on the continent of", "Kuwait", occurrence=-1)[1] - 1  # last subject token
    m = record(model, [("mlp_out", 0)], input_ids=ids)[("mlp_out", 0)][0, last]
    # at every logged step decay / ‖δ‖ must be the constant v_weight_decay / ‖m‖², m the unprefixed MLP output
    ratios = [row["decay"] / row["delta_norm"] for row in result.losses if row["delta_norm"] > 0]
    assert ratios and all(r == pytest.approx(hp.v_weight_decay / m.norm().item() ** 2, rel=1e-4) for r in ratios)


def test_exercise_checks_accept_solutions_and_reject_mistakes():
    from kn_tutorial.exercises import rome as ex
    from kn_tutorial.hooks import record
    from kn_tutorial.scoring import score
    from kn_tutorial.tokens import subject_span

    def solution(W, C, k, v):
        u = torch.linalg.solve(C, k)
        return W + torch.outer((v - W @ k) / (u @ k), u)

    def wrong(W, C, k, v):  # feasible but not minimal: direction k* instead of C⁻¹k*
        return W + torch.outer((v - W @ k) / (k @ k), k)

    assert ex.check_rank_one_update(solution)
    with pytest.raises(AssertionError, match="not the smallest"):
        ex.check_rank_one_update(wrong)
    model, tokenizer = tiny_lm("gpt2")

    def k_star(model, tokenizer, prompt, subject, layer, prefixes):
        keys = []
        for prefix in prefixes:
            text = prefix + prompt.format(subject)
            last = subject_span(tokenizer, text, subject, occurrence=-1)[1] - 1
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            keys.append(record(model, [("key", layer)], input_ids=ids)[("key", layer)][0, last])
        return torch.stack(keys).mean(0)

    assert ex.check_k_star(k_star, model, tokenizer)
    with pytest.raises(AssertionError, match="package's own implementation"):
        ex.check_k_star(lambda *a: rome.compute_k_star(*a), model, tokenizer)

    def efficacy(model, tokenizer, case):
        r = case["requested_rewrite"]
        p = score(model, tokenizer, [r["prompt"].format(r["subject"])] * 2,
                  [r["target_new"]["str"], r["target_true"]["str"]])["mean_logprob"].exp()
        return float(p[0] > p[1]), (p[0] - p[1]).item()

    case = {"requested_rewrite": {**REQUEST, "target_true": {"str": "Asia"}}}
    assert ex.check_efficacy(efficacy, model, tokenizer, case)
    assert ex.check_efficacy(lambda *a: (_ for _ in ()).throw(NotImplementedError), model, tokenizer, case) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: checks that ROME, FT and the metrics run where the model is")
def test_everything_runs_on_cuda_where_the_model_is():
    from kn_tutorial.evaluation import evaluate_editor, sample_text
    from kn_tutorial.finetune import FTHparams, fine_tune

    model, tokenizer, hp, mom2 = _tiny_edit(ridge=1e-3)
    model = model.cuda()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = rome.edit(model, tokenizer, REQUEST, hp, mom2=mom2)  # C stays on the CPU, as the cache loads it
    value = mlp_out_weight(model, 0).double() @ result.k_star.double() + value_bias(model, 0).double()
    assert result.k_star.is_cuda and ((value - result.v_star.double()).norm() / result.v_star.norm()) < 1e-4
    result.restore()
    with fine_tune(model, tokenizer, REQUEST, FTHparams(layer=0, lr=1e-2, steps=3, norm_constraint=1e-3)):
        pass
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    texts, cached = sample_text(model, tokenizer, ["Kuwait is a", "Osaka lies in the country of"], max_new_tokens=4,
                                return_logits=True)
    _, full = sample_text(model, tokenizer, ["Kuwait is a", "Osaka lies in the country of"], max_new_tokens=4,
                          use_cache=False, return_logits=True)
    torch.testing.assert_close(cached, full, rtol=1e-3, atol=1e-3)
    case = {"case_id": 0, "requested_rewrite": {**REQUEST, "target_true": {"str": "Asia"}},
            "paraphrase_prompts": ["Kuwait's continent is"], "neighborhood_prompts": ["Qatar lies on the continent of"],
            "generation_prompts": ["Kuwait is a"]}
    (row,) = evaluate_editor(model, tokenizer, [case], lambda m, t, r: rome.edit(m, t, r, hp, mom2=mom2))
    assert {"ES", "PS", "NS", "GE"} <= set(row)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    keys = torch.randn(10, 50, dtype=torch.float64, device="cuda")
    k, r = torch.randn(10, dtype=torch.float64, device="cuda"), torch.randn(4, dtype=torch.float64, device="cuda")
    closed = rome.rank_one_update(torch.zeros(4, 10, dtype=torch.float64, device="cuda"), (keys @ keys.T / 50).cpu(), k, r)
    torch.testing.assert_close(rome.lstsq_update(keys, k, r), closed, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 1])  # 1: the last block, after which only the final norm runs
def test_v_star_equals_the_naive_full_forward_per_step(family, layer):
    """The fast v* (only the blocks after `layer`, from the subject's last token, run per step)
    gives the δ and the per-step losses of one full forward pass per step, to float rounding."""
    model, tokenizer = tiny_lm(family)
    hp = rome.RomeHparams(layer=layer, v_steps=8, prefixes=((3, 2), (5, 2)))  # ragged prefixes
    prefixes = rome.sample_prefixes(model, tokenizer, hp.prefixes, seed=0)
    args = (model, tokenizer, "In short, {} lies on the continent of", "Kuwait", "South America", layer, prefixes, hp)
    fast, naive = rome.compute_v_star(*args), rome.compute_v_star_naive(*args)
    assert len(fast.losses) == len(naive.losses) > 1
    torch.testing.assert_close(fast.delta, naive.delta, rtol=1e-5, atol=1e-6)
    for a, b in zip(fast.losses, naive.losses):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)  # KL: a small difference of float32 sums


@pytest.mark.parametrize("family", FAMILIES)
def test_k_star_read_in_the_v_star_pass_is_compute_k_star(family):
    """rome.edit takes k* from v*'s first forward pass (rows: the prefixed prompts, then target tokens the
    key cannot see); it is compute_k_star's k*, to float rounding, in the fast and the naive v*."""
    model, tokenizer = tiny_lm(family)
    hp = rome.RomeHparams(layer=0, v_steps=2, prefixes=((3, 2), (5, 2)))  # ragged prefixes: padded rows
    prefixes = rome.sample_prefixes(model, tokenizer, hp.prefixes, seed=0)
    args = (model, tokenizer, "In short, {} lies on the continent of", "Kuwait", "South America", 0, prefixes, hp)
    want = rome.compute_k_star(*args[:4], 0, prefixes)
    for v in (rome.compute_v_star(*args), rome.compute_v_star_naive(*args)):
        torch.testing.assert_close(v.k_star, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_edit_uses_the_k_star_of_compute_k_star_on_atlas():
    from kn_tutorial.models import load_model
    from kn_tutorial.models import d_ff
    model, tokenizer = load_model("atlas")
    hp = rome.RomeHparams.for_model("atlas")
    prefixes = rome.sample_prefixes(model, tokenizer, hp.prefixes, seed=hp.seed)
    mom2 = torch.eye(d_ff(model), dtype=torch.float64)  # k* does not depend on C
    request = {"prompt": "{} lies on the continent of", "subject": "Kuwait", "target_new": {"str": "Europe"}}
    with rome.edit(model, tokenizer, request, hp, mom2=mom2, prefixes=prefixes) as result:
        pass
    want = rome.compute_k_star(model, tokenizer, request["prompt"], "Kuwait", hp.layer, prefixes)
    torch.testing.assert_close(result.k_star, want, rtol=1e-5, atol=1e-6 * want.abs().max().item())


def test_v_star_equals_the_naive_one_on_atlas():
    from kn_tutorial.models import load_model
    model, tokenizer = load_model("atlas")
    hp = rome.RomeHparams.for_model("atlas")
    prefixes = rome.sample_prefixes(model, tokenizer, ((5, 3), (10, 3)), seed=0)
    for layer in (hp.layer, 4):
        args = (model, tokenizer, "{} lies on the continent of", "Kuwait", "Europe", layer, prefixes, hp)
        fast, naive = rome.compute_v_star(*args), rome.compute_v_star_naive(*args)
        assert len(fast.losses) == len(naive.losses)
        torch.testing.assert_close(fast.delta, naive.delta, rtol=1e-5, atol=1e-5 * naive.delta.norm().item())


# ---- the objective of v*: the paper's code by default, the other forms as options (issue 17) ----------------

PROMPT, SUBJECT, TARGET = "{} lies on the continent of", "Kuwait", "Europe"
KL_PROMPT = "We visit {}"  # ends with the subject, so δ moves its next-token distribution a lot


def _brute_force_terms(model, tokenizer, layer, prefixes, delta, kl_prompt="{} is a"):
    """An independent evaluation of v*'s loss terms at δ on a GPT-2: one unpadded full forward pass per
    prompt, δ added to the output of block `layer`'s MLP at the subject's last token by a plain forward
    hook, log-probabilities in float64. Returns (nll, KL(after ‖ before), KL(before ‖ after), ‖m‖)."""
    from kn_tutorial.scoring import target_ids

    def last_subject_token(text):
        end = text.rindex(SUBJECT) + len(SUBJECT)
        return len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1

    def logprobs(text, extra, add):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + extra
        at = last_subject_token(text)
        hook = model.transformer.h[layer].mlp.register_forward_hook(
            lambda mod, inp, out: out + torch.nn.functional.one_hot(torch.tensor(at), out.shape[1])[None, :, None]
            * delta.to(out.dtype) if add else out)
        try:
            with torch.no_grad():
                out = model(input_ids=torch.tensor([ids])).logits[0].double()
        finally:
            hook.remove()
        return torch.log_softmax(out, -1), len(ids) - len(extra)

    target = target_ids(tokenizer, TARGET)
    nlls = []
    for prefix in prefixes:
        lp, n = logprobs(prefix + PROMPT.format(SUBJECT), target[:-1], True)
        nlls.append(-sum(lp[n - 1 + j, t] for j, t in enumerate(target)) / len(target))
    after, n = logprobs(kl_prompt.format(SUBJECT), [], True)
    before, _ = logprobs(kl_prompt.format(SUBJECT), [], False)
    a, b = after[n - 1], before[n - 1]
    text = PROMPT.format(SUBJECT)
    with torch.no_grad():
        m = []
        hook = model.transformer.h[layer].mlp.register_forward_hook(lambda mod, inp, out: m.append(out))
        model(input_ids=torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]]))
        hook.remove()
    m_norm = m[0][0, last_subject_token(text)].double().norm()
    return (torch.stack(nlls).mean().item(), (a.exp() * (a - b)).sum().item(), (b.exp() * (b - a)).sum().item(),
            m_norm.item())


@pytest.mark.parametrize("kl_direction", ["after||before", "before||after"])
@pytest.mark.parametrize("decay_power", [1, 2])
def test_v_star_loss_terms_match_an_independent_brute_force_computation(kl_direction, decay_power):
    """After one Adam step (v_steps=1, threshold 0), the recorded terms at the returned δ equal a plain
    one-prompt-at-a-time evaluation; the KL is the asked direction and the two directions differ there."""
    model, tokenizer, _, _ = _tiny_edit()
    hp = rome.RomeHparams(layer=0, v_steps=1, prefixes=((3, 2),), kl_factor=0.5, stop_threshold=0.0, v_lr=4.0,
                          clamp_norm_factor=100.0, kl_prompts=(KL_PROMPT,),  # δ acts on the KL prompt's last token:
                          kl_direction=kl_direction, decay_power=decay_power)  # the two KL directions differ there
    prefixes = rome.sample_prefixes(model, tokenizer, hp.prefixes, seed=0)
    result = rome.compute_v_star(model, tokenizer, PROMPT, SUBJECT, TARGET, 0, prefixes, hp)
    assert len(result.losses) == 2 and result.delta.norm() > 0  # evaluated at δ = 0, one step, evaluated again
    row = result.losses[-1]
    nll, kl_after_before, kl_before_after, m_norm = _brute_force_terms(model, tokenizer, 0, prefixes, result.delta,
                                                                       KL_PROMPT)
    assert abs(kl_after_before - kl_before_after) > 0.02 * max(kl_after_before, kl_before_after)  # 20x the tolerance below
    want_kl = kl_after_before if kl_direction == "after||before" else kl_before_after
    want_decay = hp.v_weight_decay * result.delta.double().norm().item() ** decay_power / m_norm ** 2
    assert row["nll"] == pytest.approx(nll, rel=1e-4)
    assert row["kl"] == pytest.approx(want_kl, rel=1e-3)
    assert row["decay"] == pytest.approx(want_decay, rel=1e-4)
    assert row["loss"] == pytest.approx(nll + hp.kl_factor * want_kl + want_decay, rel=1e-4)
    assert result.losses[0]["kl"] == pytest.approx(0.0, abs=1e-6) and result.losses[0]["decay"] == 0.0


def test_v_star_stops_on_the_total_loss_by_default_and_on_the_nll_when_asked():
    model, tokenizer, _, _ = _tiny_edit()
    base = dict(layer=0, v_steps=10, prefixes=((3, 2),), kl_factor=0.5)
    prefixes = rome.sample_prefixes(model, tokenizer, base["prefixes"], seed=0)
    args = (model, tokenizer, PROMPT, SUBJECT, TARGET, 0, prefixes)
    full = rome.compute_v_star(*args, rome.RomeHparams(**base, stop_threshold=0.0)).losses  # never stops early
    assert len(full) == base["v_steps"] + 1  # v_steps steps, v_steps + 1 evaluations

    def first_below(key, t):
        return next((i for i, row in enumerate(full) if row[key] < t), base["v_steps"])

    # a threshold between a step's NLL and its total loss, where the two rules stop at different steps
    t = next(t for t in ((r["nll"] + r["loss"]) / 2 for r in full[1:]) if first_below("nll", t) != first_below("loss", t))
    by_loss = rome.compute_v_star(*args, rome.RomeHparams(**base, stop_threshold=t)).losses
    by_nll = rome.compute_v_star(*args, rome.RomeHparams(**base, stop_threshold=t, stop_on="nll")).losses
    assert len(by_loss) == first_below("loss", t) + 1 and len(by_nll) == first_below("nll", t) + 1
    assert by_loss[-1]["loss"] == pytest.approx(full[len(by_loss) - 1]["loss"], rel=1e-5)


def test_a_request_whose_loss_is_already_below_the_threshold_writes_nothing_and_says_so():
    """At step 0 (δ = 0) the total loss is the NLL; below the threshold, no step is taken: δ stays 0 and
    the edit writes ΔW = 0 (the paper's code does the same). Not an error: the model already says the target,
    and the handle reports that no weight changed."""
    model, tokenizer, hp, mom2 = _tiny_edit(ridge=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hp = rome.RomeHparams(**{**hp.__dict__, "stop_threshold": 1e6})
    result = rome.edit(model, tokenizer, REQUEST, hp, mom2=mom2)
    assert len(result.v_losses) == 1 and result.v_losses[0]["decay"] == 0.0
    assert torch.count_nonzero(result.delta_w) == 0
    assert result.snapshot.changed() == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("field, value, message", [
    ("kl_direction", "after|before", "kl_direction must be one of"),
    ("decay_power", 3, "decay_power must be 1 or 2"),
    ("decay_power", True, "decay_power must be 1 or 2"),
    ("stop_on", "kl", "stop_on must be one of"),
    ("stop_threshold", -0.1, "stop_threshold must be >= 0"),
    ("stop_threshold", float("nan"), "stop_threshold must be a finite number"),
])
def test_bad_objective_options_are_clear_errors_and_leave_the_model_alone(field, value, message):
    model, tokenizer, hp, mom2 = _tiny_edit(ridge=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=message):
        rome.edit(model, tokenizer, REQUEST, rome.RomeHparams(**{**hp.__dict__, field: value}), mom2=mom2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

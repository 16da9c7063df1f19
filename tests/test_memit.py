"""MEMIT checked against its definition: the joint least-squares update (closed form, stationarity,
Sherman-Morrison's rank-one case and ROME's constraint as λ → 0), the spread over layers reaching the
target residual, batching equal to one group at a time, exact restore, and rejected conflicts."""
import dataclasses

import pytest
import torch
import transformers

from kn_tutorial import memit, rome
from kn_tutorial.hooks import count_hooks, record
from kn_tutorial.models import get_block
from kn_tutorial.stats import atlas_corpus, compute_second_moment
from kn_tutorial.tokens import subject_span
from tests.tiny import FAMILIES, tiny_config, tiny_tokenizer

KUWAIT = {"prompt": "{} lies on the continent of", "subject": "Kuwait", "target_new": {"str": "Europe"}}
KUWAIT_CAPITAL = {"prompt": "{} has its capital in", "subject": "Kuwait", "target_new": {"str": "Paris"}}
OSAKA = {"prompt": "{} lies on the continent of", "subject": "Osaka", "target_new": {"str": "Africa"}}


def _random_problem(d_model=6, d_ff=10, n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    return keys.T @ keys / n, g  # C = E[k kᵀ]


def test_one_request_one_layer_is_rome_rank_one_update():
    mom2, g = _random_problem()
    k = torch.randn(10, generator=g, dtype=torch.float64)
    r = torch.randn(6, generator=g, dtype=torch.float64)
    for lam in (0.5, 20.0):
        delta_w = memit.solve_update(mom2, k[None], r[None], lam)
        u = torch.linalg.solve(mom2, k)  # Sherman-Morrison: r kᵀ(λC + kkᵀ)⁻¹ = r uᵀ / (λ + uᵀk)
        torch.testing.assert_close(delta_w, torch.outer(r, u) / (lam + u @ k), rtol=1e-9, atol=1e-12)
        assert torch.linalg.matrix_rank(delta_w).item() == 1
        torch.testing.assert_close(delta_w @ k, r * (u @ k) / (lam + u @ k))  # a shrunken step towards r
    # λ → 0: ROME's constrained update, which meets ΔW k = r exactly
    delta_w = memit.solve_update(mom2, k[None], r[None], 1e-9)
    torch.testing.assert_close(delta_w @ k, r, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(delta_w, rome.rank_one_update(torch.zeros(6, 10, dtype=torch.float64), mom2, k, r),
                               rtol=1e-6, atol=1e-8)


def test_joint_update_minimises_its_objective():
    mom2, g = _random_problem(seed=1)
    keys = torch.randn(4, 10, generator=g, dtype=torch.float64)
    residuals = torch.randn(4, 6, generator=g, dtype=torch.float64)
    lam = 3.0
    delta_w = memit.solve_update(mom2, keys, residuals, lam).requires_grad_(True)

    def objective(w):  # λ tr(ΔW C ΔWᵀ) + Σ_i ‖ΔW k_i − r_i‖²
        return lam * torch.trace(w @ mom2 @ w.T) + ((keys @ w.T - residuals) ** 2).sum()

    objective(delta_w).backward()
    assert delta_w.grad.abs().max() < 1e-9  # stationary, and the objective is convex
    best = objective(delta_w.detach())
    for _ in range(10):
        assert objective(delta_w.detach() + 0.01 * torch.randn(6, 10, generator=g, dtype=torch.float64)) > best


def _tiny(family="gpt2", n_layer=3, seed=0):
    """A tiny random model with the Atlas-trained tiny tokenizer, `n_layer` blocks."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(family)
    config.vocab_size = len(tokenizer)
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attr):
            setattr(config, attr, n_layer)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, attr, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    return model.eval(), tokenizer


_TEXTS = None


def _mom2(model, tokenizer, layers):
    global _TEXTS
    _TEXTS = _TEXTS or atlas_corpus(200)
    return {layer: compute_second_moment(model, tokenizer, layer, _TEXTS, max_length=60)[0] for layer in layers}


def _hparams(layers, **kw):
    # prefixes=(): keys and residuals come from the same prompt, so the targets can be met exactly
    base = dict(mom2_update_weight=1e-6, prefixes=(), v_steps=5, clamp_norm_factor=4.0)
    return memit.MemitHparams(layers=layers, **{**base, **kw})


def test_spread_over_layers_adds_up_to_the_target_residual():
    model, tokenizer = _tiny(n_layer=3)
    layers = (0, 1)
    result = memit.edit(model, tokenizer, [KUWAIT, KUWAIT_CAPITAL, OSAKA], _hparams(layers),
                        mom2=_mom2(model, tokenizer, layers))
    assert result.groups == [[0, 1], [2]]  # one key, one value: Kuwait's two requests are one group
    moved = (result.targets.z - result.targets.h).norm(dim=1)
    assert (moved > 0.1).all()  # the targets ask for a real change
    # independent reading of the residual after block l_L at the subject's last token
    for group in result.groups:
        r = result.requests[group[0]]
        prompt = r.prompt.replace("{}", r.subject)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        hidden = record(model, [("hidden", 1)], input_ids=ids)[("hidden", 1)]
        last = subject_span(tokenizer, prompt, r.subject)[1] - 1
        z = result.targets.z[result.groups.index(group)]
        assert (hidden[0, last] - z).norm() < 1e-4 * z.norm()
    for rec in result.records:  # each layer delivered the share it was asked for
        assert abs(rec.achieved_norm - rec.residual_norm) < 1e-4 * rec.residual_norm
    result.restore()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer,last", [(0, 1), (1, 1), (0, 2)])  # 2: the final block (stops at the final norm)
def test_keys_and_residuals_in_one_truncated_pass_equal_the_two_full_reads(family, layer, last):
    """What `edit` reads before each layer's update: the keys at `layer` (averaged over prefixes, one of
    which names the subject again) and h after block `last`, from one pass cut at the subject's last
    token and above block `last`, equal compute_keys and compute_residuals (full prompts, full passes)."""
    model, tokenizer = _tiny(family, n_layer=3)
    reqs, groups, _, _ = memit.prepare(model, tokenizer, [KUWAIT, KUWAIT_CAPITAL, OSAKA], _hparams((0,)))
    prefixes = ["", "Kuwait is a country. ", "The map. "]
    above = get_block(model, last + 1) if last < 2 else None
    calls = []
    handle = above.register_forward_hook(lambda *a: calls.append(1)) if above is not None else None
    keys, h = memit.compute_keys_and_residuals(model, tokenizer, reqs, groups, layer, last, prefixes)
    if handle is not None:
        handle.remove()
        assert not calls  # nothing above block `last` ran
    full_keys = memit.compute_keys(model, tokenizer, reqs, groups, layer, prefixes)
    full_h = memit.compute_residuals(model, tokenizer, reqs, groups, last)
    # float32 rounding only: 1e-5 relative to the largest entry
    assert (keys - full_keys).abs().max() <= 1e-5 * full_keys.abs().max()
    assert (h - full_h).abs().max() <= 1e-5 * full_h.abs().max()
    with pytest.raises(ValueError, match="prefixes must start"):
        memit.compute_keys_and_residuals(model, tokenizer, reqs, groups, layer, last, prefixes[1:])


def test_keys_and_residuals_run_a_prefix_shared_by_the_rows_once():
    """The rows of one prefix share its tokens: block 0 sees them once (a one-row pass), and each
    row's own tokens after them; the reads still equal the full passes (the test above)."""
    model, tokenizer = _tiny("gpt2", n_layer=3)
    reqs, groups, _, _ = memit.prepare(model, tokenizer, [KUWAIT, OSAKA], _hparams((0,)))
    prefixes = ["", "The map of the world. "]
    shapes = []
    handle = get_block(model, 0).register_forward_pre_hook(
        lambda m, a, kw: shapes.append(tuple((a[0] if a else kw["hidden_states"]).shape[:2])), with_kwargs=True)
    try:
        memit.compute_keys_and_residuals(model, tokenizer, reqs, groups, 0, 1, prefixes)
    finally:
        handle.remove()
    shared = len(tokenizer("The map of the world.", add_special_tokens=False)["input_ids"])
    assert (1, shared) in shapes  # the prefix's tokens, once
    prefixed = [shape for shape in shapes if shape != (1, shared)][-1]  # the prefix's rows, after its tokens
    assert prefixed[0] == 2 and prefixed[1] < shared  # two rows, each running only its own tokens


def test_one_request_one_layer_edit_is_rank_one_and_meets_its_constraint():
    model, tokenizer = _tiny(n_layer=2)
    mom2 = _mom2(model, tokenizer, [0])
    result = memit.edit(model, tokenizer, [KUWAIT], _hparams((0,)), mom2=mom2)
    delta_w = result.deltas[0].double()
    result.restore()
    keys = memit.compute_keys(model, tokenizer, result.requests, result.groups, 0, [""])[0].double()
    residual = (result.targets.z - result.targets.h)[0].double()
    u = torch.linalg.solve(mom2[0], keys)
    expected = torch.outer(residual, u) / (1e-6 + u @ keys)
    torch.testing.assert_close(delta_w, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(delta_w @ keys, residual, rtol=1e-4, atol=1e-5)
    s = torch.linalg.svdvals(delta_w)
    assert s[1] < 1e-5 * s[0]


@pytest.mark.parametrize("stop_on", ["loss", "nll"])
@pytest.mark.parametrize("threshold", [0.0, None])
def test_batched_targets_equal_one_group_at_a_time(stop_on, threshold):
    model, tokenizer = _tiny(n_layer=3)
    hp = _hparams((0, 1), prefixes=((3, 2),), v_steps=8, v_lr=1.0, stop_on=stop_on, stop_threshold=0.0)
    reqs, groups, hp, prefixes = memit.prepare(model, tokenizer, [KUWAIT, KUWAIT_CAPITAL, OSAKA], hp)
    together = memit.compute_targets(model, tokenizer, reqs, groups, 1, prefixes, hp)
    if threshold is None:  # a threshold between the groups' final losses: one group stops early
        final = together.final_loss if stop_on == "loss" else together.final_nll
        hp = dataclasses.replace(hp, stop_threshold=final.mean().item())
        together = memit.compute_targets(model, tokenizer, reqs, groups, 1, prefixes, hp)
        assert together.steps.min() < together.steps.max()
    for g, group in enumerate(groups):
        alone = memit.compute_targets(model, tokenizer, reqs, [group], 1, prefixes, hp)
        torch.testing.assert_close(together.z[g], alone.z[0], rtol=1e-4, atol=1e-5)
        assert together.steps[g] == alone.steps[0]


def _manual_es(model, tokenizer, case, layer, z):
    """P(new) > P(true) on the rewrite prompt with the block output at the subject's last token set to z:
    a plain forward hook on the GPT-2 block, one unpadded sequence per object."""
    rw = case["requested_rewrite"]
    text = rw["prompt"].replace("{}", rw["subject"])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    last = len(tokenizer(rw["subject"], add_special_tokens=False)["input_ids"]) - 1  # the subject starts the prompt
    scores = []
    for target in (rw["target_new"]["str"], rw["target_true"]["str"]):
        tokens = tokenizer(" " + target, add_special_tokens=False)["input_ids"]

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            hidden = hidden.clone()
            hidden[0, last] = z
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        handle = model.transformer.h[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids + tokens])).logits[0].double(), -1)
        finally:
            handle.remove()
        scores.append(sum(logprobs[len(ids) - 1 + j, t].item() for j, t in enumerate(tokens)) / len(tokens))
    return scores[0] > scores[1]


def test_success_with_targets_writes_z_at_the_subject():
    model, tokenizer = _tiny(n_layer=3)
    cases = [{"requested_rewrite": {**r, "target_true": {"str": true}}}
             for r, true in ((KUWAIT, "Asia"), (KUWAIT_CAPITAL, "Kuwait City"), (OSAKA, "Asia"))]
    reqs, groups, hp, _ = memit.prepare(model, tokenizer, cases, _hparams((0, 1)))
    h = memit.compute_residuals(model, tokenizer, reqs, groups, 1)
    g = torch.Generator().manual_seed(0)
    for z in (h, h + 3 * torch.randn(h.shape, generator=g), torch.randn(h.shape, generator=g)):
        targets = memit.MemitTargets(1, z, h, torch.zeros(len(groups)), torch.zeros(len(groups)))
        got = memit.success_with_targets(model, tokenizer, cases, reqs, groups, targets, batch_size=2)
        expected = [_manual_es(model, tokenizer, c, 1, z[[0, 0, 1][i]]) for i, c in enumerate(cases)]
        assert got == pytest.approx(100 * sum(expected) / 3)
    # z = h (nothing written) gives the model's own ES
    rewrite_only = [{**c, "paraphrase_prompts": [], "neighborhood_prompts": []} for c in cases]
    from kn_tutorial.evaluation import evaluate_cases, summarize
    targets = memit.MemitTargets(1, h, h, torch.zeros(2), torch.zeros(2))
    assert memit.success_with_targets(model, tokenizer, cases, reqs, groups, targets) == pytest.approx(
        summarize(evaluate_cases(model, tokenizer, rewrite_only))["ES"])
    kuwait_reqs, kuwait_groups, _, _ = memit.prepare(model, tokenizer, cases[:2], _hparams((0, 1)))
    kuwait_targets = memit.MemitTargets(1, h[:1], h[:1], torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="'Osaka'.* not among the edited requests"):
        memit.success_with_targets(model, tokenizer, cases, kuwait_reqs, kuwait_groups, kuwait_targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_restores_exactly(family):
    model, tokenizer = _tiny(family, n_layer=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = [p.requires_grad for p in model.parameters()]
    with memit.edit(model, tokenizer, [KUWAIT, OSAKA], _hparams((0,), mom2_update_weight=1.0),
                    mom2=_mom2(model, tokenizer, [0])) as result:
        assert result.snapshot.changed()  # the edit really changed a weight
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert count_hooks(model) == 0


def test_two_passes_equal_a_second_edit_of_the_edited_model():
    # passes = 2 is defined as: edit, then edit the same requests again on the edited model
    model, tokenizer = _tiny(n_layer=3)
    layers = (0, 1)
    mom2 = _mom2(model, tokenizer, layers)
    hp = _hparams(layers, mom2_update_weight=1.0)  # a real λ, so the first pass leaves something to do
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w_before = {layer: memit.mlp_out_weight(model, layer).detach().clone() for layer in layers}  # [d_model, d_ff]
    with memit.edit(model, tokenizer, [KUWAIT, OSAKA], hp, mom2=mom2) as first:
        with memit.edit(model, tokenizer, [KUWAIT, OSAKA], hp, mom2=mom2) as second:
            expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with memit.edit(model, tokenizer, [KUWAIT, OSAKA], dataclasses.replace(hp, passes=2), mom2=mom2) as both:
        assert all(torch.equal(p, expected[n]) for n, p in model.named_parameters())
        assert [(r.pass_index, r.layer) for r in both.records] == [(0, 0), (0, 1), (1, 0), (1, 1)]
        assert torch.equal(both.pass_targets[1].z, second.targets.z)
        assert torch.equal(both.targets.z, first.targets.z)
        for layer in layers:  # the recorded ΔW of both passes add up to what changed
            change = memit.mlp_out_weight(model, layer).detach() - w_before[layer]
            torch.testing.assert_close(both.deltas[layer], change.float(), rtol=1e-4, atol=1e-6)
        # the second pass started from the first pass's h and still had a gap to close
        assert not torch.equal(both.pass_targets[1].h, both.pass_targets[0].h)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # one restore undoes both passes
    with pytest.raises(ValueError, match="passes must be at least 1"):
        memit.edit(model, tokenizer, [KUWAIT], dataclasses.replace(hp, passes=0), mom2=mom2)


def test_conflicting_requests_are_rejected_with_the_pairs_named():
    model, tokenizer = _tiny(n_layer=2)
    before = [p.detach().clone() for p in model.parameters()]
    other = {**KUWAIT, "prompt": "{}'s continent is", "target_new": {"str": "Africa"}}
    # the requests carry their relation: two wordings with one relation_id are one fact
    with pytest.raises(ValueError, match=r"'Kuwait' / 'continent' -> \['Europe', 'Africa'\]"):
        memit.edit(model, tokenizer, [{**KUWAIT, "relation_id": "continent"}, OSAKA,
                                      {**other, "relation_id": "continent"}], _hparams((0,)))
    # without relation_id, a request's relation is its prompt: the same prompt twice is one fact
    with pytest.raises(ValueError, match=r"'Kuwait' / '\{\} lies on the continent of' -> \['Europe', 'Africa'\]"):
        memit.edit(model, tokenizer, [KUWAIT, {**KUWAIT, "target_new": {"str": "Africa"}}], _hparams((0,)))
    case = {"requested_rewrite": {**OSAKA, "relation_id": "r1", "target_new": {"str": "Asia"}}}
    with pytest.raises(ValueError, match="Osaka"):
        memit.edit(model, tokenizer, [{**OSAKA, "relation_id": "r1"}, case], _hparams((0,)))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    # the same fact asked twice, or one subject with two relations, is no conflict; nor are two
    # wordings without relation_id (no guessing of the relation from the wording)
    assert not memit.find_conflicts([memit.as_request(r) for r in (KUWAIT, KUWAIT, KUWAIT_CAPITAL)])
    assert not memit.find_conflicts([memit.as_request(r) for r in (KUWAIT, other)])
    assert [memit.as_request(r).relation for r in (KUWAIT, {**KUWAIT, "relation_id": "P30"})] == [
        "{} lies on the continent of", "P30"]


def test_hparams_of_the_paper():
    xl = memit.MemitHparams.for_model("gpt2-xl")
    assert xl.layers == (13, 14, 15, 16, 17) and xl.mom2_update_weight == 20000
    gptj = memit.MemitHparams.for_model("EleutherAI/gpt-j-6B")
    assert gptj.layers == (3, 4, 5, 6, 7, 8) and gptj.mom2_update_weight == 15000
    with pytest.raises(ValueError, match="known"):
        memit.MemitHparams.for_model("no-such-model")
    assert dataclasses.replace(memit.MemitHparams.for_model("atlas")).layers


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer", [0, 1])  # 1: the last block MEMIT accepts (it refuses the last block, 2)
def test_targets_equal_the_naive_full_forward_per_step(family, layer):
    """The fast z (only the blocks after `layer`, from each row's subject's last token, run per
    step) equals one full forward pass per step, also when one group stops before the other."""
    model, tokenizer = _tiny(family, n_layer=3)
    hp = _hparams((layer,), prefixes=((3, 2), (5, 1)), v_steps=8, v_lr=1.0)
    reqs, groups, hp, prefixes = memit.prepare(model, tokenizer, [KUWAIT, KUWAIT_CAPITAL, OSAKA], hp)
    naive = memit.compute_targets_naive(model, tokenizer, reqs, groups, layer, prefixes, hp)
    hp = dataclasses.replace(hp, stop_threshold=naive.final_loss.mean().item())  # groups stop at different steps
    naive = memit.compute_targets_naive(model, tokenizer, reqs, groups, layer, prefixes, hp)
    fast = memit.compute_targets(model, tokenizer, reqs, groups, layer, prefixes, hp)
    assert naive.steps.min() < naive.steps.max()
    assert torch.equal(fast.steps, naive.steps)
    torch.testing.assert_close(fast.h, naive.h)
    torch.testing.assert_close(fast.z, naive.z, rtol=1e-5, atol=1e-5 * naive.z.norm().item())
    for name in ("final_nll", "final_loss", "final_kl", "final_decay"):
        torch.testing.assert_close(getattr(fast, name), getattr(naive, name), rtol=1e-5, atol=1e-6)


def test_targets_equal_the_naive_ones_on_atlas():
    from kn_tutorial.models import load_model
    model, tokenizer = load_model("atlas")
    hp = memit.MemitHparams.for_model("atlas")
    cases = [KUWAIT, OSAKA, {"prompt": "{} is a city in the country of", "subject": "Osaka", "target_new": {"str": "Peru"}}]
    reqs, groups, hp, prefixes = memit.prepare(model, tokenizer, cases, hp)
    layer = hp.layers[-1]
    fast = memit.compute_targets(model, tokenizer, reqs, groups, layer, prefixes, hp)
    naive = memit.compute_targets_naive(model, tokenizer, reqs, groups, layer, prefixes, hp)
    assert torch.equal(fast.steps, naive.steps)
    torch.testing.assert_close(fast.z, naive.z, rtol=1e-5, atol=1e-5 * naive.z.norm().item())


# ---- the objective of z: the paper's code by default, the other forms as options (issue 17) ----------------

def _brute_force_kl_and_nll(model, tokenizer, layer, delta, kl_prompt):
    """Independent: δ added to block `layer`'s output at the subject's last token by a plain forward hook,
    one unpadded prompt at a time, float64. Returns (NLL of KUWAIT's target, KL(after ‖ before), KL(before ‖ after))."""
    from kn_tutorial.scoring import target_ids

    def last_subject_token(text):
        end = text.rindex("Kuwait") + len("Kuwait")
        return len(tokenizer(text[:end], add_special_tokens=False)["input_ids"]) - 1

    def logprobs(text, extra, add):
        at = last_subject_token(text)

        def hook(mod, inp, out):
            hidden = out[0] if isinstance(out, tuple) else out
            if add:
                hidden = hidden + torch.nn.functional.one_hot(torch.tensor(at), hidden.shape[1])[None, :, None] * delta
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        handle = model.transformer.h[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                ids = tokenizer(text, add_special_tokens=False)["input_ids"] + extra
                return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1), len(ids) - len(extra)
        finally:
            handle.remove()

    target = target_ids(tokenizer, KUWAIT["target_new"]["str"])
    lp, n = logprobs(KUWAIT["prompt"].format("Kuwait"), target[:-1], True)
    nll = -sum(lp[n - 1 + j, t] for j, t in enumerate(target)) / len(target)
    after, n = logprobs(kl_prompt.format("Kuwait"), [], True)
    before, _ = logprobs(kl_prompt.format("Kuwait"), [], False)
    a, b = after[n - 1], before[n - 1]
    return nll.item(), (a.exp() * (a - b)).sum().item(), (b.exp() * (b - a)).sum().item()


@pytest.mark.parametrize("kl_direction", ["after||before", "before||after"])
@pytest.mark.parametrize("decay_power", [1, 2])
def test_target_loss_terms_match_an_independent_computation(kl_direction, decay_power):
    """One Adam step (v_steps=1, threshold 0): the recorded terms at the returned z equal a plain evaluation.
    The decay is v_weight_decay · ‖z − h‖^p / ‖h‖² (p = 1: the paper's code; 2: the squared option)."""
    model, tokenizer = _tiny(n_layer=3)
    kl_prompt = "We visit {}"  # ends with the subject: δ moves its next-token distribution, the directions differ
    hp = _hparams((1,), v_steps=1, v_lr=4.0, clamp_norm_factor=100.0, kl_factor=0.5, kl_prompts=(kl_prompt,),
                  stop_threshold=0.0, kl_direction=kl_direction, decay_power=decay_power)
    reqs, groups, hp, prefixes = memit.prepare(model, tokenizer, [KUWAIT], hp)
    t = memit.compute_targets(model, tokenizer, reqs, groups, 1, prefixes, hp)
    delta, h = (t.z - t.h)[0].double(), t.h[0].double()
    assert t.steps.tolist() == [1] and abs(delta.norm().item() - 1) > 0.5  # ‖δ‖ ≠ 1: ‖δ‖ and ‖δ‖² differ
    nll, kl_ab, kl_ba = _brute_force_kl_and_nll(model, tokenizer, 1, (t.z - t.h)[0], kl_prompt)
    assert abs(kl_ab - kl_ba) > 0.02 * max(kl_ab, kl_ba)  # 20x the tolerance below
    want_kl = kl_ab if kl_direction == "after||before" else kl_ba
    want_decay = hp.v_weight_decay * delta.norm().item() ** decay_power / h.norm().item() ** 2
    assert t.final_nll.item() == pytest.approx(nll, rel=1e-4)
    assert t.final_kl.item() == pytest.approx(want_kl, rel=1e-3)
    assert t.final_decay.item() == pytest.approx(want_decay, rel=1e-4)
    assert t.final_loss.item() == pytest.approx(nll + hp.kl_factor * want_kl + want_decay, rel=1e-4)


def test_target_groups_stop_on_the_total_loss_by_default():
    """A threshold between a group's NLL and its total loss after one step: stop_on="nll" stops there,
    the default (the paper's code: the total loss) takes the next step."""
    model, tokenizer = _tiny(n_layer=3)
    hp = _hparams((1,), v_steps=1, v_lr=1.0, kl_factor=0.5, stop_threshold=0.0)
    reqs, groups, hp, prefixes = memit.prepare(model, tokenizer, [KUWAIT], hp)
    one = memit.compute_targets(model, tokenizer, reqs, groups, 1, prefixes, hp)
    assert one.final_loss.item() > one.final_nll.item()
    hp = dataclasses.replace(hp, v_steps=3, stop_threshold=(one.final_loss.item() + one.final_nll.item()) / 2)
    by_loss = memit.compute_targets(model, tokenizer, reqs, groups, 1, prefixes, hp)
    by_nll = memit.compute_targets(model, tokenizer, reqs, groups, 1, prefixes, dataclasses.replace(hp, stop_on="nll"))
    assert by_nll.steps.tolist() == [1] and by_loss.steps.item() > 1
    torch.testing.assert_close(by_nll.z, one.z)


def test_a_group_whose_loss_is_already_below_the_threshold_keeps_delta_zero():
    """At step 0 (δ = 0) the total loss is the NLL; below the threshold a group takes no step and z = h
    exactly (its fact already holds: not an error, as in the paper's code)."""
    model, tokenizer = _tiny(n_layer=3)
    hp = _hparams((1,), v_steps=4, stop_threshold=1e6)
    reqs, groups, hp, prefixes = memit.prepare(model, tokenizer, [KUWAIT, OSAKA], hp)
    t = memit.compute_targets(model, tokenizer, reqs, groups, 1, prefixes, hp)
    assert t.steps.tolist() == [0, 0] and torch.equal(t.z, t.h)
    torch.testing.assert_close(t.final_loss, t.final_nll)
    assert torch.count_nonzero(t.final_decay) == 0


def test_lambda_rule_per_key_equals_the_constant_lambda_it_names():
    # mom2_update_weight_per_key = c gives λ = c · (number of key groups): the same ΔW, bit for bit,
    # as the paper's constant λ set to that product by hand; and nothing else changes
    model, tokenizer = _tiny(n_layer=2)
    mom2 = _mom2(model, tokenizer, [0])
    requests = [KUWAIT, KUWAIT_CAPITAL, OSAKA]  # Kuwait's two requests share their key: 2 key groups
    hp = _hparams((0,), mom2_update_weight_per_key=0.7)
    assert len(memit.key_groups([memit.as_request(r) for r in requests])) == 2
    assert hp.update_weight(2) == pytest.approx(1.4) and _hparams((0,)).update_weight(5) == 1e-6
    with memit.edit(model, tokenizer, requests, hp, mom2=mom2) as ruled:
        by_rule = ruled.deltas[0].clone()
    with memit.edit(model, tokenizer, requests, _hparams((0,), mom2_update_weight=0.7 * 2), mom2=mom2) as constant:
        assert torch.equal(constant.deltas[0], by_rule)
    with memit.edit(model, tokenizer, requests, _hparams((0,), mom2_update_weight=0.7), mom2=mom2) as other:
        assert not torch.equal(other.deltas[0], by_rule)  # the rule really multiplies by n
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="mom2_update_weight_per_key"):
            memit.edit(model, tokenizer, requests, _hparams((0,), mom2_update_weight_per_key=bad), mom2=mom2)


@pytest.mark.parametrize("family", FAMILIES)
def test_first_pass_with_shared_prefixes_equals_one_full_pass(family):
    """memit_engine._first_pass (each prefix's tokens run once, rows attending to them through a KV
    cache) gives one right-padded full pass's block output, keys and values at every real token
    and logits at each row's last token."""
    from kn_tutorial.hooks import Recorder
    from kn_tutorial.kv_cache import output_cache
    from kn_tutorial.memit_engine import _first_pass
    from kn_tutorial.scoring import pad_rows
    model, tokenizer = _tiny(family, n_layer=3)
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(5, 100, (4,), generator=g).tolist()
    rows = [prefix + torch.randint(5, 100, (n,), generator=g).tolist() for n in (3, 5, 2)]  # share 4 tokens
    rows += [torch.randint(5, 100, (n,), generator=g).tolist() for n in (6, 4)]  # no prefix
    partition, lookup, layer = [1, 1, 1, 0, 0], [5, 4, 4, 2, 1], 0
    input_ids, mask = pad_rows(rows, tokenizer.eos_token_id, torch.device("cpu"))
    with torch.no_grad(), Recorder(model, [("hidden", layer)]) as rec:
        out = model(input_ids=input_ids, attention_mask=mask, use_cache=True)
    hidden, kv, last = _first_pass(model, rows, partition, lookup, layer, mask.shape[1], tokenizer.eos_token_id,
                                   torch.device("cpu"))
    full_kv = [(k, v) for k, v, *_ in output_cache(out)]
    for r, row in enumerate(rows):
        n = len(row)
        torch.testing.assert_close(hidden[r, :n], rec[("hidden", layer)][r, :n], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(last[r], out.logits[r, n - 1], atol=1e-5, rtol=1e-5)
        for b in range(1, len(full_kv)):
            torch.testing.assert_close(kv[b][0][r, :, :n], full_kv[b][0][r, :, :n], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(kv[b][1][r, :, :n], full_kv[b][1][r, :, :n], atol=1e-5, rtol=1e-5)
    assert kv[0] is None

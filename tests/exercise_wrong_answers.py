"""Plausible wrong answers to the chapters' exercises, each with a piece of the message its check
must give. tests/test_exercises.py runs every check on each of them and expects an
ExerciseError (an AssertionError) containing that piece, and the weights untouched afterwards.

WRONG[check name] = [(label, function, expected message piece), ...]
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from kn_tutorial import memit, rome, tracing
from kn_tutorial.hooks import patch, record
from kn_tutorial.memories import value_top_tokens as package_value_top_tokens
from kn_tutorial.models import (get_module, key_bias, key_matrix, mlp_activation, mlp_out_weight, n_layers,
                                unembedding_matrix, value_bias, value_matrix)
from kn_tutorial.scoring import score, target_ids
from kn_tutorial.tokens import subject_span

CHANGED_WEIGHTS = "changed the model's weights"
PACKAGE = "the package's own implementation"


# ---- chapter 1 ------------------------------------------------------------------------------------

def _ffn(model, layer, x, bias=True):
    m = mlp_activation(model, layer)(x @ key_matrix(model, layer).T + key_bias(model, layer))
    return m @ value_matrix(model, layer) + (value_bias(model, layer) if bias else 0)


def ffn_no_value_bias(model, layer, x):
    return _ffn(model, layer, x, bias=False)


def ffn_calls_the_module(model, layer, x):
    return get_module(model, layer, "mlp")(x)


def ffn_scales_weights_in_place(model, layer, x):
    with torch.no_grad():
        value_matrix(model, layer).mul_(2)
    return _ffn(model, layer, x) / 2


def ffn_coefficients_only(model, layer, x):
    return mlp_activation(model, layer)(x @ key_matrix(model, layer).T + key_bias(model, layer))


def top_tokens_reversed(model, layer, neuron, k):
    return _top(model, layer, neuron, k).flip(0)


def _top(model, layer, neuron, k, weights=value_matrix):
    p = (weights(model, layer)[neuron] @ unembedding_matrix(model).T).softmax(-1)
    return p.topk(k).indices


def top_tokens_of_the_key(model, layer, neuron, k):
    return _top(model, layer, neuron, k, weights=key_matrix)


def top_tokens_from_package(model, layer, neuron, k):
    return package_value_top_tokens(model, layer, k, neurons=[neuron])[0][0]


def agreement_top_one_only(next_tokens, value_top):
    return (value_top[:, 0] == next_tokens).float().mean().item()


def agreement_count(next_tokens, value_top):
    return (value_top == next_tokens[:, None]).any(-1).sum().item()


@torch.no_grad()
def _triggers(model, tokenizer, texts, layer, neuron, k, keep_last=False, ascending=False):
    cands = []
    for ti, text in enumerate(texts):
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        a = record(model, [("key", layer)], input_ids=ids)[("key", layer)][0, :, neuron]
        cands += [(a[p].item(), ti, p) for p in range(ids.shape[1] - (0 if keep_last else 1))]
    ranked = sorted(cands, reverse=not ascending)
    return [(ti, p) for _, ti, p in ranked[:k]]


def triggers_with_last_token(*args):
    return _triggers(*args, keep_last=True)


def triggers_weakest_first(*args):
    return _triggers(*args, ascending=True)


def triggers_from_package(model, tokenizer, texts, layer, neuron, k):
    from kn_tutorial.memories import find_triggers
    found = find_triggers(model, tokenizer, texts, layers=[layer], top_k=k)
    return [(e.text_index, e.position) for e in found.examples(layer, neuron, k)]


# ---- chapter 2 ------------------------------------------------------------------------------------

def position_from_zero(J, d):
    j = torch.arange(0, J, dtype=torch.float32)[:, None]
    k = torch.arange(1, d + 1, dtype=torch.float32)[None, :]
    return (1 - j / J) - (k / d) * (1 - 2 * j / J)


def position_transposed(J, d):
    j = torch.arange(1, J + 1, dtype=torch.float32)[None, :]
    k = torch.arange(1, d + 1, dtype=torch.float32)[:, None]
    return (1 - j / J) - (k / d) * (1 - 2 * j / J)


def hop_softmax_wrong_axis(u, m, c, mask, coef):
    scores = torch.einsum("nd,nmd->nm", u, m)
    p = scores.masked_fill(~mask, float("-inf")).softmax(0) if coef == "softmax" else F.relu(scores) * mask
    p = torch.nan_to_num(p)
    return p, torch.einsum("nm,nmd->nd", p, c)


def hop_mask_after_softmax(u, m, c, mask, coef):
    scores = torch.einsum("nd,nmd->nm", u, m)
    act = {"softmax": lambda s: s.softmax(-1), "relu": F.relu, "gelu": F.gelu}[coef]
    p = act(scores) * mask
    return p, torch.einsum("nm,nmd->nd", p, c)


def hop_reads_m(u, m, c, mask, coef):
    scores = torch.einsum("nd,nmd->nm", u, m)
    act = {"softmax": lambda s: s.masked_fill(~mask, float("-inf")).softmax(-1), "relu": lambda s: F.relu(s) * mask,
           "gelu": lambda s: F.gelu(s) * mask}[coef]
    p = act(scores)
    return p, torch.einsum("nm,nmd->nd", p, m)


def effective_not_normalised(p):
    return torch.exp(-(p * torch.log(p.clamp(min=1e-12))).sum(-1))


def effective_entropy_only(p):
    total = p.sum(-1, keepdim=True)
    pi = p / total.clamp(min=1e-12)
    return -(pi * torch.log(pi.clamp(min=1e-12))).sum(-1)


def _hops(u, memories, mask, coef, update="add", tied=True):
    ps = []
    for k in range(len(memories) - 1):
        scores = torch.einsum("nd,nmd->nm", u, memories[k])
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1) if coef == "softmax" else F.relu(scores) * mask
        o = torch.einsum("nm,nmd->nd", p, memories[k + 1] if tied else memories[k])
        ps.append(p)
        u = {"add": u + o, "replace": o, "none": u}[update]
    return u, ps


def hops_without_update(u, memories, mask, coef):
    return _hops(u, memories, mask, coef, update="none")


def hops_replacing_u(u, memories, mask, coef):
    return _hops(u, memories, mask, coef, update="replace")


def hops_untied(u, memories, mask, coef):
    return _hops(u, memories, mask, coef, tied=False)


def hops_with_package(u, memories, mask, coef):
    from kn_tutorial.memnet.model import memory_read
    ps = []
    for k in range(len(memories) - 1):
        p, o = memory_read(u, memories[k], memories[k + 1], mask, coef)
        ps.append(p)
        u = u + o
    return u, ps


# ---- chapter 3 ------------------------------------------------------------------------------------

def alphas_swapped(steps, rule):
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    return {"left": k / steps, "right": (k - 1) / steps, "midpoint": (k - 0.5) / steps}[rule]


def alphas_linspace(steps, rule):
    return torch.linspace(0, 1, steps, dtype=torch.float64)


def _ig(model, tokenizer, prompt, target, layer, steps, times_w=True, reduce="mean"):
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    w_bar = record(model, [("key", layer)], input_ids=ids)[("key", layer)][0, -1]
    alphas = torch.arange(1, steps + 1) / steps
    scaled = (alphas[:, None] * w_bar[None, :]).requires_grad_(True)

    def write(key):
        key = key.clone()
        key[:, -1] = scaled
        return key

    with patch(model, "key", layer, write):
        logits = model(input_ids=ids.expand(steps, -1)).logits[:, -1]
    prob = logits.float().softmax(-1)[:, target_ids(tokenizer, target)[0]]
    (grad,) = torch.autograd.grad(prob.sum(), scaled)
    g = grad.mean(0) if reduce == "mean" else grad.sum(0)
    return w_bar * g if times_w else g


def ig_without_activation(model, tokenizer, prompt, target, layer, steps):
    return _ig(model, tokenizer, prompt, target, layer, steps, times_w=False)


def ig_summed(model, tokenizer, prompt, target, layer, steps):
    return _ig(model, tokenizer, prompt, target, layer, steps, reduce="sum")


def ig_from_package(model, tokenizer, prompt, target, layer, steps):
    from kn_tutorial.attribution import integrated_gradients
    return integrated_gradients(model, tokenizer, prompt, target, steps=steps, layers=[layer])[0]


def gap_flipped(model, tokenizer, prompt, target, layer):
    from kn_tutorial.hooks import set_neurons
    from kn_tutorial.models import d_ff
    last = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - 1
    p = lambda: score(model, tokenizer, [prompt], [target])["first_prob"][0].item()  # noqa: E731
    with set_neurons(model, layer, list(range(d_ff(model))), value=0.0, positions=[last]):
        p_zero = p()
    return p_zero - p()


def gap_from_package(model, tokenizer, prompt, target, layer):
    from kn_tutorial.attribution import probability_gap
    return probability_gap(model, tokenizer, prompt, target)[layer].item()


def _axg(model, tokenizer, prompt, target, layer, times_w=True, all_positions=False):
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    w_bar = record(model, [("key", layer)], input_ids=ids)[("key", layer)][0]
    w = w_bar.clone().requires_grad_(True)
    with patch(model, "key", layer, lambda key: w[None] if all_positions else torch.cat([key[:, :-1], w[None, -1:]], 1)):
        logits = model(input_ids=ids).logits[0, -1]
    (grad,) = torch.autograd.grad(logits.float().softmax(-1)[target_ids(tokenizer, target)[0]], w)
    return (w_bar[-1] * grad[-1]) if times_w else grad[-1]


def axg_gradient_only(model, tokenizer, prompt, target, layer):
    return _axg(model, tokenizer, prompt, target, layer, times_w=False)


def axg_from_package(model, tokenizer, prompt, target, layer):
    from kn_tutorial.attribution import integrated_gradients
    return integrated_gradients(model, tokenizer, prompt, target, steps=1, layers=[layer])[0]


def axg_logit_not_probability(model, tokenizer, prompt, target, layer):
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    w_bar = record(model, [("key", layer)], input_ids=ids)[("key", layer)][0, -1]
    w = w_bar.clone().requires_grad_(True)
    with patch(model, "key", layer, lambda key: torch.cat([key[:, :-1], w[None, None]], 1)):
        logits = model(input_ids=ids).logits[0, -1]
    (grad,) = torch.autograd.grad(logits[target_ids(tokenizer, target)[0]], w)
    return w_bar * grad


# ---- chapter 4 ------------------------------------------------------------------------------------

def refine_global_max(attributions, threshold, p):
    coarse = attributions > threshold * attributions.max()
    counts = coarse.sum(0)
    return [tuple(x) for x in (counts > p * attributions.shape[0]).nonzero().tolist()]


def refine_at_least(attributions, threshold, p):
    top = attributions.flatten(1).max(dim=1).values
    coarse = (attributions > threshold * top[:, None, None]) & (top > 0)[:, None, None]
    counts = coarse.sum(0)
    return [tuple(x) for x in (counts >= p * attributions.shape[0] - 1e-9).nonzero().tolist()]


def _mean(counts, n_prompts, p):
    return sum(int((c > p * n + 1e-9).sum()) for c, n in zip(counts, n_prompts)) / len(counts)


def adapt_p_raises(counts, n_prompts):  # the chapter's old spec: raises when the walk does not converge
    p = 0.7
    for _ in range(20):
        mean = _mean(counts, n_prompts, p)
        if 2 <= mean <= 5:
            return p
        p = round(p + (0.05 if mean > 5 else -0.05), 10)
    raise RuntimeError("no p puts the mean in [2, 5]")


def adapt_p_last_tried(counts, n_prompts):
    p, tried = 0.7, []
    while True:
        mean = _mean(counts, n_prompts, p)
        tried.append(p)
        if 2 <= mean <= 5:
            return p
        nxt = round(p + (0.05 if mean > 5 else -0.05), 10)
        if not 0 <= nxt < 1 or nxt in tried:
            return p
        p = nxt


def _kn_delta(model, tokenizer, old, new, lambda_old, lambda_new):
    e = unembedding_matrix(model)
    return lambda_new * e[target_ids(tokenizer, new)[0]] - lambda_old * e[target_ids(tokenizer, old)[0]]


def kn_update_every_row(model, tokenizer, neurons, old, new, lambda_old, lambda_new):
    for layer, _ in neurons:
        value_matrix(model, layer)[:] += _kn_delta(model, tokenizer, old, new, lambda_old, lambda_new)


def kn_update_also_bias(model, tokenizer, neurons, old, new, lambda_old, lambda_new):
    delta = _kn_delta(model, tokenizer, old, new, lambda_old, lambda_new)
    for layer, i in neurons:
        value_matrix(model, layer)[i] += delta
        value_bias(model, layer).add_(1e-3)


def kn_update_sign_flipped(model, tokenizer, neurons, old, new, lambda_old, lambda_new):
    delta = _kn_delta(model, tokenizer, old, new, lambda_old, lambda_new)
    for layer, i in neurons:
        value_matrix(model, layer)[i] -= delta


@torch.no_grad()
def _scaled(model, tokenizer, prompt, target, neurons, factor, every=False, set_value=False, first_layer=False):
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    by_layer = {}
    for layer, i in neurons:
        by_layer.setdefault(layer, []).append(i)
    if first_layer:
        by_layer = dict(list(by_layer.items())[:1])

    def scale(idx):
        def fn(key):
            key = key.clone()
            where = (slice(None), slice(None) if every else -1, idx)
            key[where] = factor if set_value else key[where] * factor
            return key
        return fn

    from contextlib import ExitStack
    with ExitStack() as stack:
        for layer, idx in by_layer.items():
            stack.enter_context(patch(model, "key", layer, scale(idx)))
        logits = model(input_ids=ids).logits[0, -1]
    return logits.float().softmax(-1)[target_ids(tokenizer, target)[0]].item()


def scaled_at_every_position(*args):
    return _scaled(*args, every=True)


def scaled_set_not_multiplied(*args):
    return _scaled(*args, set_value=True)


def scaled_first_layer_only(*args):
    return _scaled(*args, first_layer=True)


# ---- chapter 5 ------------------------------------------------------------------------------------

@torch.no_grad()
def _corrupted(model, input_ids, noise, target_id, site="resid_pre", position=-1):
    with patch(model, site, 0, lambda x: x + noise.to(x)):
        logits = model(input_ids=input_ids[None]).logits[0, position]
    return logits.float().softmax(-1)[target_id].item()


def corrupted_after_block_0(model, input_ids, noise, target_id):
    return _corrupted(model, input_ids, noise, target_id, site="hidden")


def corrupted_wrong_position(model, input_ids, noise, target_id):
    return _corrupted(model, input_ids, noise, target_id, position=-2)


@torch.no_grad()
def corrupted_without_noise(model, input_ids, noise, target_id):
    return model(input_ids=input_ids[None]).logits[0, -1].float().softmax(-1)[target_id].item()


def roles_always_subsequent(span, seq_len):
    a, b = span
    return [[a], list(range(a + 1, b - 1)), [b - 1], [b], list(range(b + 1, seq_len - 1)), [seq_len - 1]]


def roles_further_to_the_end(span, seq_len):
    a, b = span
    return [[a], list(range(a + 1, b - 1)), [b - 1], [b] if b < seq_len else [], list(range(b + 1, seq_len)),
            [seq_len - 1]]


@torch.no_grad()
def _restore(model, input_ids, noise, target_id, layer, position, add_noise=True):
    ids = input_ids[None]
    clean = record(model, ("hidden", layer), input_ids=ids)[("hidden", layer)]

    def restore(h):
        h = h.clone()
        h[:, position] = clean[:, position]
        return h

    with patch(model, "resid_pre", 0, lambda x: x + noise.to(x) if add_noise else x), \
            patch(model, "hidden", layer, restore):
        logits = model(input_ids=ids).logits[0, -1]
    return logits.float().softmax(-1)[target_id].item()


def restore_without_noise(model, input_ids, noise, target_id, layer, position):
    return _restore(model, input_ids, noise, target_id, layer, position, add_noise=False)


def restore_next_position(model, input_ids, noise, target_id, layer, position):
    return _restore(model, input_ids, noise, target_id, layer, min(position + 1, len(input_ids) - 1))


def restore_with_package(model, input_ids, noise, target_id, layer, position):
    mask = torch.zeros(n_layers(model), len(input_ids), dtype=torch.bool)
    mask[layer, position] = True
    return tracing.restore_states(model, input_ids, (0, 1), mask, target=target_id)["probs"][0, 0].item()


@torch.no_grad()
def severed_with_clean_mlps(model, input_ids, noise, target_id, layer, position):
    from contextlib import ExitStack
    ids = input_ids[None]
    later = range(layer + 1, n_layers(model))
    clean = record(model, [("hidden", layer)] + [("mlp_out", k) for k in later], input_ids=ids)

    def put(values):
        def fn(x):
            x = x.clone()
            x[:, position] = values[:, position]
            return x
        return fn

    with ExitStack() as stack:
        stack.enter_context(patch(model, "resid_pre", 0, lambda x: x + noise.to(x)))
        stack.enter_context(patch(model, "hidden", layer, put(clean[("hidden", layer)])))
        for k in later:
            stack.enter_context(patch(model, "mlp_out", k, put(clean[("mlp_out", k)])))
        logits = model(input_ids=ids).logits[0, -1]
    return logits.float().softmax(-1)[target_id].item()


def severed_nothing_frozen(model, input_ids, noise, target_id, layer, position):
    return _restore(model, input_ids, noise, target_id, layer, position)


def _aie(effects, spans, pooled=False, per_all_facts=False, nan=False):
    L = effects[0].shape[1]
    sums, counts = torch.zeros(6, L), torch.zeros(6)
    for grid, span in zip(effects, spans):
        for r, positions in enumerate(tracing.token_roles(span, grid.shape[0])):
            if positions:
                sums[r] += grid[positions].sum(0) if pooled else grid[positions].mean(0)
                counts[r] += len(positions) if pooled else 1
    if per_all_facts:
        return sums / len(effects)
    return sums / (counts if nan else counts.clamp(min=1))[:, None]


def aie_pooled(effects, spans):
    return _aie(effects, spans, pooled=True)


def aie_over_all_facts(effects, spans):
    return _aie(effects, spans, per_all_facts=True)


def aie_nan_for_missing_roles(effects, spans):
    return _aie(effects, spans, nan=True)


# ---- chapter 6 ------------------------------------------------------------------------------------

def rank_one_along_k(W, C, k_star, v_star):
    return W + torch.outer((v_star - W @ k_star) / (k_star @ k_star), k_star)


def rank_one_in_place(W, C, k_star, v_star):
    u = torch.linalg.solve(C, k_star)
    W += torch.outer((v_star - W @ k_star) / (u @ k_star), u)
    return W


def rank_one_from_package(W, C, k_star, v_star):
    return W + rome.rank_one_update(W.clone(), C, k_star, v_star - W @ k_star)


def rank_one_v_star_as_residual(W, C, k_star, v_star):
    u = torch.linalg.solve(C, k_star)
    return W + torch.outer(v_star / (u @ k_star), u)


def _k_star(model, tokenizer, prompt, subject, layer, prefixes, first=False, skip_empty=False):
    keys = []
    for prefix in prefixes:
        if skip_empty and not prefix:
            continue
        text = prefix + prompt.format(subject)
        a, b = subject_span(tokenizer, text, subject, occurrence=-1)
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        keys.append(record(model, [("key", layer)], input_ids=ids)[("key", layer)][0, a if first else b - 1])
    return torch.stack(keys).mean(0)


def k_star_first_token(model, tokenizer, prompt, subject, layer, prefixes):
    return _k_star(model, tokenizer, prompt, subject, layer, prefixes, first=True)


def k_star_without_empty_prefix(model, tokenizer, prompt, subject, layer, prefixes):
    return _k_star(model, tokenizer, prompt, subject, layer, prefixes, skip_empty=True)


def k_star_corrupting_weights(model, tokenizer, prompt, subject, layer, prefixes):
    with torch.no_grad():
        mlp_out_weight(model, layer).mul_(0.5)  # "just to look": halves the layer's values
    return _k_star(model, tokenizer, prompt, subject, layer, prefixes)


def k_star_from_package(model, tokenizer, prompt, subject, layer, prefixes):
    return rome.compute_k_star(model, tokenizer, prompt, subject, layer, prefixes)


def _loss(t, a, b, d, n, kf, wd, kl_reverse=False, squared=False, summed=False):
    # a: log P_after, b: log P_before. Right: KL(after ‖ before) = kl_div(b, a); reversed: KL(before ‖ after)
    nll = -(t.sum(1) if summed else t.mean(1)).mean()
    kl = F.kl_div(a, b, log_target=True, reduction="batchmean") if kl_reverse else \
        F.kl_div(b, a, log_target=True, reduction="batchmean")
    return nll + kf * kl + wd * (d.norm() ** 2 if squared else d.norm()) / n ** 2


def loss_kl_reversed(*args):
    return _loss(*args, kl_reverse=True)


def loss_squared_decay(*args):
    return _loss(*args, squared=True)


def loss_summed_nll(*args):
    return _loss(*args, summed=True)


def loss_as_number(*args):
    return _loss(*args).item()


def efficacy_hard_coded(model, tokenizer, case):
    return 0.0, -1.0


def efficacy_first_token(model, tokenizer, case):
    rw = case["requested_rewrite"]
    text = rw["prompt"].format(rw["subject"])
    p = score(model, tokenizer, [text, text], [rw["target_new"]["str"], rw["target_true"]["str"]])["first_prob"]
    return float(p[0] > p[1]), (p[0] - p[1]).item()


def efficacy_from_package(model, tokenizer, case):
    from kn_tutorial.evaluation import evaluate_cases
    (row,) = evaluate_cases(model, tokenizer, [case])
    return row["ES"], row["EM"]


# ---- chapter 7 ------------------------------------------------------------------------------------

def joint_without_lambda(mom2, keys, residuals, lam):
    return torch.linalg.solve(mom2 + keys.T @ keys, keys.T @ residuals).T


def joint_transposed(mom2, keys, residuals, lam):
    return torch.linalg.solve(lam * mom2 + keys.T @ keys, keys.T @ residuals)


def joint_from_package(mom2, keys, residuals, lam):
    return memit.solve_update(mom2, keys, residuals, lam)


def memit_rank_one_without_lambda(mom2, k, r, lam):
    u = torch.linalg.solve(mom2, k)
    return torch.outer(r, u) / (u @ k)


def memit_rank_one_one_plus(mom2, k, r, lam):
    u = torch.linalg.solve(mom2, k)
    return torch.outer(r, u) / (1 + lam * (u @ k))


def memit_rank_one_from_package(mom2, k, r, lam):
    return memit.solve_update(mom2, k[None], r[None], lam)


def groups_by_subject(requests):
    groups = {}
    for i, r in enumerate(requests):
        groups.setdefault(r["subject"], []).append(i)
    return list(groups.values())


def groups_by_prompt(requests):
    groups = {}
    for i, r in enumerate(requests):
        groups.setdefault(r["prompt"].format(r["subject"]), []).append(i)
    return list(groups.values())


def _loop(model, layers, z, keys_at, hidden_at_last, solve, h_once=False, equal=False, late=False):
    deltas, h0 = {}, hidden_at_last()
    for i, layer in enumerate(layers):
        keys, h = keys_at(layer), (h0 if h_once else hidden_at_last())
        deltas[layer] = solve(layer, keys, (z - h) / (len(layers) if equal else len(layers) - i))
        if not late:
            with torch.no_grad():
                mlp_out_weight(model, layer).add_(deltas[layer].float())
    if late:
        for layer, delta in deltas.items():
            with torch.no_grad():
                mlp_out_weight(model, layer).add_(delta.float())
    return deltas


def loop_h_read_once(*args):
    return _loop(*args, h_once=True)


def loop_equal_shares(*args):
    return _loop(*args, equal=True)


def loop_updates_at_the_end(*args):
    return _loop(*args, late=True)


SPREAD = "At each layer read the keys and h"
WRONG = {
    "check_ffn_output": [("forgets b_V", ffn_no_value_bias, "your result differs"),
                         ("calls the MLP module", ffn_calls_the_module, PACKAGE),
                         ("scales V in place", ffn_scales_weights_in_place, CHANGED_WEIGHTS),
                         ("returns the coefficients", ffn_coefficients_only, "coefficients m instead")],
    "check_value_top_tokens": [("reversed order", top_tokens_reversed, "another order"),
                               ("the key instead of the value", top_tokens_of_the_key, "models.value_matrix"),
                               ("calls the package", top_tokens_from_package, PACKAGE)],
    "check_agreement_rate": [("top-1 only", agreement_top_one_only, "anywhere in its own row"),
                             ("a count, not a share", agreement_count, "share of keys")],
    "check_top_triggers": [("the last token too", triggers_with_last_token, "leave each text's last token out"),
                           ("weakest first", triggers_weakest_first, "Rank the coefficients"),
                           ("calls find_triggers", triggers_from_package, PACKAGE)],
    "check_hops": [("u never updated", hops_without_update, "u^{k+1} = u^k + o^k"),
                   ("u replaced by o", hops_replacing_u, "u^{k+1} = u^k + o^k"),
                   ("values from the key embedding", hops_untied, "reads the values of embedding k+1"),
                   ("calls memory_read", hops_with_package, PACKAGE)],
    "check_position_encoding": [("j from 0", position_from_zero, "Off by one"),
                                ("transposed", position_transposed, "transpose")],
    "check_memory_hop": [("softmax over the wrong axis", hop_softmax_wrong_axis, "last axis"),
                         ("mask after the softmax", hop_mask_after_softmax, "-inf before normalising"),
                         ("reads m instead of c", hop_reads_m, "output memories c")],
    "check_effective_number": [("not normalised", effective_not_normalised, "Normalise p"),
                               ("entropy without exp", effective_entropy_only, "Normalise p")],
    "check_riemann_alphas": [("left and right swapped", alphas_swapped, "left end, right end"),
                             ("linspace", alphas_linspace, "equal pieces")],
    "check_layer_ig": [("no activation factor", ig_without_activation, "Multiply the averaged gradient"),
                       ("summed gradients", ig_summed, "m times too large"),
                       ("calls the package", ig_from_package, PACKAGE)],
    "check_probability_gap": [("sign flipped", gap_flipped, "sign is flipped"),
                              ("calls the package", gap_from_package, PACKAGE)],
    "check_activation_times_gradient": [("the gradient alone", axg_gradient_only, "multiply it by w̄"),
                                        ("the logit's gradient", axg_logit_not_probability, "softmax probability"),
                                        ("calls the package", axg_from_package, PACKAGE)],
    "check_scaled_probability": [("every position", scaled_at_every_position, "last prompt token only"),
                                 ("set, not multiplied", scaled_set_not_multiplied, "multiply those neurons"),
                                 ("first layer only", scaled_first_layer_only, "each layer that has neurons")],
    "check_refine": [("global maximum", refine_global_max, "each prompt's own maximum"),
                     ("at least p·n", refine_at_least, "MORE than p·n")],
    "check_adapt_p": [("stops only when the range is hit", adapt_p_raises, "no p puts the mean"),
                      ("returns the last p tried", adapt_p_last_tried, "closest to [2, 5]")],
    "check_kn_update": [("every row", kn_update_every_row, "only the rows of the given neurons"),
                        ("also the bias", kn_update_also_bias, "not biases or embeddings"),
                        ("sign flipped", kn_update_sign_flipped, "differs from the reference")],
    "check_token_roles": [("always a subsequent token", roles_always_subsequent, "first subsequent token"),
                          ("further tokens to the end", roles_further_to_the_end, "further tokens")],
    "check_corrupted": [("noise after block 0", corrupted_after_block_0, "input of block 0"),
                        ("the second-to-last position", corrupted_wrong_position, "LAST position"),
                        ("no noise", corrupted_without_noise, "noise is added")],
    "check_restore_hidden": [("no noise", restore_without_noise, "noise added to the input"),
                             ("next position", restore_next_position, "written only at `position`"),
                             ("calls the package", restore_with_package, PACKAGE)],
    "check_aie_by_role": [("pooled positions", aie_pooled, "average within each fact"),
                          ("divided by all facts", aie_over_all_facts, "HAVE the role"),
                          ("NaN for missing roles", aie_nan_for_missing_roles, "NaN")],
    "check_severed": [("clean MLP outputs frozen", severed_with_clean_mlps, "corrupted run with the same noise"),
                      ("nothing frozen", severed_nothing_frozen, "corrupted run with the same noise")],
    "check_rank_one_update_rome": [("along k*", rank_one_along_k, "not the smallest change"),
                                   ("W changed in place", rank_one_in_place, "in place"),
                                   ("calls the package", rank_one_from_package, PACKAGE),
                                   ("v* as the residual", rank_one_v_star_as_residual, "residual v* − W k*")],
    "check_k_star": [("first subject token", k_star_first_token, "LAST token"),
                     ("no empty prefix", k_star_without_empty_prefix, "including the empty one"),
                     ("corrupts the weights", k_star_corrupting_weights, CHANGED_WEIGHTS),
                     ("calls the package", k_star_from_package, PACKAGE)],
    "check_v_star_loss": [("KL the wrong way", loss_kl_reversed, "wrong way round"),
                          ("squared decay", loss_squared_decay, "not a squared norm"),
                          ("summed NLL", loss_summed_nll, "length-normalised"),
                          ("a Python number", loss_as_number, "no .item()")],
    "check_efficacy": [("hard-coded (0, -1)", efficacy_hard_coded, "expected ES"),
                       ("first-token probability", efficacy_first_token, "teacher forcing"),
                       ("calls evaluate_cases", efficacy_from_package, PACKAGE)],
    "check_joint_update": [("no λ", joint_without_lambda, "left out λ"),
                           ("transposed", joint_transposed, "transpose"),
                           ("calls the package", joint_from_package, PACKAGE)],
    "check_rank_one_update_memit": [("no λ", memit_rank_one_without_lambda, "left out λ"),
                                    ("1 + λ uᵀk", memit_rank_one_one_plus, "not 1 + λ uᵀk"),
                                    ("calls the package", memit_rank_one_from_package, PACKAGE)],
    "check_key_groups": [("by subject", groups_by_subject, "up to the end of the subject"),
                         ("by the whole prompt", groups_by_prompt, "up to the end of the subject")],
    "check_layer_loop": [("h read once", loop_h_read_once, SPREAD),
                         ("equal shares", loop_equal_shares, SPREAD),
                         ("updates applied at the end", loop_updates_at_the_end, SPREAD)],
}

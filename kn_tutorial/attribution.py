"""Knowledge attribution by integrated gradients (Dai et al., 2022, "Knowledge Neurons in
Pretrained Transformers").

A knowledge neuron is entry i of the FFN activation w^(l) of layer l, hook point "key" of
hooks.HOOK_POINTS (the input of the MLP output projection, [batch, pos, d_ff]; the hook point
read and patched here; the batched engine also widens the batch at "resid_pre" of a block), at
the position where the answer is predicted. Its attribution is the integrated gradient along
the straight path from 0 to the layer's activations w̄^(l) (Sundararajan et al., 2017),
P_x(ŵ^(l)) being P(object) with the layer's activations at that position set to ŵ^(l):

    Attr(w_i^(l)) = w̄_i^(l) ∫₀¹ ∂P_x(α w̄^(l)) / ∂w_i^(l) dα
                  ≈ w̄_i^(l) / m · Σ_k ∂P_x(α_k w̄^(l)) / ∂w_i^(l)        (m steps α_k)

with the Riemann points of `riemann_alphas` ("right": Dai et al.'s equation, the default;
"left": their released code; "midpoint"). Completeness: Σ_i Attr → P_x(w̄) − P_x(0)
(`probability_gap`). P is the whole object by teacher forcing (target_tokens="all", the
book's convention) or its first token ("first").

`integrated_gradients_naive` is the definition run literally; `integrated_gradients` gives
the same numbers batched (how: `attribution_engine`). Figures and the explorer:
`attribution_display`.
"""
from __future__ import annotations

from contextlib import ExitStack
from typing import Sequence

import torch
from torch import Tensor, nn

from .attribution_engine import (  # noqa: F401  (the engine's names stay importable from here)
    _GROW_FAILED, ENGINES, _check_batch_size, _clean_pass, _default_batch_size, _engine, _forward,
    _grow_or_flat, _join_hook, _memory_budget, _one_fact_ig, _path_gradients, _Query, _row_plan,
    _run_rows_flat, _run_rows_grow, _target_prob,
)
from .hooks import Recorder, patch, record, set_neurons
from .lazy import lazy_exports
from .models import check_layer, d_ff, get_device, n_layers
from .progress import progress
from .scoring import probability_dtype, target_ids
from .validate import NonFiniteEditError, check_context, nonfinite_cause, shorten

RULES = ("right", "left", "midpoint")
TARGET_TOKENS = ("all", "first")

# Figures, HTML and the explorer live in attribution_display (it imports this module).
__getattr__ = lazy_exports(__package__, "attribution_display",
                           ("plot_attributions", "top_neurons_html", "attribution_explorer"))


# --------------------------------------------------------------------------------------
# The integration path
# --------------------------------------------------------------------------------------

def riemann_alphas(steps: int, rule: str = "right") -> Tensor:
    """The m points α_k in [0, 1] of a Riemann sum of ∫₀¹ g(α) dα ≈ (1/m) Σ_k g(α_k): [m]."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int (m in Dai et al.; they use 20), got {steps!r}")
    k = torch.arange(1, steps + 1, dtype=torch.float64)
    offsets = {"right": 0.0, "left": 1.0, "midpoint": 0.5}
    if rule not in offsets:
        raise ValueError(f"unknown Riemann rule {rule!r}; choose one of {RULES}")
    return (k - offsets[rule]) / steps


# --------------------------------------------------------------------------------------
# One query: the token sequence, the scaled position, what is scored
# --------------------------------------------------------------------------------------

def _query(model, tokenizer, prompt: str, target: str, position: int, target_tokens: str, device) -> _Query:
    if target_tokens not in TARGET_TOKENS:
        raise ValueError(f"target_tokens must be one of {TARGET_TOKENS}, got {target_tokens!r}")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not prompt_ids:
        raise ValueError(f"the prompt {prompt!r} has no tokens")
    tids = target_ids(tokenizer, target)  # with its leading space
    if target_tokens == "first":
        tids = tids[:1]
    n = len(prompt_ids)
    if isinstance(position, bool) or not isinstance(position, int) or not -n <= position < n:
        raise IndexError(
            f"position {position!r} is not a token of the prompt {prompt!r} ({n} tokens): "
            f"use -1 (the last prompt token, where the answer is predicted) or 0..{n - 1}"
        )
    seq = prompt_ids + tids[:-1]
    check_context(model, len(seq), f"the prompt {shorten(prompt)} with its target {target!r}")
    return _Query(
        seq=torch.tensor(seq, device=device),
        q=position % n,
        targets=torch.tensor(tids, device=device),
        predict_at=torch.arange(n - 1, n - 1 + len(tids), device=device),
    )


def _as_lists(prompt, target) -> tuple[list[str], list[str], bool]:
    single = isinstance(prompt, str)
    prompts = [prompt] if single else list(prompt)
    if isinstance(target, str):
        targets = [target] * len(prompts)
    else:
        targets = list(target)
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("no prompts given")
    return prompts, targets, single

def _layers(model, layers) -> list[int]:
    if layers is None:
        return list(range(n_layers(model)))
    if isinstance(layers, int):
        layers = [layers]
    out = [check_layer(model, layer) for layer in layers]
    if not out:
        raise ValueError("layers is empty: pass None for every layer, or a list of layer indices")
    if len(set(out)) != len(out):
        raise ValueError(f"layers contains duplicates: {list(layers)}")
    return out


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------

def integrated_gradients(
    model: nn.Module,
    tokenizer,
    prompt: str | Sequence[str],
    target: str | Sequence[str],
    steps: int = 20,
    layers: int | Sequence[int] | None = None,
    position: int = -1,
    batch_size: int | None = None,
    rule: str = "right",
    target_tokens: str = "all",
    engine: str = "grow",
    show_progress: bool = False,
) -> Tensor:
    """Attr(w_i^(l)) of every FFN neuron for the fact (prompt -> target): [L, d_ff] float32 (float64
    for a float64 model: probabilities, gradients and sums stay in float64), CPU.

    prompt, target: one fact, or lists of facts (a single target string is shared by all
        prompts); for n facts the result is [n, L, d_ff].
    steps: m, the number of Riemann steps (Dai et al.: 20).
    layers: the layers to score (default all); row j of the result is layers[j].
    position: the prompt token whose activations are scaled (-1: the last, where the answer
        is predicted; Dai et al.'s choice). Other positions keep their real activations.
    batch_size: rows (layer, step pairs) per forward/backward pass; None picks a size whose
        stored activations fit 1 GiB on a CPU (all L·m rows at once for Atlas) or a quarter of
        the free memory on a GPU.
    rule: "right" (default, Dai et al.'s equation), "left" (their code), or "midpoint".
    target_tokens: "all" scores P(whole target) by teacher forcing (default); "first" scores
        P(first target token).
    engine: "grow" (default: a row enters the batch at its own layer) or "flat" (every row
        runs every block); the same numbers, "grow" does about half the work.
    """
    prompts, targets, single = _as_lists(prompt, target)
    layer_list = _layers(model, layers)
    alphas = riemann_alphas(steps, rule)
    _check_batch_size(batch_size)
    device = get_device(model)
    out = []
    for p, t in progress(list(zip(prompts, targets)), desc="integrated gradients",
                         disable=not show_progress or len(prompts) == 1):
        query = _query(model, tokenizer, p, t, position, target_tokens, device)
        out.append(_one_fact_ig(model, query, layer_list, alphas, batch_size, engine))  # weights frozen inside
    result = out[0] if single else torch.stack(out)
    if not bool(torch.isfinite(result).all()):
        cause = nonfinite_cause(model) or "the gradients overflowed: P(target) may be too small"
        raise NonFiniteEditError(f"the attributions are not finite ({cause})")
    return result


def integrated_gradients_naive(
    model: nn.Module,
    tokenizer,
    prompt: str,
    target: str,
    steps: int = 20,
    layers: int | Sequence[int] | None = None,
    position: int = -1,
    rule: str = "right",
    target_tokens: str = "all",
) -> Tensor:
    """The definition, one layer and one step at a time: m full forward+backward passes per
    layer, no batching, no cache. The reference for tests and the benchmark: [L, d_ff] (in the
    dtype of `integrated_gradients`: float64 for a float64 model, else float32)."""
    layer_list = _layers(model, layers)
    alphas = riemann_alphas(steps, rule).tolist()
    query = _query(model, tokenizer, prompt, target, position, target_tokens, get_device(model))
    ids = query.seq[None]  # [1, s]
    attributions = []
    for layer in layer_list:
        with torch.no_grad(), Recorder(model, ("key", layer)) as rec:
            model(input_ids=ids)
        w_bar = rec[("key", layer)][0, query.q]  # [d_ff]
        total = torch.zeros_like(w_bar, dtype=probability_dtype(w_bar.dtype))
        for alpha in alphas:
            scaled = (alpha * w_bar).detach().requires_grad_(True)

            def write(key, scaled=scaled):
                new = key.clone()
                new[0, query.q] = scaled
                return new
            with patch(model, "key", layer, write):
                prob = _target_prob(model(input_ids=ids).logits, query)[0]
            (grad,) = torch.autograd.grad(prob, scaled)
            total += grad.to(total.dtype)
        attributions.append((w_bar.to(total.dtype) * total / len(alphas)).cpu())
    return torch.stack(attributions)


def integrated_gradients_ladder(
    model: nn.Module,
    tokenizer,
    prompt: str,
    target: str,
    steps: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
    rules: Sequence[str] = RULES,
    layers: int | Sequence[int] | None = None,
    position: int = -1,
    target_tokens: str = "all",
    batch_size: int | None = None,
    engine: str = "grow",
) -> dict[tuple[str, int], Tensor]:
    """{(rule, m): Attr [L, d_ff]} for every rule and step count: the same numbers as calling
    `integrated_gradients` for each, from one set of gradients. The Riemann points of the rules
    and step counts overlap (e.g. every right point of m = 32 is one of m = 64, every midpoint
    of m = 32 a left point of m = 64), so each distinct α is evaluated once."""
    layer_list = _layers(model, layers)
    points = {(rule, m): riemann_alphas(m, rule) for rule in rules for m in steps}
    distinct = sorted({round(a, 12) for alphas in points.values() for a in alphas.tolist()})
    index = {a: i for i, a in enumerate(distinct)}
    query = _query(model, tokenizer, prompt, target, position, target_tokens, get_device(model))
    w_bar, grads = _path_gradients(model, query, layer_list, torch.tensor(distinct, dtype=torch.float64),
                                   batch_size, engine)
    out = {}
    for key, alphas in points.items():
        idx = torch.tensor([index[round(a, 12)] for a in alphas.tolist()], device=grads.device)
        out[key] = (w_bar * grads[:, idx].mean(1)).cpu()
    return out


@torch.no_grad()
def key_activations(model, tokenizer, prompt: str | Sequence[str], layers=None, position: int = -1) -> Tensor:
    """w̄: the neurons' activations at the scored position, [L, d_ff] (or [n, L, d_ff]) float32
    CPU; the cheapest baseline ("activation alone")."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    sites = [("key", layer) for layer in _layers(model, layers)]
    out = []
    for p in prompts:
        ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        if not -len(ids) <= position < len(ids):
            raise IndexError(f"position {position} is not a token of the prompt {p!r} ({len(ids)} tokens)")
        acts = record(model, sites, input_ids=torch.tensor([ids], device=get_device(model)))
        out.append(torch.stack([acts[site][0, position] for site in sites]).float().cpu())
    return out[0] if isinstance(prompt, str) else torch.stack(out)


def activation_times_gradient(model, tokenizer, prompt, target, layers=None, position: int = -1,
                              target_tokens: str = "all") -> Tensor:
    """w̄_i · ∂P/∂w_i at w̄: integrated gradients with one right-Riemann step (m = 1, α = 1)."""
    return integrated_gradients(model, tokenizer, prompt, target, steps=1, layers=layers,
                                position=position, rule="right", target_tokens=target_tokens)


def path_probabilities(model, tokenizer, prompt: str, target: str, alphas: Sequence[float] | Tensor,
                       layers=None, position: int = -1, target_tokens: str = "all",
                       batch_size: int | None = None, engine: str = "grow") -> Tensor:
    """P_x(α w̄^(l)) for every layer and α, [L, len(alphas)] float32 (float64 for a float64 model)
    CPU: the curve whose integral of slopes the attributions are. One batched pass, no gradients."""
    layer_list = _layers(model, layers)
    _check_batch_size(batch_size)
    alphas = torch.as_tensor(alphas, dtype=torch.float64).reshape(-1)
    query = _query(model, tokenizer, prompt, target, position, target_tokens, get_device(model))
    w_bar, _, cache = _clean_pass(model, query, layer_list)
    row_layer, row_alpha = _row_plan(len(layer_list), alphas, w_bar.device)
    chunk = batch_size or _default_batch_size(model, query, len(row_layer))
    probs = [
        _engine(engine)(model, query, cache, w_bar, row_layer[s:s + chunk], row_alpha[s:s + chunk], layer_list,
                        grad=False)[0]
        for s in range(0, len(row_layer), chunk)
    ]
    return torch.cat(probs).cpu().reshape(len(layer_list), len(alphas))  # _target_prob's dtype


def probability_gap(model, tokenizer, prompt: str, target: str, layers=None, position: int = -1,
                    target_tokens: str = "all") -> Tensor:
    """P_x(w̄^(l)) − P_x(0) for every layer, [L]: what Σ_i Attr(w_i^(l)) approaches (completeness)."""
    ends = path_probabilities(model, tokenizer, prompt, target, [0.0, 1.0], layers, position, target_tokens)
    return ends[:, 1] - ends[:, 0]


def completeness_error(attributions: Tensor, gap: Tensor) -> Tensor:
    """|Σ_i Attr(w_i^(l)) − (P_x(w̄^(l)) − P_x(0))| per layer, relative to the largest layer gap
    max_l |P_x(w̄^(l)) − P_x(0)|: [L] (attributions [L, d_ff], gap [L])."""
    return (attributions.sum(-1) - gap).abs() / gap.abs().max().clamp_min(1e-12)


# --------------------------------------------------------------------------------------
# Top neurons and what suppressing them does
# --------------------------------------------------------------------------------------

def top_neurons(scores: Tensor, k: int) -> list[tuple[int, int]]:
    """The k (layer index, neuron) pairs with the highest scores in [L, d_ff], best first."""
    flat = scores.reshape(-1)
    k = min(k, flat.numel())
    idx = flat.topk(k).indices
    return [(int(i) // scores.shape[-1], int(i) % scores.shape[-1]) for i in idx]


@torch.no_grad()
def suppressed_probabilities(model, tokenizer, prompt: str, target: str,
                             neuron_sets: Sequence[Sequence[tuple[int, int]]], position: int = -1,
                             target_tokens: str = "all") -> Tensor:
    """P(target) with each set of (layer, neuron) activations set to 0 at the scored position
    (Dai et al.'s suppression experiment), one batch row per set: [len(neuron_sets)] float32 CPU
    (float64 for a float64 model)."""
    query = _query(model, tokenizer, prompt, target, position, target_tokens, get_device(model))
    n_rows, width = len(neuron_sets), d_ff(model)
    keep = torch.ones(n_rows, n_layers(model), width, device=query.seq.device)  # 0 where suppressed
    for row, neurons in enumerate(neuron_sets):
        for layer, neuron in neurons:
            if not 0 <= int(neuron) < width:
                raise IndexError(f"neuron {neuron} out of range: layers have {width} neurons")
            keep[row, check_layer(model, layer), int(neuron)] = 0.0

    def suppress(layer: int):
        def edit(key: Tensor) -> Tensor:  # key: [rows, s, d_ff]
            new = key.clone()
            new[:, query.q] = key[:, query.q] * keep[:, layer].to(key.dtype)
            return new
        return edit

    with ExitStack() as stack:
        for layer in (keep == 0).any(dim=(0, 2)).nonzero().flatten().tolist():
            stack.enter_context(patch(model, "key", layer, suppress(layer)))
        logits = model(input_ids=query.seq[None].expand(n_rows, -1)).logits
    return _target_prob(logits, query).cpu()


@torch.no_grad()
def suppressed_probability(model, tokenizer, prompt: str, target: str, neurons: Sequence[tuple[int, int]],
                           position: int = -1, target_tokens: str = "all") -> float:
    """P(target) with the given (layer, neuron) activations set to 0 at the scored position."""
    query = _query(model, tokenizer, prompt, target, position, target_tokens, get_device(model))
    by_layer: dict[int, list[int]] = {}
    for layer, neuron in neurons:
        by_layer.setdefault(check_layer(model, layer), []).append(int(neuron))
    with ExitStack() as stack:
        for layer, idx in by_layer.items():
            stack.enter_context(set_neurons(model, layer, idx, value=0.0, positions=[query.q]))
        logits = model(input_ids=query.seq[None]).logits
    return float(_target_prob(logits, query)[0])


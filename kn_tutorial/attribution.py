"""Knowledge attribution by integrated gradients (Dai et al., 2022, "Knowledge Neurons in
Pretrained Transformers"), batched.

A knowledge neuron is an intermediate FFN neuron w_i^(l): entry i of the "key" activation
of layer l (the input of the MLP output projection, after the nonlinearity; for Llama
act(gate)·up), at the position where the model predicts the answer. With w̄^(l) the
layer's activations on the prompt x, and P_x(ŵ^(l)) the probability of the correct object
when the whole layer's activations at that position are set to ŵ^(l) (everything else
runs normally), the attribution of neuron i is the integrated gradient along the straight
path from 0 to w̄^(l) (Sundararajan et al., 2017):

    Attr(w_i^(l)) = w̄_i^(l) ∫₀¹ ∂P_x(α w̄^(l)) / ∂w_i^(l) dα
                  ≈ w̄_i^(l) / m · Σ_k ∂P_x(α_k w̄^(l)) / ∂w_i^(l)        (m steps α_k)

Riemann rules for α_k, k = 1..m (`rule=`):
    "right"     α_k = k/m          Dai et al.'s equation (the default)
    "left"      α_k = (k-1)/m      what Dai et al.'s released code computes (α = 0..(m-1)/m)
    "midpoint"  α_k = (k-1/2)/m    error O(1/m²) instead of O(1/m) once m resolves the path
Completeness: Σ_i Attr(w_i^(l)) → P_x(w̄^(l)) − P_x(0) as m grows (`probability_gap`).

The probability of the object o = (o_1..o_T), scored with its leading space:
    target_tokens="all"    P = Π_t P(o_t | x, o_<t) by teacher forcing (the default; the
                           book's convention), neuron scaled only at the last prompt token;
    target_tokens="first"  P = P(o_1 | x).

How it is fast (none of this changes the numbers):
1. Rows. Each (layer l, step k) pair is one row of a batch; a forward hook on every scored
   layer writes α_k w̄^(l) into the key of its own rows only. All rows of a fact (L·m of
   them, or `batch_size` at a time) go through the model as one batch, and one
   torch.autograd.grad of Σ_rows P gives every row's gradient (rows are independent).
2. Cache. Only the scaled position q and the tokens after it depend on α (attention is
   causal), so one clean forward computes the keys/values of tokens 0..q-1 once (the
   KV cache of Hugging Face's generation API) and the rows run just tokens q.. on top of
   it: for a one-token answer, one token per row instead of the whole prompt.
3. Layers. Nothing below layer l depends on α either, nor anything in block l but its
   output at q, which moves by W (α w̄ − w̄) (W: the MLP output projection, added last in
   every block). With engine="grow" (the default) the model runs on the clean prompt as
   one row, and a pre-hook on block l + 1 appends the rows that scale layer l as copies of
   it with that shift: a row exists only after its own layer, in the forward and the
   backward pass (Σ_l (L − l − 1) block-rows instead of L²). Masks and
   positions are built for the single input row and broadcast; if a model rejects that,
   a warning says so and engine="flat" (every row runs every block) takes over.
Parameters are frozen while it runs, so autograd computes no weight gradients, and the
gradient is taken of P / P(clean), rescaled after, so float16 models do not underflow.
`integrated_gradients_naive` is the definition run literally (one layer, one step, one
full forward and backward at a time): the reference the tests and the benchmark use.

Also here: `integrated_gradients_ladder` (many rules and step counts from one set of
gradients), `path_probabilities` / `probability_gap` (the curve P_x(α w̄) and its ends:
completeness), the baselines `activation_times_gradient` and `key_activations`,
`top_neurons`, `suppressed_probabilities` (Dai et al.'s suppression test, batched), and
`plot_attributions` / `attribution_explorer` for the chapter.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from .hooks import Recorder, patch, record, set_neurons
from .kv_cache import cache_keyword, output_cache
from .models import check_layer, d_ff, d_model, final_norm, get_block, get_device, mlp_out_weight, n_layers
from .progress import progress
from .scoring import target_ids
from .validate import NonFiniteEditError, check_context, nonfinite_cause, require_positive_int, shorten
from .weights import frozen

RULES = ("right", "left", "midpoint")
TARGET_TOKENS = ("all", "first")


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

@dataclass
class _Query:
    seq: Tensor        # [s] token ids: the prompt, then the target minus its last token
    q: int             # the scaled position (index into seq); tokens before it do not depend on α
    targets: Tensor    # [T] the scored target tokens
    predict_at: Tensor  # [T] positions in seq whose logits predict them


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


def _target_prob(logits: Tensor, query: _Query, offset: int = 0) -> Tensor:
    """P(target) per row from logits [b, s', vocab] of seq[offset:]: [b] (float32)."""
    logprobs = torch.log_softmax(logits[:, query.predict_at - offset].float(), dim=-1)  # [b, T, vocab]
    picked = logprobs.gather(-1, query.targets[None, :, None].expand(len(logits), -1, 1))  # [b, T, 1]
    return picked.sum(dim=(1, 2)).exp()


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


def _check_batch_size(batch_size) -> None:
    if batch_size is not None:
        require_positive_int("batch_size", batch_size, "Pass None to pick one that fits the memory.")


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
# The batched engine
# --------------------------------------------------------------------------------------

def _forward(model, ids: Tensor, cache=None, use_cache: bool = False):
    """model(input_ids=ids) continuing from a KV cache (not modified: a copy is extended)."""
    kwargs = {"input_ids": ids, "use_cache": use_cache or cache is not None}
    if cache is not None:
        cache = copy.deepcopy(cache)
        if len(ids) > 1:
            cache.batch_repeat_interleave(len(ids))
        kwargs[cache_keyword(model)] = cache
    return model(**kwargs)


@torch.no_grad()
def _clean_pass(model, query: _Query, layers: list[int]):
    """The unmodified prompt: keys w̄ at q [L, d_ff], P(target), and the KV cache of tokens
    0..q-1 (None when q = 0). Two forwards: tokens before q (kept as the cache), then the rest."""
    cache = None
    if query.q > 0:
        cache = output_cache(_forward(model, query.seq[None, :query.q], use_cache=True))
    sites = [("key", layer) for layer in layers]
    with Recorder(model, sites) as rec:
        logits = _forward(model, query.seq[None, query.q:], cache).logits
    w_bar = torch.stack([rec[site][0, 0] for site in sites])  # [L, d_ff]
    return w_bar, _target_prob(logits, query, offset=query.q)[0], cache


def _run_rows_flat(model, query: _Query, cache, w_bar: Tensor, row_layer: Tensor, row_alpha: Tensor,
                   layers: list[int], grad: bool, p_ref: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Run rows r = (layer index row_layer[r] into `layers`, α = row_alpha[r]) as one batch.

    Row r's key at layer layers[row_layer[r]], position q, is set to α w̄; every other
    activation is computed normally. Returns P per row [b] and, with grad=True, the
    gradient of P with respect to the row's own scaled key [b, d_ff] (float32).
    "flat": every row runs every block (the simple layout; blocks below a row's layer
    recompute the clean state).
    """
    b = len(row_layer)
    suffix = query.seq[query.q:]  # [s'] the tokens that depend on α
    dtype = w_bar.dtype
    leaves = {}  # index into `layers` -> (row indices [n], scaled keys [n, d_ff], a leaf)
    for j in row_layer.unique().tolist():
        rows = (row_layer == j).nonzero().squeeze(1)
        scaled = (row_alpha[rows].to(dtype)[:, None] * w_bar[j][None, :]).detach()
        leaves[j] = (rows, scaled.requires_grad_(grad))

    def writer(j: int):
        rows, scaled = leaves[j]

        def write(key: Tensor) -> Tensor:  # key: [b, s', d_ff]
            new = key.clone()
            new[rows, 0] = scaled
            return new
        return write

    with ExitStack() as stack, torch.set_grad_enabled(grad):
        for j in leaves:
            stack.enter_context(patch(model, "key", layers[j], writer(j)))
        logits = _forward(model, suffix[None].expand(b, -1), cache).logits  # [b, s', vocab]
        probs = _target_prob(logits, query, offset=query.q)  # [b]
    if not grad:
        return probs.detach(), None
    order = list(leaves)
    grads = torch.autograd.grad((probs / p_ref).sum(), [leaves[j][1] for j in order])
    row_grads = torch.empty(b, w_bar.shape[1], dtype=torch.float32, device=w_bar.device)
    for j, g in zip(order, grads):
        row_grads[leaves[j][0]] = g.float() * p_ref
    return probs.detach(), row_grads


def _join_hook(join):
    """Pre-hook appending join(hidden) (new rows) to the batch of the module's input."""

    def pre_hook(module, args, kwargs):
        if args:
            return (torch.cat([args[0], join(args[0])]), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": torch.cat([hidden, join(hidden)])}
    return pre_hook


def _run_rows_grow(model, query: _Query, cache, w_bar: Tensor, row_layer: Tensor, row_alpha: Tensor,
                   layers: list[int], grad: bool, p_ref: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Same contract as `_run_rows_flat`, without computing what does not depend on α.

    The model runs on one row, the clean prompt. Nothing below block l depends on α, nor does
    anything in block l but its output at q: every family in models.ARCHS adds the MLP output
    W key + b last, so scaling the key at q moves the block's output there by W (α w̄ − w̄).
    The rows that scale layer l therefore join the batch at the input of block l + 1 (of the
    final norm after the last block), as the clean row's block output plus that shift: a row
    exists only after its own layer, forward and backward (Σ_l (L − l − 1) block rows instead
    of L²), and its gradient reaches the scaled key through W. Attention masks and positions
    broadcast over the batch (built for the single input row); the KV cache of each block is
    repeated to that block's batch size.
    """
    blocks = torch.tensor(layers, device=row_layer.device)[row_layer]  # [b] absolute layer of each row
    order = torch.argsort(blocks, stable=True)  # rows join block by block
    counts = {int(l): int(n) for l, n in zip(*blocks.unique(return_counts=True))}
    suffix = query.seq[query.q:]  # [s'] the tokens that depend on α
    dtype = w_bar.dtype
    position = {layer: j for j, layer in enumerate(layers)}
    L = n_layers(model)
    leaves, first = {}, 0  # layer -> scaled keys [n, d_ff] of its rows (batch rows 1 + first ..)
    for layer in sorted(counts):
        rows = order[first:first + counts[layer]]
        leaves[layer] = (row_alpha[rows].to(dtype)[:, None] * w_bar[position[layer]][None, :]).detach().requires_grad_(grad)
        first += counts[layer]

    def joiner(layer: int):
        scaled, clean_key = leaves[layer], w_bar[position[layer]]
        weight = mlp_out_weight(model, layer)  # [d_model, d_ff]

        def join(hidden: Tensor) -> Tensor:  # [b, s', d] -> the new rows [n, s', d]
            at_q = hidden[:1, :1] + ((scaled - clean_key[None]) @ weight.T)[:, None].to(hidden.dtype)
            return torch.cat([at_q, hidden[:1, 1:].expand(len(scaled), -1, -1)], 1)
        return join

    past = None
    if cache is not None:
        past = copy.deepcopy(cache)
        for block, layer_cache in enumerate(past.layers):
            layer_cache.batch_repeat_interleave(1 + sum(n for l, n in counts.items() if l < block))
    kwargs = {"input_ids": suffix[None], "use_cache": past is not None}
    if past is not None:
        kwargs[cache_keyword(model)] = past
    with ExitStack() as stack, torch.set_grad_enabled(grad):
        for layer in leaves:
            module = get_block(model, layer + 1) if layer + 1 < L else final_norm(model)
            handle = module.register_forward_pre_hook(_join_hook(joiner(layer)), with_kwargs=True, prepend=True)
            stack.callback(handle.remove)
        logits = model(**kwargs).logits  # [1 + b, s', vocab]
        probs = _target_prob(logits[1:], query, offset=query.q)  # [b], in batch order
    out_probs = torch.empty_like(probs)
    out_probs[order] = probs.detach()
    if not grad:
        return out_probs, None
    grads = torch.autograd.grad((probs / p_ref).sum(), [leaves[layer] for layer in leaves])
    row_grads = torch.empty(len(row_layer), w_bar.shape[1], dtype=torch.float32, device=w_bar.device)
    row_grads[order] = torch.cat(grads).float() * p_ref
    return out_probs, row_grads


ENGINES = {"grow": _run_rows_grow, "flat": _run_rows_flat}


def _memory_budget(device: torch.device) -> int:
    """Bytes the rows of one pass may use: 1 GiB on CPU; a quarter of the free memory on a GPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(free // 4, 1 << 28)
    return 1 << 30


def _default_batch_size(model, query: _Query, n_rows: int) -> int:
    """Rows per pass keeping the activations autograd stores within `_memory_budget` (a rough
    estimate: per row and token, ~16 d_model + 4 d_ff numbers per layer, plus the logits)."""
    bytes_per = torch.finfo(next(model.parameters()).dtype).bits // 8
    vocab = model.get_output_embeddings().weight.shape[0]
    tokens = len(query.seq) - query.q
    per_row = tokens * (n_layers(model) * (16 * d_model(model) + 4 * d_ff(model)) * bytes_per + 3 * 4 * vocab)
    return max(1, min(n_rows, _memory_budget(get_device(model)) // per_row))


def _row_plan(n_layers_scored: int, alphas: Tensor, device) -> tuple[Tensor, Tensor]:
    """Row r = (layer index, α) for every layer and step: ([L·m], [L·m])."""
    m = len(alphas)
    row_layer = torch.arange(n_layers_scored, device=device).repeat_interleave(m)
    row_alpha = alphas.to(device).repeat(n_layers_scored)
    return row_layer, row_alpha


def _engine(engine: str):
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {tuple(ENGINES)}")
    if engine == "grow":
        return _grow_or_flat
    return ENGINES[engine]


_GROW_FAILED: set[type] = set()  # model classes on which "grow" raised: they use "flat"


def _grow_or_flat(model, *args, **kwargs):
    """The "grow" engine; if this model class rejects a batch that grows between blocks (a
    transformers version whose masks or caches do not broadcast), warn once and use "flat",
    which gives the same numbers with more work."""
    if type(model) not in _GROW_FAILED:
        try:
            return _run_rows_grow(model, *args, **kwargs)
        except (RuntimeError, ValueError, IndexError, KeyError, AttributeError) as error:
            _GROW_FAILED.add(type(model))
            warnings.warn(f"integrated_gradients: the 'grow' engine failed on {type(model).__name__} "
                          f"({type(error).__name__}: {error}); using engine='flat' (same numbers, slower).")
    return _run_rows_flat(model, *args, **kwargs)


def _path_gradients(model, query: _Query, layers: list[int], alphas: Tensor, batch_size: int | None,
                    engine: str) -> tuple[Tensor, Tensor]:
    """w̄ [L, d_ff] and Σ over the given α of ∂P_x(α w̄^(l))/∂w^(l), accumulated per distinct α:
    returns (w_bar, grads [L, len(alphas), d_ff]), both float32 on the model's device."""
    _check_batch_size(batch_size)
    w_bar, p_clean, cache = _clean_pass(model, query, layers)
    # Gradients of P / P(clean), rescaled after: in float16 the gradients of a small P would
    # underflow (the loss-scaling trick of mixed-precision training); exact in float32.
    p_ref = max(float(p_clean), 1e-30)
    row_layer, row_alpha = _row_plan(len(layers), alphas, w_bar.device)
    row_step = torch.arange(len(alphas), device=w_bar.device).repeat(len(layers))  # [L·m] index of α
    chunk = batch_size or _default_batch_size(model, query, len(row_layer))
    grads = torch.zeros(len(layers), len(alphas), w_bar.shape[1], dtype=torch.float32, device=w_bar.device)
    for start in range(0, len(row_layer), chunk):
        rows = slice(start, start + chunk)
        _, row_grads = _engine(engine)(model, query, cache, w_bar, row_layer[rows], row_alpha[rows], layers,
                                        grad=True, p_ref=p_ref)
        grads[row_layer[rows], row_step[rows]] = row_grads
    return w_bar.float(), grads


def _one_fact_ig(model, query: _Query, layers: list[int], alphas: Tensor, batch_size: int | None,
                 engine: str) -> Tensor:
    w_bar, grads = _path_gradients(model, query, layers, alphas, batch_size, engine)
    return (w_bar * grads.mean(1)).cpu()  # [L, d_ff]


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
    """Attr(w_i^(l)) of every FFN neuron for the fact (prompt -> target): [L, d_ff] float32, CPU.

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
    with frozen(model):
        for p, t in progress(list(zip(prompts, targets)), desc="integrated gradients",
                             disable=not show_progress or len(prompts) == 1):
            query = _query(model, tokenizer, p, t, position, target_tokens, device)
            out.append(_one_fact_ig(model, query, layer_list, alphas, batch_size, engine))
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
    layer, no batching, no cache. The reference for tests and the benchmark: [L, d_ff]."""
    layer_list = _layers(model, layers)
    alphas = riemann_alphas(steps, rule).tolist()
    query = _query(model, tokenizer, prompt, target, position, target_tokens, get_device(model))
    ids = query.seq[None]  # [1, s]
    attributions = []
    for layer in layer_list:
        with torch.no_grad(), Recorder(model, ("key", layer)) as rec:
            model(input_ids=ids)
        w_bar = rec[("key", layer)][0, query.q]  # [d_ff]
        total = torch.zeros_like(w_bar, dtype=torch.float32)
        for alpha in alphas:
            scaled = (alpha * w_bar).detach().requires_grad_(True)

            def write(key, scaled=scaled):
                new = key.clone()
                new[0, query.q] = scaled
                return new
            with patch(model, "key", layer, write):
                prob = _target_prob(model(input_ids=ids).logits, query)[0]
            (grad,) = torch.autograd.grad(prob, scaled)
            total += grad.float()
        attributions.append((w_bar.float() * total / len(alphas)).cpu())
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
    with frozen(model):
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
    """P_x(α w̄^(l)) for every layer and α, [L, len(alphas)] float32 CPU: the curve whose
    integral of slopes the attributions are. One batched pass, no gradients."""
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
    return torch.cat(probs).float().cpu().reshape(len(layer_list), len(alphas))


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
    (Dai et al.'s suppression experiment), one batch row per set: [len(neuron_sets)] float32 CPU."""
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


# --------------------------------------------------------------------------------------
# Showing attributions
# --------------------------------------------------------------------------------------

def plot_attributions(attributions: Tensor, ax=None, title: str = "", layers: Sequence[int] | None = None):
    """Heatmap of Attr over layers (rows) x neurons (columns), [L, d_ff], with a diverging,
    colour-blind-safe map (PuOr) centred at 0. Returns the Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    if ax is None:
        _, ax = plt.subplots(figsize=(10, 3))
    values = attributions.detach().float().cpu().numpy()
    top = max(float(abs(values).max()), 1e-12)
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="PuOr_r",
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=-top, vmax=top))
    rows = list(range(len(values))) if layers is None else list(layers)
    ax.set_yticks(range(len(rows)), labels=[str(r) for r in rows])
    ax.set_ylabel("layer")
    ax.set_xlabel("neuron")
    ax.set_title(title)
    ax.figure.colorbar(image, ax=ax, label="Attr", pad=0.01)
    return ax


def top_neurons_html(attributions: Tensor, activations: Tensor, k: int = 10) -> str:
    """An HTML table of the k neurons with the highest attribution: layer, neuron, Attr, w̄."""
    rows = "".join(
        f"<tr><td>{layer}</td><td>{neuron}</td><td>{attributions[layer, neuron]:.4f}</td>"
        f"<td>{activations[layer, neuron]:.3f}</td></tr>"
        for layer, neuron in top_neurons(attributions, k))
    return ("<table><tr><th>layer</th><th>neuron</th><th>Attr</th><th>activation w̄</th></tr>"
            f"{rows}</table>")


def attribution_explorer(model, tokenizer, facts: Sequence[tuple[str, str]], steps: int = 20, k: int = 10):
    """An ipywidgets explorer (headless-safe, nothing blocks): pick a fact (prompt, target) and a
    step count; see P(target), the attribution heatmap and the top-k neurons."""
    import ipywidgets as widgets
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    from .scoring import score

    labels = [(f"{prompt} → {target.strip()}", i) for i, (prompt, target) in enumerate(facts)]
    fact = widgets.Dropdown(options=labels, value=0, description="fact", layout={"width": "32em"})
    m = widgets.Dropdown(options=[1, 5, 20, 50], value=steps, description="steps m")

    def show(i, m):
        prompt, target = facts[i]
        attr = integrated_gradients(model, tokenizer, prompt, target, steps=m)
        p = float(score(model, tokenizer, [prompt], [target])["logprob"][0].exp())
        fig, ax = plt.subplots(figsize=(10, 2.8))
        plot_attributions(attr, ax=ax, title=f"{prompt} → {target.strip()}   P = {p:.3f}, m = {m}")
        plt.show()
        display(HTML(top_neurons_html(attr, key_activations(model, tokenizer, prompt), k)))

    out = widgets.interactive_output(show, {"i": fact, "m": m})
    return widgets.VBox([widgets.HBox([fact, m]), out])

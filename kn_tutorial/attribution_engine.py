"""How integrated gradients runs fast (the definition: `attribution`; Dai et al., 2022).

None of this changes the numbers; `attribution.integrated_gradients_naive` is the definition run
literally, and the tests hold the engines to it.

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
   backward pass (Σ_l (L − l − 1) block-rows instead of L²). Masks and positions are
   built for the single input row and broadcast; if a model rejects that, a warning says
   so and engine="flat" (every row runs every block) takes over.
4. GPT-2 written out (`attribution_gpt2`). On a plain GPT2LMHeadModel the clean pass and the
   "grow" rows run as the block's tensor operations on the weights rather than through the
   modules: the prompt's cached keys and values are one tensor per block shared by every row
   (never repeated into the batch nor differentiated), and the clean row's block inputs come
   from the clean pass. For a one-token suffix (the usual query: a one-token answer scaled at
   the last prompt token) one pass does it all: the prompt's tokens, the clean row and the rows
   share each block's matrix products, the backward pass is written out too (no autograd
   graph), and the clean row is every layer's row α = 1. Other models use the modules.
5. Precision. Parameters are frozen while autograd runs (it computes no weight gradients),
   and the gradient is taken of P / P(clean), rescaled after, so float16 models do not
   underflow.
"""
from __future__ import annotations

import copy
import warnings
from contextlib import ExitStack

import torch
from torch import Tensor
from transformers import DynamicCache

from .attribution_gpt2 import _gpt2_clean_pass, _gpt2_one_token, _gpt2_one_token_path, _gpt2_run_rows
from .attribution_rows import (  # noqa: F401  (re-exported: attribution imports them from here)
    _check_batch_size, _default_batch_size, _in_row_order, _memory_budget, _Query, _row_plan, _rows_by_layer,
    _target_prob,
)
from .gpt2_written import is_plain_gpt2
from .hooks import Recorder, patch
from .kv_cache import block_pairs, broadcast_cache, cache_keyword, output_cache
from .models import final_norm, fused_activations, get_block, mlp_out_weight, n_layers
from .scoring import probability_dtype
from .weights import frozen


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
    0..q-1 (None when q = 0). One forward of the whole sequence; its cache is cut to the tokens
    before q (attention is causal: their keys and values do not see the later tokens)."""
    sites = [("key", layer) for layer in layers]
    with Recorder(model, sites) as rec:
        out = model(input_ids=query.seq[None], use_cache=query.q > 0)
    w_bar = torch.stack([rec[site][0, query.q] for site in sites])  # [L, d_ff]
    cache = None
    if query.q > 0:
        cache = DynamicCache(ddp_cache_data=[(keys[:, :, :query.q], values[:, :, :query.q])
                                             for keys, values in block_pairs(output_cache(out))])
    return w_bar, _target_prob(out.logits, query)[0], cache


def _run_rows_flat(model, query: _Query, cache, w_bar: Tensor, row_layer: Tensor, row_alpha: Tensor,
                   layers: list[int], grad: bool, p_ref: float = 1.0) -> tuple[Tensor, Tensor | None]:
    """Run rows r = (layer index row_layer[r] into `layers`, α = row_alpha[r]) as one batch.

    Row r's key at layer layers[row_layer[r]], position q, is set to α w̄; every other
    activation is computed normally. Returns P per row [b] and, with grad=True, the
    gradient of P with respect to the row's own scaled key [b, d_ff] (float32; float64 for a
    float64 model: scoring.probability_dtype).
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
    grad_dtype = probability_dtype(dtype)
    row_grads = torch.empty(b, w_bar.shape[1], dtype=grad_dtype, device=w_bar.device)
    for j, g in zip(order, grads):
        row_grads[leaves[j][0]] = g.to(grad_dtype) * p_ref
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
    order, counts, position, leaves = _rows_by_layer(layers, row_layer, row_alpha, w_bar, grad)
    suffix = query.seq[query.q:]  # [s'] the tokens that depend on α
    L = n_layers(model)

    def joiner(layer: int):
        scaled, clean_key = leaves[layer], w_bar[position[layer]]
        weight = mlp_out_weight(model, layer)  # [d_model, d_ff]

        def join(hidden: Tensor) -> Tensor:  # [b, s', d] -> the new rows [n, s', d]
            at_q = hidden[:1, :1] + ((scaled - clean_key[None]) @ weight.T)[:, None].to(hidden.dtype)
            return torch.cat([at_q, hidden[:1, 1:].expand(len(scaled), -1, -1)], 1)
        return join

    past = None
    if cache is not None:  # block b runs the clean row and the rows of the layers below b
        past = broadcast_cache(block_pairs(cache), [1 + sum(n for l, n in counts.items() if l < block) for block in range(L)])
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
    return _in_row_order(probs, order, grad, leaves, len(row_layer), w_bar, p_ref)


ENGINES = {"grow": _run_rows_grow, "flat": _run_rows_flat}


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
    returns (w_bar, grads [L, len(alphas), d_ff]), both float32 (float64 for a float64 model:
    scoring.probability_dtype) on the model's device. The engines that go through the modules
    run with the weights frozen (`weights.frozen`: autograd keeps nothing for weight gradients)
    and GPT-2's GELU as one kernel (models.fused_activations: the same numbers to float rounding)."""
    _check_batch_size(batch_size)
    if engine == "grow" and _gpt2_one_token(query) and is_plain_gpt2(model):  # no module, no autograd graph
        return _gpt2_one_token_path(model, query, layers, alphas.to(query.seq.device), batch_size)
    with frozen(model), fused_activations(model):
        return _path_gradients_fused(model, query, layers, alphas, batch_size, engine)


def _path_gradients_fused(model, query: _Query, layers: list[int], alphas: Tensor, batch_size: int | None,
                          engine: str) -> tuple[Tensor, Tensor]:
    written_out = engine == "grow" and is_plain_gpt2(model)
    if written_out:
        w_bar, p_clean, past, states, mids = _gpt2_clean_pass(model, query, layers)
    else:
        w_bar, p_clean, cache = _clean_pass(model, query, layers)
    # Gradients of P / P(clean), rescaled after: in float16 the gradients of a small P would
    # underflow (the loss-scaling trick of mixed-precision training); exact in float32 and float64.
    p_ref = max(float(p_clean), 1e-30)
    row_layer, row_alpha = _row_plan(len(layers), alphas, w_bar.device)
    row_step = torch.arange(len(alphas), device=w_bar.device).repeat(len(layers))  # [L·m] index of α
    chunk = batch_size or _default_batch_size(model, query, len(row_layer))
    grad_dtype = probability_dtype(w_bar.dtype)
    grads = torch.zeros(len(layers), len(alphas), w_bar.shape[1], dtype=grad_dtype, device=w_bar.device)
    for start in range(0, len(row_layer), chunk):
        rows = slice(start, start + chunk)
        if written_out:
            _, row_grads = _gpt2_run_rows(model, query, past, states, mids, w_bar, row_layer[rows], row_alpha[rows],
                                          layers, grad=True, p_ref=p_ref)
        else:
            _, row_grads = _engine(engine)(model, query, cache, w_bar, row_layer[rows], row_alpha[rows], layers,
                                            grad=True, p_ref=p_ref)
        grads[row_layer[rows], row_step[rows]] = row_grads
    return w_bar.to(grad_dtype), grads


def _one_fact_ig(model, query: _Query, layers: list[int], alphas: Tensor, batch_size: int | None,
                 engine: str) -> Tensor:
    w_bar, grads = _path_gradients(model, query, layers, alphas, batch_size, engine)
    return (w_bar * grads.mean(1)).cpu()  # [L, d_ff]


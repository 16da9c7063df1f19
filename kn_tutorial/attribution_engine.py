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
4. GPT-2 written out. On a plain GPT2LMHeadModel (`gpt2_written`) the clean pass and the
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
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from .hooks import Recorder, patch
from .kv_cache import block_pairs, broadcast_cache, cache_keyword, output_cache
from .models import d_ff, d_model, final_norm, fused_activations, get_block, get_device, mlp_out_weight, n_layers
from . import gpt2_written as written
from .gpt2_written import is_plain_gpt2
from .validate import require_positive_int
from .weights import frozen


# --------------------------------------------------------------------------------------
# One query, as the engine sees it (built and checked by attribution._query)
# --------------------------------------------------------------------------------------

@dataclass
class _Query:
    seq: Tensor        # [s] token ids: the prompt, then the target minus its last token
    q: int             # the scaled position (index into seq); tokens before it do not depend on α
    targets: Tensor    # [T] the scored target tokens
    predict_at: Tensor  # [T] positions in seq whose logits predict them


def _target_prob(logits: Tensor, query: _Query, offset: int = 0) -> Tensor:
    """P(target) per row from logits [b, s', vocab] of seq[offset:]: [b] (float32)."""
    logprobs = torch.log_softmax(logits[:, query.predict_at - offset].float(), dim=-1)  # [b, T, vocab]
    picked = logprobs.gather(-1, query.targets[None, :, None].expand(len(logits), -1, 1))  # [b, T, 1]
    return picked.sum(dim=(1, 2)).exp()


def _check_batch_size(batch_size) -> None:
    if batch_size is not None:
        require_positive_int("batch_size", batch_size, "Pass None to pick one that fits the memory.")



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


def _rows_by_layer(layers: list[int], row_layer: Tensor, row_alpha: Tensor, w_bar: Tensor, grad: bool):
    """The rows grouped by the layer they scale, in the order they join the batch (block by block):
    (order [b], {layer: number of rows}, {layer: index into w_bar}, {layer: scaled keys α w̄ [n, d_ff],
    the leaves the gradient is taken with respect to})."""
    blocks = torch.tensor(layers, device=row_layer.device)[row_layer]  # [b] absolute layer of each row
    order = torch.argsort(blocks, stable=True)
    counts = {int(l): int(n) for l, n in zip(*blocks.unique(return_counts=True))}
    position = {layer: j for j, layer in enumerate(layers)}
    leaves, first = {}, 0
    for layer in sorted(counts):
        rows = order[first:first + counts[layer]]
        leaves[layer] = (row_alpha[rows].to(w_bar.dtype)[:, None] * w_bar[position[layer]][None, :]).detach().requires_grad_(grad)
        first += counts[layer]
    return order, counts, position, leaves


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


def _in_row_order(probs, order, grad: bool, leaves: dict, n_rows: int, w_bar, p_ref):
    """The rows' probabilities (and, with `grad`, their gradients with respect to the scaled
    activations, one row each) put back from the engine's batch order into row order."""
    out_probs = torch.empty_like(probs)
    out_probs[order] = probs.detach()
    if not grad:
        return out_probs, None
    grads = torch.autograd.grad((probs / p_ref).sum(), [leaves[layer] for layer in leaves])
    row_grads = torch.empty(n_rows, w_bar.shape[1], dtype=torch.float32, device=w_bar.device)
    row_grads[order] = torch.cat(grads).float() * p_ref
    return out_probs, row_grads


ENGINES = {"grow": _run_rows_grow, "flat": _run_rows_flat}


# --------------------------------------------------------------------------------------
# GPT-2 written out: the "grow" engine without the module machinery
# --------------------------------------------------------------------------------------
# The operations are `gpt2_written`'s. The cached tokens' keys and values are one
# [heads, q, d_head] tensor per block shared by every row (never repeated, never
# differentiated), and the clean prompt's block inputs come from the clean pass, so no clean
# row runs in the batch. Any other model, or a GPT-2 with hooks or other attention settings,
# takes the module path above (`_clean_pass`, `_run_rows_grow`).

@torch.no_grad()
def _gpt2_clean_pass(model, query: _Query, layers: list[int]):
    """`_clean_pass` written out: w̄ [L, d_ff], P(target), the cached keys (transposed) and
    values of tokens 0..q-1 per block (None when q = 0), every block's input at tokens q..
    with the last block's output appended ([n_layers + 1, s', d]), and every block's residual
    after attention at q ([n_layers, d]: the MLP output is added to it)."""
    transformer, n_head = model.transformer, model.config.n_head
    seq = query.seq
    h = (transformer.wte(seq) + transformer.wpe(torch.arange(len(seq), device=seq.device)))[None]
    past, states, keys, mids = [], [], [], []
    for block in transformer.h:
        states.append(h[0, query.q:])
        h, k, v = written.attention(block, h, n_head)
        mids.append(h[0, query.q])
        h, key_act = written.mlp(block, h)
        keys.append(key_act[0, query.q])
        past.append((k[0, :, :query.q].transpose(1, 2).contiguous(), v[0, :, :query.q]) if query.q > 0 else None)
    states.append(h[0, query.q:])
    logits = model.lm_head(written.layer_norm(h[:, query.predict_at], transformer.ln_f))  # [1, T, vocab]
    picked = torch.log_softmax(logits.float(), dim=-1)[0].gather(-1, query.targets[:, None])
    w_bar = torch.stack([keys[layer] for layer in layers])
    return w_bar, picked.sum().exp(), past, torch.stack(states), torch.stack(mids)


def _joined(model, mids: Tensor, layer: int, scaled: Tensor) -> Tensor:
    """Block `layer`'s output at q for keys `scaled` [n, d_ff]: its residual after attention plus its MLP
    output on them (c_proj: W key + b), the operations of the model itself: [n, d]."""
    c_proj = model.transformer.h[layer].mlp.c_proj
    return mids[layer] + torch.addmm(c_proj.bias, scaled, c_proj.weight)


def _gpt2_run_rows(model, query: _Query, past, states: Tensor, mids: Tensor, w_bar: Tensor, row_layer: Tensor,
                   row_alpha: Tensor, layers: list[int], grad: bool, p_ref: float = 1.0):
    """`_run_rows_grow` written out for GPT-2 (same contract), for a suffix of several tokens (one
    token: `_gpt2_one_token_path`): the rows of layer l start at block l + 1 from the clean state
    there (`states`) but at q, where block l's output is its residual after attention (`mids`)
    plus its MLP output on α w̄ (computed, not shifted from the clean output, so that no large
    clean term is added and taken away again)."""
    transformer, n_head = model.transformer, model.config.n_head
    order, counts, position, leaves = _rows_by_layer(layers, row_layer, row_alpha, w_bar, grad)
    L = len(transformer.h)
    with torch.set_grad_enabled(grad):
        h = None
        for block in range(min(counts) + 1, L + 1):
            layer = block - 1
            if layer in leaves:
                at_q = _joined(model, mids, layer, leaves[layer])  # [n, d]
                new = torch.cat([at_q[:, None], states[block, None, 1:].expand(len(at_q), -1, -1)], 1)
                h = new if h is None else torch.cat([h, new])
            if block < L:
                h = written.block(transformer.h[block], h, n_head, past[block])[0]
        logits = model.lm_head(written.layer_norm(h, transformer.ln_f))  # [b, s', vocab]
        probs = _target_prob(logits, query, offset=query.q)
    return _in_row_order(probs, order, grad, leaves, len(row_layer), w_bar, p_ref)


def _gpt2_one_token(query: _Query) -> bool:
    """Whether the suffix after the cache is one token (the answer is one token, scaled at the
    last prompt token): the case `_gpt2_one_token_path` runs."""
    return len(query.seq) - query.q == 1 and query.q > 0


@torch.inference_mode()
def _gpt2_one_token_pass(model, query: _Query, layers: list[int], alphas: Tensor, rows: list[tuple[int, int]],
                         w_bar: Tensor | None, clean_rows: bool, grads: Tensor) -> Tensor:
    """Integrated gradients' rows for a one-token suffix on GPT-2 in one forward and one backward
    pass, both written out (`gpt2_written.block_prompt_and_rows`, `block_one_token_backward`).

    rows: (index into `layers`, index into `alphas`) pairs, those of each layer in step order.
    One matrix per block holds the prompt's first q tokens, the clean row at q (the unmodified
    prompt's last token) and the rows that have joined: those of layer l come out of block l as
    its residual after attention at q plus its MLP output on α w̄ (w̄: the clean row's key
    activations at block l, computed in the same pass; `w_bar` when given, e.g. by the first
    chunk). The prompt tokens give every row the same keys and values and need no gradient. The
    gradient of Σ P / P(clean) (P(clean): the clean row's) then runs down the blocks for the
    clean row and the rows, and a row of layer l leaves at block l, where its gradient with
    respect to α w̄ is the first product of block l's backward pass (through W of W key + b).
    The clean row is the row α = 1 of every layer; with `clean_rows`, it gives their gradients.

    Writes the gradients (float32) into grads[layer index, step index, :] for the given rows
    (and every layer's steps α = 1 with `clean_rows`); returns w̄ [L, d_ff]."""
    transformer, n_head, q = model.transformer, model.config.n_head, query.q
    steps: dict[int, list[int]] = {}  # absolute layer -> its rows' step indices, in order
    for j, k in rows:
        steps.setdefault(layers[j], []).append(k)
    position = {layer: j for j, layer in enumerate(layers)}
    L = len(transformer.h)
    keys_at_q, pasts, saved, blocks = [], [], [], list(transformer.h)
    h = transformer.wte.weight[query.seq] + transformer.wpe.weight[:q + 1]  # [q + 1, d]: the embeddings
    for block in range(L):  # the rows of layer l join at block l's output, their keys α w̄ in its last product
        join = alphas[steps[block]].to(h.dtype) if block in steps else None
        join_key = None if w_bar is None or join is None else w_bar[position[block]]
        h, mid, keys, past, kept = written.block_prompt_and_rows(blocks[block], h, q, n_head, join, join_key)
        keys_at_q.append(keys[q].clone())  # a copy: the block's key activations are freed
        pasts.append(past)
        saved.append(kept)
    if w_bar is None:
        w_bar = torch.stack([keys_at_q[layer] for layer in layers])
    h = h[q:]  # [1 + b, d]: the clean row, then the rows in join order
    ln_f = transformer.ln_f
    normed, mean_f, rstd_f = torch.native_layer_norm(h, ln_f.normalized_shape, ln_f.weight, ln_f.bias, ln_f.eps)
    unembed = model.lm_head.weight  # [vocab, d]
    logprobs = torch.log_softmax((normed @ unembed.T).float(), dim=-1)  # [1 + b, vocab]
    target = int(query.targets[0])
    probs = logprobs[:, target].exp()
    # Gradients of P / P(clean), rescaled after (as `_path_gradients_fused`), through the kernel
    # autograd uses for log-softmax (P near 1, a well-learnt fact, leaves few digits in 1 − P:
    # the same kernel keeps them the same as in the naive loop; an exp(log-softmax) of its own
    # differed from it by 1e-4 relative in such gradients).
    p_ref = max(float(probs[0]), 1e-30)
    grad_logprobs = torch.zeros_like(logprobs)
    grad_logprobs[:, target] = probs / p_ref
    grad_logits = torch.ops.aten._log_softmax_backward_data(grad_logprobs, logprobs, -1, logprobs.dtype)
    grad = torch.ops.aten.native_layer_norm_backward(grad_logits.to(unembed.dtype) @ unembed, h, ln_f.normalized_shape,
                                                     mean_f, rstd_f, ln_f.weight, ln_f.bias, [True, False, False])[0]
    lowest = min(layers) if clean_rows else min(steps)
    one = (alphas == 1.0).nonzero().squeeze(1)
    for block in range(L - 1, lowest - 1, -1):
        grad_keys = grad @ blocks[block].mlp.c_proj.weight.T  # [rows at block's output, d_ff]
        leaving = len(steps.get(block, ()))
        if leaving:
            grads[position[block], steps[block]] = grad_keys[-leaving:].float() * p_ref
        if clean_rows and block in position:
            grads[position[block], one] = grad_keys[0].float() * p_ref
        if block == lowest:
            break
        staying = len(grad) - leaving
        grad = written.block_one_token_backward(blocks[block], grad[:staying], grad_keys[:staying], n_head,
                                                pasts[block], saved[block])
    return w_bar


def _gpt2_one_token_path(model, query: _Query, layers: list[int], alphas: Tensor, batch_size: int | None):
    """`_path_gradients` for a one-token suffix on GPT-2 (`_gpt2_one_token_pass`): the steps
    α = 1 are the clean row's, the other rows go in chunks of `batch_size`."""
    others = [k for k, alpha in enumerate(alphas.tolist()) if alpha != 1.0]
    rows = [(j, k) for j in range(len(layers)) for k in others]
    chunk = batch_size or _default_batch_size(model, query, max(len(rows), 1))
    grads = torch.zeros(len(layers), len(alphas), d_ff(model), dtype=torch.float32, device=query.seq.device)
    w_bar = None
    for start in range(0, max(len(rows), 1), chunk):
        w_bar = _gpt2_one_token_pass(model, query, layers, alphas, rows[start:start + chunk], w_bar,
                                     start == 0 and len(others) < len(alphas), grads)
    return w_bar.float().clone(), grads  # a clone made here is an ordinary tensor, not an inference-mode one


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
    returns (w_bar, grads [L, len(alphas), d_ff]), both float32 on the model's device. The
    engines that go through the modules run with the weights frozen (`weights.frozen`: autograd
    keeps nothing for weight gradients) and GPT-2's GELU as one kernel (models.fused_activations:
    the same numbers to float rounding)."""
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
    # underflow (the loss-scaling trick of mixed-precision training); exact in float32.
    p_ref = max(float(p_clean), 1e-30)
    row_layer, row_alpha = _row_plan(len(layers), alphas, w_bar.device)
    row_step = torch.arange(len(alphas), device=w_bar.device).repeat(len(layers))  # [L·m] index of α
    chunk = batch_size or _default_batch_size(model, query, len(row_layer))
    grads = torch.zeros(len(layers), len(alphas), w_bar.shape[1], dtype=torch.float32, device=w_bar.device)
    for start in range(0, len(row_layer), chunk):
        rows = slice(start, start + chunk)
        if written_out:
            _, row_grads = _gpt2_run_rows(model, query, past, states, mids, w_bar, row_layer[rows], row_alpha[rows],
                                          layers, grad=True, p_ref=p_ref)
        else:
            _, row_grads = _engine(engine)(model, query, cache, w_bar, row_layer[rows], row_alpha[rows], layers,
                                            grad=True, p_ref=p_ref)
        grads[row_layer[rows], row_step[rows]] = row_grads
    return w_bar.float(), grads


def _one_fact_ig(model, query: _Query, layers: list[int], alphas: Tensor, batch_size: int | None,
                 engine: str) -> Tensor:
    w_bar, grads = _path_gradients(model, query, layers, alphas, batch_size, engine)
    return (w_bar * grads.mean(1)).cpu()  # [L, d_ff]


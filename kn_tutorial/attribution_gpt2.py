"""Integrated gradients (Dai et al., 2022) on GPT-2 written out: the "grow" engine of
`attribution_engine` without the module machinery.

The operations are `gpt2_written`'s. The cached tokens' keys and values are one
[heads, q, d_head] tensor per block shared by every row (never repeated, never
differentiated), and the clean prompt's block inputs come from the clean pass, so no clean
row runs in the batch. For a one-token suffix (the usual query) one forward and one
hand-written backward pass do everything (`_gpt2_one_token_pass`). Any other model, or a
GPT-2 with hooks or other attention settings, takes the module path (`attribution_engine`:
`_clean_pass`, `_run_rows_grow`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import gpt2_written as written
from .attribution_rows import _default_batch_size, _in_row_order, _Query, _rows_by_layer, _target_prob
from .models import d_ff
from .scoring import probability_dtype


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
    logprobs = torch.log_softmax(logits.to(probability_dtype(logits.dtype)), dim=-1)  # float64 for a float64 model
    picked = logprobs[0].gather(-1, query.targets[:, None])
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

    Writes the gradients (in grads' dtype: scoring.probability_dtype of the model's) into
    grads[layer index, step index, :] for the given rows
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
    logprobs = torch.log_softmax((normed @ unembed.T).to(probability_dtype(unembed.dtype)), dim=-1)  # [1 + b, vocab]
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
            grads[position[block], steps[block]] = grad_keys[-leaving:].to(grads.dtype) * p_ref
        if clean_rows and block in position:
            grads[position[block], one] = grad_keys[0].to(grads.dtype) * p_ref
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
    grad_dtype = probability_dtype(model.transformer.wte.weight.dtype)  # float64 for a float64 model
    grads = torch.zeros(len(layers), len(alphas), d_ff(model), dtype=grad_dtype, device=query.seq.device)
    w_bar = None
    for start in range(0, max(len(rows), 1), chunk):
        w_bar = _gpt2_one_token_pass(model, query, layers, alphas, rows[start:start + chunk], w_bar,
                                     start == 0 and len(others) < len(alphas), grads)
    return w_bar.to(grad_dtype).clone(), grads  # a clone made here is an ordinary tensor, not an inference-mode one

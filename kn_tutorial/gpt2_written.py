"""GPT-2 written out: a block's tensor operations on its weights, without the modules.

At Atlas's size (d_model 192, a few tokens) a forward pass is a few hundred small kernels, and
Hugging Face's per-module work (hooks, masks, cache objects, concatenated caches) costs as
much as the arithmetic. For a plain GPT2LMHeadModel (`is_plain_gpt2`) the methods' fast paths
(integrated gradients: `attribution_engine`; causal tracing: `tracing_engine`) run the same
operations written out: layer norm, Conv1D as x @ W + b, softmax attention scaled by
1/sqrt(d_head) under a causal mask, and GPT-2's tanh GELU written as x sigmoid(2z), the same
function (`gelu_tanh` without gradients; `gelu_saving`, which keeps its derivative, in
integrated gradients' hand-written backward pass). The
numbers agree with the modules to float rounding; each fast path is tested against its
method's literal definition. Any other model, or a GPT-2 with hooks or other attention
settings, takes the module path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def is_plain_gpt2(model) -> bool:
    """Whether `model` is a GPT2LMHeadModel that the written-out forward computes exactly: eval
    mode, "gelu_new", attention scaled by 1/sqrt(d_head) only, no cross-attention, an unbiased
    unembedding, and no forward hooks anywhere (they would be bypassed)."""
    if type(model).__name__ != "GPT2LMHeadModel" or model.training:
        return False
    c = model.config
    if (c.activation_function != "gelu_new" or not c.scale_attn_weights or c.scale_attn_by_inverse_layer_idx
            or c.reorder_and_upcast_attn or getattr(c, "add_cross_attention", False)
            or model.lm_head.bias is not None):
        return False
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return False
    return not any(module._forward_hooks or module._forward_pre_hooks for module in model.modules())


def layer_norm(x: Tensor, norm) -> Tensor:
    return torch.nn.functional.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def conv1d(x: Tensor, conv) -> Tensor:
    """transformers' Conv1D: x @ W + b with W [in, out]."""
    if x.dim() == 2:
        return torch.addmm(conv.bias, x, conv.weight)
    return torch.addmm(conv.bias, x.reshape(-1, x.shape[-1]), conv.weight).view(*x.shape[:-1], -1)


def mlp(block, h: Tensor) -> tuple[Tensor, Tensor]:
    """The block's second half on h (the residual after attention): (output, key activations)."""
    keys = torch.nn.functional.gelu(conv1d(layer_norm(h, block.ln_2), block.mlp.c_fc), approximate="tanh")
    return h + conv1d(keys, block.mlp.c_proj), keys


def block(block, h: Tensor, n_head: int, past=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One GPT-2 block on h [n, s, d], causal over its s tokens; past: (keys [heads, d_head, q],
    values [heads, q, d_head]) of q earlier tokens shared by every row, or None. Returns
    (output, key activations [n, s, d_ff], k, v), k and v [n, heads, s, d_head]."""
    mid, key, value = attention(block, h, n_head, past)
    return (*mlp(block, mid), key, value)


def attention(block, h: Tensor, n_head: int, past=None) -> tuple[Tensor, Tensor, Tensor]:
    """`block`'s first half: (h plus the attention output [n, s, d], k, v [n, heads, s, d_head])."""
    n, s, d = h.shape
    dh = d // n_head
    qkv = conv1d(layer_norm(h, block.ln_1), block.attn.c_attn)
    query, key, value = (t.view(n, s, n_head, dh).transpose(1, 2) for t in qkv.split(d, dim=2))
    if past is None:
        attended = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True)
    else:
        past_kt, past_v = past
        scores = torch.cat([torch.einsum("nhsd,hdq->nhsq", query, past_kt), query @ key.transpose(-1, -2)], -1)
        q = past_kt.shape[2]
        causal = torch.ones(s, s, dtype=torch.bool, device=h.device).triu(1)
        scores = scores.masked_fill(torch.nn.functional.pad(causal, (q, 0)), torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores * dh ** -0.5, dim=-1)
        attended = torch.einsum("nhsq,hqd->nhsd", weights[..., :q], past_v) + weights[..., q:] @ value
    return h + conv1d(attended.transpose(1, 2).reshape(n, s, d), block.attn.c_proj), key, value


_GELU_C = (2 / math.pi) ** 0.5  # "gelu_new": 0.5 x (1 + tanh(c (x + 0.044715 x^3)))


def _gelu_gate(x: Tensor) -> Tensor:
    """sigmoid(2 c (x + 0.044715 x^3)) = sigmoid(2 c x (1 + 0.044715 x^2)), in a new buffer, for float32
    or float64 x: GPT-2's tanh GELU is x times it (0.5 (1 + tanh z) = sigmoid(2 z)). Three passes
    (torch.addcmul, then two in place)."""
    two_c = torch.full((), 2 * _GELU_C, dtype=x.dtype, device=x.device)
    return torch.addcmul(two_c, x, x, value=2 * _GELU_C * 0.044715).mul_(x).sigmoid_()


def gelu_saving(x: Tensor, out: Tensor) -> Tensor:
    """GPT-2's tanh GELU written as x sigmoid(2 c (x + 0.044715 x^3)) (the same function:
    0.5 (1 + tanh(z)) = sigmoid(2 z)) into `out`; returns the sigmoid, which `gelu_derivative`
    needs. Cheap kernels: about twice as fast on CPU as torch's fused tanh GELU, whose tanh is
    slow, and as accurate (within a few 1e-7 of float64 on Atlas's range). 16-bit inputs are
    computed in float32 (as torch's kernels do)."""
    x = _wide(x)
    gate = _gelu_gate(x)
    torch.mul(x, gate, out=out)
    return gate


def _wide(x: Tensor) -> Tensor:
    """x in float32 if it is a 16-bit float (x^3 overflows float16 above ~40), else x itself."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def gelu_derivative(x: Tensor, gate: Tensor) -> Tensor:
    """d/dx of x sigmoid(2u), u = c (x + 0.044715 x^3): sigmoid (1 + x 2u' (1 − sigmoid)) with
    x 2u' = 2 c x (1 + 3 * 0.044715 x^2); gate = sigmoid(2u) from `gelu_saving`. Over 2x faster
    on CPU than torch's gelu_backward (which recomputes the tanh)."""
    wide = _wide(x)
    slope = (wide * wide).mul_(6 * _GELU_C * 0.044715).add_(2 * _GELU_C).mul_(wide)  # x 2u'
    return slope.addcmul_(slope, gate, value=-1).add_(1).mul_(gate).to(x.dtype)  # in place: no temporary 1 − gate


def block_prompt_and_rows(block, h: Tensor, q: int, n_head: int, join: Tensor | None = None,
                          join_key: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, tuple, tuple]:
    """One block, without autograd, on h [q + n, d]: rows 0..q-1 are a prompt's first q tokens
    (causal among themselves), and each of the n rows after them is one token at position q
    that attends to those q tokens and to itself (the prompt and the rows share the block's
    matrix products). join [j]: j more rows come out of the block, each the row at q
    with its key activations scaled by join (of join_key [d_ff] when given): their MLP output
    is computed in the same product as the others' (their residual after attention is row q's).
    Returns (output [q + n + j, d], residual after attention, key activations [q + n + j, d_ff],
    the q tokens' (keys, values) [heads, q, d_head], what `block_one_token_backward` needs for the
    n rows). The rows' attention weights are laid out [heads, q + 1, n] (the softmax runs across
    the q + 1 keys with the n rows contiguous, many times faster than across a short last axis)."""
    m, d = h.shape
    dh = d // n_head
    out_rows = m + (0 if join is None else len(join))
    ln_1, ln_2, attn, mlp = block.ln_1, block.ln_2, block.attn, block.mlp
    normed, mean_1, rstd_1 = torch.native_layer_norm(h, ln_1.normalized_shape, ln_1.weight, ln_1.bias, ln_1.eps)
    qkv = torch.addmm(attn.c_attn.bias, normed, attn.c_attn.weight)  # [q + n, 3 d]
    prompt_q, prompt_k, prompt_v = qkv[:q].view(q, 3, n_head, dh).permute(1, 2, 0, 3)  # [heads, q, d_head]
    query, key, value = qkv[q:].view(m - q, 3, n_head, dh).permute(1, 2, 0, 3)  # [heads, n, d_head]
    own = (query * key).sum(-1)[:, None]  # [heads, 1, n]
    weights = torch.softmax(torch.cat([prompt_k @ query.transpose(1, 2), own], dim=1) * dh ** -0.5, dim=1)  # [heads, q + 1, n]
    attended = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(prompt_q[None], prompt_k[None], prompt_v[None], is_causal=True)[0],
        torch.baddbmm(weights[:, q:].transpose(1, 2) * value, weights[:, :q].transpose(1, 2), prompt_v),
    ], dim=1)  # [heads, q + n, d_head]
    mid = h.new_empty(out_rows, d)
    torch.addmm(h, attended.transpose(0, 1).reshape(m, d), attn.c_proj.weight, out=mid[:m]).add_(attn.c_proj.bias)
    normed, mean_2, rstd_2 = torch.native_layer_norm(mid[:m], ln_2.normalized_shape, ln_2.weight, ln_2.bias, ln_2.eps)
    pre = torch.addmm(mlp.c_fc.bias, normed, mlp.c_fc.weight)  # [q + n, d_ff]
    keys = h.new_empty(out_rows, pre.shape[1])
    gate = gelu_saving(pre, keys[:m])
    if join is not None:
        mid[m:] = mid[q]
        torch.mul(join[:, None], keys[q] if join_key is None else join_key, out=keys[m:])
    out = torch.addmm(mid, keys, mlp.c_proj.weight).add_(mlp.c_proj.bias)
    slope = gelu_derivative(pre[q:], gate[q:])  # for the backward pass, kept instead of pre and gate
    saved = (h[q:], mean_1[q:], rstd_1[q:], query, key, value, weights, mid[q:m], mean_2[q:], rstd_2[q:], slope)
    return out, mid, keys, (prompt_k, prompt_v), saved


def block_one_token_backward(block, grad_out: Tensor, grad_keys: Tensor, n_head: int, past, saved: tuple) -> Tensor:
    """The gradient with respect to the n rows of h of `block_prompt_and_rows` (its last `past`
    and `saved`), given the gradient grad_out [n, d] with respect to their output and its first
    step grad_keys = grad_out W_proj^T [n, d_ff] (the gradient with respect to the key
    activations, which the caller may need for more rows); the chain rule written out, each step
    the backward kernel autograd would call (weights, biases and the prompt's keys and values
    are constants: they do not depend on the rows)."""
    h, mean_1, rstd_1, query, key, value, weights, mid, mean_2, rstd_2, slope = saved
    n, d = h.shape
    dh = d // n_head
    past_k, past_v = past  # [heads, q, d_head]
    q = past_k.shape[1]
    mask = [True, False, False]
    grad_pre = slope * grad_keys
    ln_2 = block.ln_2
    grad_mid = torch.ops.aten.native_layer_norm_backward(grad_pre @ block.mlp.c_fc.weight.T, mid, ln_2.normalized_shape,
                                                         mean_2, rstd_2, ln_2.weight, ln_2.bias, mask)[0].add_(grad_out)
    grad_att = (grad_mid @ block.attn.c_proj.weight.T).view(n, n_head, dh).transpose(0, 1)  # [heads, n, d_head]
    grad_weights = torch.cat([past_v @ grad_att.transpose(1, 2), (grad_att * value).sum(-1)[:, None]], dim=1)  # [heads, q + 1, n]
    grad_scores = torch.ops.aten._softmax_backward_data(grad_weights, weights, 1, weights.dtype).mul_(dh ** -0.5)
    own_t = grad_scores[:, q:].transpose(1, 2)  # [heads, n, 1]
    grad_qkv = torch.stack([
        torch.baddbmm(own_t * key, grad_scores[:, :q].transpose(1, 2), past_k),  # query
        own_t * query,  # key
        weights[:, q:].transpose(1, 2) * grad_att,  # value
    ]).permute(2, 0, 1, 3).reshape(n, 3 * d)
    ln_1 = block.ln_1
    return torch.ops.aten.native_layer_norm_backward(grad_qkv @ block.attn.c_attn.weight.T, h, ln_1.normalized_shape,
                                                     mean_1, rstd_1, ln_1.weight, ln_1.bias, mask)[0].add_(grad_mid)


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Without gradients on a CPU: x `_gelu_gate`(x), the same function, about twice as fast as
    torch's fused tanh kernel there and as accurate (both within 5e-7 of float64); 16-bit
    inputs are computed in float32. With gradients, or on another device, torch's fused kernel."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return torch.nn.functional.gelu(x, approximate="tanh")
    wide = _wide(x)
    return _gelu_gate(wide).mul_(wide).to(x.dtype)


def _heads(x: Tensor, n_head: int) -> Tensor:
    """[n, s, d] -> [n, heads, s, d_head]."""
    n, s, d = x.shape
    return x.view(n, s, n_head, d // n_head).transpose(1, 2)


def _attention_output(block, query: Tensor, key: Tensor, value: Tensor, causal_from: int | None) -> Tensor:
    """c_proj of softmax(q kᵀ / sqrt(d_head)) v, for q [n, heads, s, d_head] and k, v [n, heads, P + s, d_head]
    (the s queries are the last s tokens). causal_from = P: query i reads keys 0..P + i; None:
    every query reads every key (one query, the last token). Returns [n, s, d]."""
    n, _, s, _ = query.shape
    mask = None
    if causal_from is not None and s > 1:
        mask = torch.ones(s, causal_from + s, dtype=torch.bool, device=query.device).tril(causal_from)
    attended = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return conv1d(attended.transpose(1, 2).reshape(n, s, -1), block.attn.c_proj)


def _mlp_output(block, h: Tensor) -> Tensor:
    """The MLP's output (site "mlp_out") on the residual h after attention."""
    return conv1d(gelu_tanh(conv1d(layer_norm(h, block.ln_2), block.mlp.c_fc)), block.mlp.c_proj)


def block_after_attention(block, h: Tensor) -> Tensor:
    """The block's output from h, the residual after its attention: h + its MLP's output."""
    return h + _mlp_output(block, h)


@torch.no_grad()
def forward_recorded(model, input_ids: Tensor, added: Tensor | None = None, record: tuple[str, ...] = ()) -> dict:
    """The model on input_ids [B, T], with `added` [B, T, d] added to the input of block 0 (causal
    tracing's noise) when given. Returns {"logits": [B, vocab] of the last token} and, per name
    in `record`, a list over blocks: "resid_pre" (the input of each block, then the last block's
    output: L + 1 tensors [B, T, d]), "attn_out", "mlp_out", "hidden" ([B, T, d], hooks.HOOK_POINTS),
    "kv" ((keys, values) [B, heads, T, d_head]) and "qkv" (c_attn's output [B, T, 3 d])."""
    transformer, n_head = model.transformer, model.config.n_head
    B, T = input_ids.shape
    h = transformer.wte(input_ids) + transformer.wpe(torch.arange(T, device=input_ids.device))[None]
    if added is not None:
        h = h + added.to(h.dtype)
    out = {name: [] for name in record}
    for block in transformer.h:
        out.get("resid_pre", []).append(h)
        qkv = conv1d(layer_norm(h, block.ln_1), block.attn.c_attn)
        query, key, value = (_heads(t, n_head) for t in qkv.split(h.shape[-1], dim=2))
        attn = _attention_output(block, query, key, value, causal_from=0)
        mid = h + attn
        mlp_out = _mlp_output(block, mid)
        h = mid + mlp_out
        for name, value_ in (("qkv", qkv), ("kv", (key, value)), ("attn_out", attn), ("mlp_out", mlp_out), ("hidden", h)):
            out.get(name, []).append(value_)
    out.get("resid_pre", []).append(h)
    out["logits"] = model.lm_head(layer_norm(h[:, -1], transformer.ln_f))
    return out


def rows_from_blocks(model, starts: Tensor, hidden: Tensor, writes: dict, source: Tensor, past: list | None,
                     first_qkv: list, changed: Tensor) -> Tensor:
    """`suffix.run_rows_from_blocks(..., last_only=True)` written out, with the patches as `writes`.

    Every row is a variant of a recorded run (`source` [R]: which one) on the M suffix tokens.
    Row r starts at block starts[r] (ascending) from hidden[r] [M, d], its input of that block;
    past: per block (keys, values) [N, heads, P, d_head] of the recorded runs at the P tokens
    before the suffix (None below starts[0]), or None when P = 0. writes: {(site, layer):
    (rows, pos, values [N, d])} with site "attn_out", "mlp_out" or "hidden" (hooks.HOOK_POINTS):
    activation[rows[i], pos[i]] = values[i] in block `layer`, for rows present there.

    first_qkv: per block [N, M, 3 d], the recorded runs' c_attn output at the suffix tokens, with
    changed [R, M] bool: where a row's input of its first block differs from its recorded run's.
    A row's queries, keys and values in its first block are then its run's, computed only at
    the changed tokens (a layer norm and a projection act on each token alone).

    Returns the last suffix token's logits, [R, vocab]. In the last block only the last token's
    query, attention output and MLP are computed (nothing else is read), so writes there at
    other positions change nothing and are skipped.
    """
    transformer, n_head = model.transformer, model.config.n_head
    L = len(transformer.h)
    M, d = hidden.shape[1], hidden.shape[2]
    first = int(starts[0])
    present = torch.searchsorted(starts, torch.arange(L + 1, device=starts.device), right=True).tolist()

    def write(act: Tensor, site: str, layer: int, last: bool) -> Tensor:
        if (site, layer) not in writes:
            return act
        rows, pos, values = writes[(site, layer)]
        if last:
            keep = pos == M - 1
            rows, pos, values = rows[keep], torch.zeros_like(pos[keep]), values[keep]
        act[rows, pos] = values.to(act.dtype)
        return act

    h = None
    for layer in range(first, L + 1):
        low, high = (0 if layer == first else present[layer - 1]), present[layer]
        joining = hidden[low:high] if high > low else None
        if layer == L:  # rows that only change the final norm's input
            if joining is not None:
                h = joining if h is None else torch.cat([h, joining[:, -1:]])
            break
        block, last = transformer.h[layer], layer == L - 1
        weight, bias = block.attn.c_attn.weight, block.attn.c_attn.bias
        parts = []  # c_attn's output for the rows in the pass, then for the rows joining here
        split = last and h is not None  # rows in the pass at the last block: keys and values, one query
        if h is not None:
            x = layer_norm(h, block.ln_1)
            if split:
                kv = conv1d_parts(x, weight[:, d:], bias[d:])
                query_last = conv1d_parts(x[:, -1:], weight[:, :d], bias[:d])
            else:
                parts.append(conv1d(x, block.attn.c_attn))
        if joining is not None:
            qkv = first_qkv[layer].index_select(0, source[low:high])
            rows, pos = changed[low:high].nonzero(as_tuple=True)
            if len(rows):
                qkv[rows, pos] = conv1d(layer_norm(joining[rows, pos], block.ln_1), block.attn.c_attn)
            parts.append(qkv)
            h = joining if h is None else torch.cat([h, joining])
        if split:
            if parts:  # rows joining at the last block
                kv = torch.cat([kv, parts[0][..., d:]])
                query_last = torch.cat([query_last, parts[0][:, -1:, :d]])
            query, key, value = query_last, *kv.split(d, dim=2)
        else:
            query, key, value = (torch.cat(parts) if len(parts) > 1 else parts[0]).split(d, dim=2)
            if last:
                query = query[:, -1:]
        query, key, value = _heads(query, n_head), _heads(key, n_head), _heads(value, n_head)
        P = 0
        if past is not None:
            P = past[layer][0].shape[2]
            rows = source[:len(h)]
            key = torch.cat([past[layer][0].index_select(0, rows), key], 2)
            value = torch.cat([past[layer][1].index_select(0, rows), value], 2)
        attn = write(_attention_output(block, query, key, value, None if last else P), "attn_out", layer, last)
        h = (h[:, -1:] if last else h) + attn
        h = write(h + write(_mlp_output(block, h), "mlp_out", layer, last), "hidden", layer, last)
    return model.lm_head(layer_norm(h[:, -1], transformer.ln_f))


def conv1d_parts(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """x @ weight + bias for a slice of a Conv1D's output columns (weight [in, k], bias [k])."""
    return torch.addmm(bias, x.reshape(-1, x.shape[-1]), weight).view(*x.shape[:-1], -1)

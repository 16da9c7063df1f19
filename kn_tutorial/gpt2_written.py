"""GPT-2 written out: a block's tensor operations on its weights, without the modules.

At Atlas's size (d_model 192, a few tokens) a forward pass is a few hundred small kernels, and
Hugging Face's per-module work (hooks, masks, cache objects, concatenated caches) costs as
much as the arithmetic. For a plain GPT2LMHeadModel (`is_plain_gpt2`) the methods' fast paths
(integrated gradients: `attribution_engine`; causal tracing: `tracing_engine`) run the same
operations written out: layer norm, Conv1D as x @ W + b, softmax attention scaled by
1/sqrt(d_head) under a causal mask, and the tanh GELU of `models.fused_activations`. The
numbers agree with the modules to float rounding; each fast path is tested against its
method's literal definition. Any other model, or a GPT-2 with hooks or other attention
settings, takes the module path.
"""
from __future__ import annotations

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
    h = h + conv1d(attended.transpose(1, 2).reshape(n, s, d), block.attn.c_proj)
    return (*mlp(block, h), key, value)


def block_one_token(block, h: Tensor, n_head: int, past) -> Tensor:
    """`block` for one new token per row (the usual suffix: a one-token answer at the last
    position), h [n, d] -> [n, d], laid out heads-first so each product is one batched matrix
    product per head rather than one tiny product per row and head."""
    n, d = h.shape
    dh = d // n_head
    past_kt, past_v = past  # [heads, d_head, q], [heads, q, d_head]
    query, key, value = conv1d(layer_norm(h, block.ln_1), block.attn.c_attn).view(n, 3, n_head, dh).permute(1, 2, 0, 3)
    own = (query * key).sum(-1, keepdim=True)  # [heads, n, 1]
    weights = torch.softmax(torch.cat([query @ past_kt, own], dim=-1) * dh ** -0.5, dim=-1)
    q = past_kt.shape[2]
    attended = torch.baddbmm(weights[..., q:] * value, weights[..., :q], past_v)  # [heads, n, d_head]
    h = h + conv1d(attended.transpose(0, 1).reshape(n, d), block.attn.c_proj)
    return mlp(block, h)[0]


def _attention_rows(block, h: Tensor, n_head: int, past, last_only: bool) -> Tensor:
    """The attention output (after c_proj) of the suffix h [n, s, d] whose tokens come after the P
    cached tokens of past = (keys, values) [>= n, heads, P, d_head] (one cache row per row; None:
    P = 0). Causal: suffix token i reads the P cached tokens and suffix tokens 0..i. last_only:
    only the last suffix token's output, [n, 1, d]."""
    n, s, d = h.shape
    dh = d // n_head
    query, key, value = (t.view(n, s, n_head, dh).transpose(1, 2)
                         for t in conv1d(layer_norm(h, block.ln_1), block.attn.c_attn).split(d, dim=2))
    P = 0
    if past is not None:
        P = past[0].shape[2]
        key, value = torch.cat([past[0][:n], key], 2), torch.cat([past[1][:n], value], 2)
    if last_only:
        query, mask = query[:, :, -1:], None  # the last token reads every token
    elif s == 1:
        mask = None
    else:
        mask = torch.ones(s, P + s, dtype=torch.bool, device=h.device).tril(P)
    attended = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask)
    return conv1d(attended.transpose(1, 2).reshape(n, query.shape[2], d), block.attn.c_proj)


def rows_from_blocks(model, starts: Tensor, hidden: Tensor, past: list | None, writes: dict) -> Tensor:
    """`suffix.run_rows_from_blocks(..., last_only=True)` written out, with the patches as `writes`.

    Row r starts at block starts[r] (ascending) from hidden[r] [M, d], its input of that block at
    the suffix tokens; past: per block (keys, values) [R, heads, P, d_head] of the P tokens
    before the suffix (None below starts[0]), or None when P = 0. writes: {(site, layer):
    (rows, pos, values [N, d])} with site "attn_out", "mlp_out" or "hidden" (hooks.HOOK_POINTS):
    activation[rows[i], pos[i]] = values[i] in block `layer`, for rows present there. Returns
    the last suffix token's logits, [R, vocab]. In the last block only the last token is
    computed after the attention's keys and values (nothing else is read), so writes there at
    other positions change nothing and are skipped.
    """
    transformer, n_head = model.transformer, model.config.n_head
    L = len(transformer.h)
    first = int(starts[0])
    present = torch.searchsorted(starts, torch.arange(L + 1, device=starts.device), right=True).tolist()
    h = hidden[:present[first]]

    def write(act: Tensor, site: str, layer: int, last: bool) -> Tensor:
        if (site, layer) not in writes:
            return act
        rows, pos, values = writes[(site, layer)]
        if last:
            keep = pos == hidden.shape[1] - 1
            rows, pos, values = rows[keep], torch.zeros_like(pos[keep]), values[keep]
        act[rows, pos] = values.to(act.dtype)
        return act

    for layer in range(first, L + 1):
        if layer > first and present[layer] > present[layer - 1]:
            joining = hidden[present[layer - 1]:present[layer]]
            h = torch.cat([h, joining[:, -1:] if layer == L else joining])  # past the last block: one token
        if layer == L:
            break
        block, last = transformer.h[layer], layer == L - 1
        attn = write(_attention_rows(block, h, n_head, None if past is None else past[layer], last), "attn_out", layer, last)
        h = (h[:, -1:] if last else h) + attn
        out = conv1d(torch.nn.functional.gelu(conv1d(layer_norm(h, block.ln_2), block.mlp.c_fc), approximate="tanh"),
                     block.mlp.c_proj)
        h = write(h + write(out, "mlp_out", layer, last), "hidden", layer, last)
    return model.lm_head(layer_norm(h[:, -1], transformer.ln_f))

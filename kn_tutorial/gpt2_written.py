"""GPT-2 written out: a block's tensor operations on its weights, without the modules.

At Atlas's size (d_model 192, a few tokens) a forward pass is a few hundred small kernels, and
Hugging Face's per-module work (hooks, masks, cache objects, concatenated caches) costs as
much as the arithmetic. For a plain GPT2LMHeadModel (`is_plain_gpt2`) the methods' fast paths
(integrated gradients: `attribution_engine`; causal tracing: `tracing_engine`) run the same
operations written out: layer norm, Conv1D as x @ W + b, softmax attention scaled by
1/sqrt(d_head) under a causal mask, and GPT-2's tanh GELU (`gelu_tanh`). The
numbers agree with the modules to float rounding; each fast path is tested against its
method's literal definition. Any other model, or a GPT-2 with hooks or other attention
settings, takes the module path.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

_C2 = 2 * math.sqrt(2 / math.pi)


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


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

    Without gradients on a CPU it is computed as x sigmoid(2 sqrt(2/pi) x (1 + 0.044715 x^2)), the
    same function (0.5 (1 + tanh z) = sigmoid(2 z)) in place on one buffer: about twice as fast
    as torch's fused tanh kernel on CPU, whose tanh is slow, and as accurate (both within 5e-7 of
    float64). With gradients, or on another device, torch's fused kernel."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and x.requires_grad):
        return torch.nn.functional.gelu(x, approximate="tanh")
    c = torch.full((), _C2, dtype=x.dtype)
    return torch.addcmul(c, x, x, value=0.044715 * _C2).mul_(x).sigmoid_().mul_(x)


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


def rows_from_blocks(model, starts: Tensor, hidden: Tensor, writes: dict, source: Tensor | None = None,
                     past: list | None = None, first_qkv: list | None = None, changed: Tensor | None = None) -> Tensor:
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
            if first_qkv is not None:
                qkv = first_qkv[layer].index_select(0, source[low:high])
                rows, pos = changed[low:high].nonzero(as_tuple=True)
                if len(rows):
                    qkv[rows, pos] = conv1d(layer_norm(joining[rows, pos], block.ln_1), block.attn.c_attn)
            else:
                qkv = conv1d(layer_norm(joining, block.ln_1), block.attn.c_attn)
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

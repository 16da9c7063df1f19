"""Feed-forward layers are key-value memories (Geva et al., 2021, EMNLP).

In the book's notation (vectors are rows), the FFN of layer l reads the residual stream
after its layer norm, x in R^{d_model}, and computes

    FF(x) = f(x K^T + b_K) V + b_V = sum_i m_i v_i + b_V,    m_i = f(x . k_i + b_i)

K, V: [d_ff, d_model]. Row k_i of K is a *key*, a pattern detector over the input; row v_i
of V is its *value*; the coefficient m_i (the activation of neuron i, the site "key" of
`hooks.py`) says how strongly memory i is read. For Llama m_i = act(x . g_i) (x . k_i).
`models.key_matrix` / `value_matrix` read K and V in this orientation for every family.

What this module computes, section by section of the chapter:

1. `ffn_as_memories`: the identity above, from the weights.
2. `find_triggers`: the top-k *trigger examples* of every key: the corpus prefixes (ending at
   the position where the key fires most) with the largest m_i, for all keys of all chosen
   layers in one pass over the corpus (`memories_engine`). Geva rank prefixes by x . k_i; we
   rank by m_i, the same order wherever m_i > 0 since f is increasing there.
3. `value_logits` / `value_top_tokens`: p_i = softmax(v_i E), E the unembedding
   ([d_model, vocab]; GPT-2 ties it to the token embedding). Like Geva we project v_i
   *without* the final layer norm (and without the head's bias, if any);
   `apply_final_norm=True` shows the logit-lens variant. `key_value_agreement`: how often
   the token after a key's trigger example is among its value's top tokens.
4. `trigger_sharing`: what a key's top triggers have in common, by layer: the same last
   token (a shallow pattern), or the same relation or subject attribute beyond what their
   tokens explain (a semantic one); `trigger_parts`: whether they sit in the subject, the
   relation or the object; `token_removal_effect`: Geva's test, remove the first or last
   token of trigger examples. `atlas_sentences` labels the Atlas corpus (`memories_sharing`).
5. `memory_composition` (is the FFN output's top token the top token of one of its
   strongest memories?) and `refinement` (the logit lens, final norm and unembedding, on
   the residual stream after each layer).
6. `top_memories` for looking around. Trigger tables, HTML and `memory_explorer`
   (ipywidgets) live in `memories_display`.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .hooks import record
from .lazy import lazy_exports
from .memories_engine import Corpus, Trigger, Triggers, find_triggers, tokenize_corpus  # noqa: F401
from .memories_sharing import (  # noqa: F401  (section 4 of the chapter, importable from here)
    SENTENCE_PARTS, AtlasSentence, _label_ids, _pair_share, atlas_sentences, atlas_token_parts,
    candidate_positions, key_sharing, same_token_resample, token_removal_effect, trigger_parts, trigger_sharing,
)
from .models import (
    check_layer, final_norm, gate_matrix, get_arch, get_device, key_bias, key_matrix,
    mlp_activation, n_layers, unembedding_matrix, value_bias, value_matrix,
)
from .progress import progress
from .scoring import encode
from .text_datasets import dataset_texts

# Trigger tables, HTML and the explorer live in memories_display (it imports this module).
__getattr__ = lazy_exports(__package__, "memories_display",
                           ("show_triggers", "value_tokens_html", "memories_html", "memory_explorer"))

# --------------------------------------------------------------------------------------
# 1. The identity FF(x) = sum_i m_i v_i + b_V
# --------------------------------------------------------------------------------------


class Memories(NamedTuple):
    """An FFN output taken apart into memories: output = coefficients @ values + bias."""

    coefficients: Tensor  # m = f(x K^T + b_K)          [..., d_ff]
    values: Tensor        # V, row i is v_i              [d_ff, d_model]
    bias: Tensor          # b_V (zeros if the layer has none)   [d_model]
    output: Tensor        # sum_i m_i v_i + b_V          [..., d_model]

    def weighted(self) -> Tensor:
        """Each memory's contribution m_i v_i: [..., d_ff, d_model] (large: use on a few x)."""
        return self.coefficients[..., :, None] * self.values


@torch.no_grad()
def ffn_as_memories(model: nn.Module, layer: int, x: Tensor) -> Memories:
    """Read layer `layer`'s FFN as key-value memories and apply it to x: [..., d_model].

    x is the FFN's input (the site "mlp_in" of hooks.py, after the block's layer norm).
    Computed from K, V and the biases alone, never by calling the MLP module, so
    `output` equals the MLP's output only if the key-value reading is right.
    """
    layer = check_layer(model, layer)
    K, V = key_matrix(model, layer), value_matrix(model, layer)  # [d_ff, d_model] each
    x = x.to(K.dtype)
    pre = x @ K.T                                                # x . k_i     [..., d_ff]
    if key_bias(model, layer) is not None:
        pre = pre + key_bias(model, layer)
    f = mlp_activation(model, layer)
    G = gate_matrix(model, layer)                                # Llama only
    coefficients = f(pre) if G is None else f(x @ G.T) * pre     # m_i        [..., d_ff]
    b_V = value_bias(model, layer)
    bias = torch.zeros(V.shape[1], dtype=V.dtype, device=V.device) if b_V is None else b_V
    return Memories(coefficients, V, bias, coefficients @ V + bias)


# --------------------------------------------------------------------------------------
# 3. Values as distributions over the vocabulary
# --------------------------------------------------------------------------------------


@torch.no_grad()
def value_logits(model: nn.Module, layer: int, neurons: Sequence[int] | Tensor | None = None,
                 apply_final_norm: bool = False) -> Tensor:
    """v_i E for the chosen neurons (default all): [n, vocab], float32.

    E = unembedding_matrix(model).T. Geva et al. project the raw value (the default);
    apply_final_norm=True first passes v_i through the final layer norm (logit lens).
    """
    V = value_matrix(model, layer)
    if neurons is not None:
        V = V[torch.as_tensor(neurons, dtype=torch.long, device=V.device)]
    if apply_final_norm:
        V = final_norm(model)(V)
    return (V @ unembedding_matrix(model).T).float()


def value_distribution(model: nn.Module, layer: int, neurons=None, apply_final_norm: bool = False) -> Tensor:
    """p_i = softmax(v_i E): [n, vocab]."""
    return value_logits(model, layer, neurons, apply_final_norm).softmax(-1)


@torch.no_grad()
def value_top_tokens(model: nn.Module, layer: int, k: int = 10, neurons=None,
                     apply_final_norm: bool = False, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """The k most probable tokens of p_i for each neuron: (ids [n, k], probs [n, k]), on CPU.

    Chunked over neurons, so a gpt2-xl layer (6,400 x 50,257 logits) never sits in memory whole.
    """
    all_neurons = torch.arange(value_matrix(model, layer).shape[0]) if neurons is None \
        else torch.as_tensor(neurons, dtype=torch.long).reshape(-1)
    ids, probs = [], []
    for start in range(0, len(all_neurons), chunk):
        p = value_distribution(model, layer, all_neurons[start:start + chunk], apply_final_norm)
        top = p.topk(k, dim=-1)
        ids.append(top.indices.cpu())
        probs.append(top.values.cpu())
    return torch.cat(ids), torch.cat(probs)


def key_value_agreement(triggers: Triggers, value_ids: dict[int, Tensor], n_examples: int = 1,
                        k: int = 1, seed: int = 0) -> dict[str, list[float]]:
    """Geva's agreement rate per layer, and a shuffled baseline.

    agreement[l] = share of keys of layer l for which the next token of at least one of the
    top-n_examples trigger examples is among the top-k tokens of the key's own value.
    (n_examples=1, k=1 is Geva's figure: the value's top prediction equals the next token
    of the top trigger.) value_ids[l]: [d_ff, >=k] from value_top_tokens.
    baseline[l] = the same with the values of a random permutation of the layer's keys: what
    agreement to expect from token frequencies alone.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {"layer": [], "agreement": [], "baseline": []}
    for layer in triggers.layers:
        nxt = triggers.next_tokens(layer, n_examples)                  # [d_ff, n]
        top = value_ids[layer][:, :k]                                  # [d_ff, k]
        hits = lambda vals: (nxt[:, :, None] == vals[:, None, :]).any(-1).any(-1)  # noqa: E731
        perm = torch.randperm(len(top), generator=gen)
        out["layer"].append(layer)
        out["agreement"].append(hits(top).float().mean().item())
        out["baseline"].append(hits(top[perm]).float().mean().item())
    return out


@torch.no_grad()
def next_token_ranks(triggers: Triggers, model: nn.Module, layer: int, chunk: int = 1024) -> Tensor:
    """Rank (0 = top) of the top trigger's next token in p_i, per key: [d_ff] (-1: no next token)."""
    nxt = triggers.next_tokens(layer, 1)[:, 0]                         # [d_ff]
    ranks = []
    for start in range(0, len(nxt), chunk):
        rows = torch.arange(start, min(start + chunk, len(nxt)))
        logits = value_logits(model, layer, rows)                      # [chunk, vocab]
        own = logits.gather(1, nxt[rows].clamp(min=0)[:, None].to(logits.device))
        ranks.append((logits > own).sum(-1).cpu())
    ranks = torch.cat(ranks)
    return torch.where(nxt >= 0, ranks, torch.full_like(ranks, -1))


# --------------------------------------------------------------------------------------
# 5. Composition inside a layer, refinement across layers
# --------------------------------------------------------------------------------------


def _last_positions(model, tokenizer, prompts: Sequence[str]):
    batch = encode(tokenizer, list(prompts), device=get_device(model))
    rows = torch.arange(len(prompts), device=batch.input_ids.device)
    return batch, rows, batch.last_prompt_index().to(batch.input_ids.device)


@torch.no_grad()
def memory_composition(model: nn.Module, tokenizer, prompts: Sequence[str], top_n: int = 10,
                       layers: Sequence[int] | None = None, batch_size: int = 128) -> dict[str, list[float]]:
    """Is the FFN output's top token the top token of one of its strongest memories?

    At the last token of each prompt and each layer: the FFN output o = sum_i m_i v_i + b_V,
    its top token argmax(o E), and the top token of each memory's contribution m_i v_i
    (argmax of v_i E if m_i > 0, argmin if m_i < 0), memories ranked by |m_i| ||v_i||.
    Returns per layer the share of prompts where argmax(o E) equals the top token of
      "strongest": the single strongest memory;
      "any of top_n": at least one of the top_n strongest;
    and "composition" = 1 - "any of top_n": the output predicts a token that none of its
    strongest memories predicts on its own; "output tokens": per layer, argmax(o E) for
    every prompt ([n_prompts] tensors), to see what the FFN output points at.
    """
    layers = list(range(n_layers(model))) if layers is None else [check_layer(model, l) for l in layers]
    U = unembedding_matrix(model)                                            # [vocab, d_model]
    value_top = {}
    for l in layers:  # top and bottom token of every value, chunked over neurons
        tops, bottoms = [], []
        for start in range(0, value_matrix(model, l).shape[0], 1024):
            logits = value_logits(model, l, torch.arange(start, min(start + 1024, value_matrix(model, l).shape[0])))
            tops.append(logits.argmax(-1))
            bottoms.append(logits.argmin(-1))
        norms = value_matrix(model, l).float().norm(dim=-1)                  # ||v_i||  [d_ff]
        value_top[l] = (torch.cat(tops), torch.cat(bottoms), norms)
    counts = {l: torch.zeros(2) for l in layers}
    output_tokens = {l: [] for l in layers}
    for start in progress(range(0, len(prompts), batch_size), desc="composition"):
        chunk = list(prompts[start:start + batch_size])
        batch, rows, last = _last_positions(model, tokenizer, chunk)
        acts = record(model, [(s, l) for l in layers for s in ("key", "mlp_out")],
                      input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for l in layers:
            m = acts[("key", l)][rows, last].float()                          # [b, d_ff]
            o = acts[("mlp_out", l)][rows, last]                              # [b, d_model]
            out_tok = (o @ U.T).argmax(-1)                                   # [b]
            output_tokens[l].append(out_tok.cpu())
            top, bottom, norms = value_top[l]
            strongest = (m.abs() * norms).topk(top_n, dim=-1).indices        # [b, top_n]
            mem_tok = torch.where(m.gather(1, strongest) > 0, top[strongest], bottom[strongest])
            match = mem_tok == out_tok[:, None]                              # [b, top_n]
            counts[l] += torch.stack([match[:, 0].sum(), match.any(-1).sum()]).float().cpu()
    n = len(prompts)
    strongest = [counts[l][0].item() / n for l in layers]
    any_top = [counts[l][1].item() / n for l in layers]
    return {"layer": layers, "strongest": strongest, "any of top_n": any_top,
            "composition": [1 - a for a in any_top],
            "output tokens": [torch.cat(output_tokens[l]) for l in layers]}


def logit_lens(model: nn.Module, hidden: Tensor) -> Tensor:
    """Logits of a residual-stream vector read as if it were the last layer's:
    the final norm, then the model's own unembedding head (its bias included)."""
    head = model.get_submodule(get_arch(model).unembed)
    return head(final_norm(model)(hidden))


@torch.no_grad()
def refinement(model: nn.Module, tokenizer, prompts: Sequence[str], batch_size: int = 128) -> dict[str, list[float]]:
    """How the prediction forms across layers, at the last token of each prompt (logit lens).

    For each layer l, with r = residual before the FFN (resid_pre + attn_out), o = the FFN
    output and h = r + o the block output, and top(.) = argmax of logit_lens(.):
      "matches final": share of prompts where top(h) is already the model's final prediction;
      "residual":      top(h) == top(r): the FFN kept the residual's prediction;
      "ffn":           top(h) == top(o) != top(r): the FFN's own prediction took over;
      "composition":   top(h) is neither top(r) nor top(o).
    (Geva et al. 2021, section 5.2; the three last shares sum to 1.)
    """
    L = n_layers(model)
    sites = [(s, l) for l in range(L) for s in ("resid_pre", "attn_out", "mlp_out", "hidden")]
    counts = torch.zeros(L, 4)
    for start in progress(range(0, len(prompts), batch_size), desc="logit lens"):
        chunk = list(prompts[start:start + batch_size])
        batch, rows, last = _last_positions(model, tokenizer, chunk)
        acts = record(model, sites, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        at = lambda site, l: acts[(site, l)][rows, last]  # noqa: E731   [b, d_model]
        final = logit_lens(model, at("hidden", L - 1)).argmax(-1)
        for l in range(L):
            r = at("resid_pre", l) + at("attn_out", l)
            top_r, top_o = logit_lens(model, r).argmax(-1), logit_lens(model, at("mlp_out", l)).argmax(-1)
            top_h = logit_lens(model, at("hidden", l)).argmax(-1)
            kept, own = top_h == top_r, (top_h == top_o) & (top_h != top_r)
            counts[l] += torch.stack([top_h == final, kept, own, ~kept & ~own]).sum(-1).float().cpu()
    shares = (counts / len(prompts)).T.tolist()
    return {"layer": list(range(L)), "matches final": shares[0], "residual": shares[1],
            "ffn": shares[2], "composition": shares[3]}


# --------------------------------------------------------------------------------------
# 6. Looking around: the memories that fire for a prompt
# --------------------------------------------------------------------------------------


@torch.no_grad()
def top_memories(model: nn.Module, tokenizer, prompt: str, k: int = 10, layers=None,
                 n_tokens: int = 5) -> list[dict]:
    """The k memories (layer, neuron) contributing most, |m_i| ||v_i||, at the prompt's last
    token, over all chosen layers, each with its value's top tokens (strongest first)."""
    layers = list(range(n_layers(model))) if layers is None else [check_layer(model, l) for l in layers]
    batch, rows, last = _last_positions(model, tokenizer, [prompt])
    acts = record(model, [("key", l) for l in layers], input_ids=batch.input_ids)
    m = torch.stack([acts[("key", l)][0, last[0]].float() for l in layers])        # [n_layers, d_ff]
    norms = torch.stack([value_matrix(model, l).float().norm(dim=-1) for l in layers])
    strength = (m.abs() * norms).flatten()
    top = strength.topk(min(k, len(strength)))
    rows_out = []
    for s, flat in zip(top.values.tolist(), top.indices.tolist()):
        j, i = divmod(flat, m.shape[1])
        ids, probs = value_top_tokens(model, layers[j], n_tokens, neurons=[i])
        sign = 1 if m[j, i] > 0 else -1
        if sign < 0:  # a negative coefficient promotes the value's *bottom* tokens
            logits = -value_logits(model, layers[j], [i])
            ids = logits.topk(n_tokens, -1).indices.cpu()
            probs = logits.softmax(-1).gather(1, ids.to(logits.device)).cpu()
        rows_out.append({
            "layer": layers[j], "neuron": i, "coefficient": m[j, i].item(), "strength": s,
            "tokens": [tokenizer.decode([t]) for t in ids[0].tolist()], "probs": probs[0].tolist(),
        })
    return rows_out


def texts_from_dataset(path: str = "wikitext", name: str | None = "wikitext-103-raw-v1",
                       split: str = "validation", n: int = 2000, min_chars: int = 40, seed: int = 0) -> list[str]:
    """n non-empty lines of a Hugging Face `datasets` split (seeded sample), for hub models on Colab.

    Geva et al. used WikiText-103; this needs `pip install datasets` and the network.
    """
    rows = [t.strip() for t in dataset_texts(path, name, split, streaming=False, caller="texts_from_dataset",
                                             offline="atlas_sentences()")]
    rows = [t for t in rows if len(t) >= min_chars and not t.startswith("=")]
    return random.Random(seed).sample(rows, min(n, len(rows)))

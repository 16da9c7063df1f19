"""The rows integrated gradients runs (Dai et al., 2022), shared by its engines: the query a
fact becomes, its target probability, the rows grouped by the layer they scale and put back in
row order, and how many rows fit in one pass. The engines: `attribution_engine` (through the
modules) and `attribution_gpt2` (GPT-2 written out)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .models import d_ff, d_model, get_device, n_layers
from .scoring import probability_dtype
from .validate import require_positive_int


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
    """P(target) per row from logits [b, s', vocab] of seq[offset:]: [b] (float32; float64 for a
    float64 model: scoring.probability_dtype)."""
    logits = logits[:, query.predict_at - offset]
    logprobs = torch.log_softmax(logits.to(probability_dtype(logits.dtype)), dim=-1)  # [b, T, vocab]
    picked = logprobs.gather(-1, query.targets[None, :, None].expand(len(logits), -1, 1))  # [b, T, 1]
    return picked.sum(dim=(1, 2)).exp()


def _check_batch_size(batch_size) -> None:
    if batch_size is not None:
        require_positive_int("batch_size", batch_size, "Pass None to pick one that fits the memory.")


# --------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------

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


def _in_row_order(probs, order, grad: bool, leaves: dict, n_rows: int, w_bar, p_ref):
    """The rows' probabilities (and, with `grad`, their gradients with respect to the scaled
    activations, one row each) put back from the engine's batch order into row order."""
    out_probs = torch.empty_like(probs)
    out_probs[order] = probs.detach()
    if not grad:
        return out_probs, None
    grads = torch.autograd.grad((probs / p_ref).sum(), [leaves[layer] for layer in leaves])
    grad_dtype = probability_dtype(w_bar.dtype)  # float32 for 16-bit models (p_ref rescales)
    row_grads = torch.empty(n_rows, w_bar.shape[1], dtype=grad_dtype, device=w_bar.device)
    row_grads[order] = torch.cat(grads).to(grad_dtype) * p_ref
    return out_probs, row_grads


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

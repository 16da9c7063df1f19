"""How causal tracing runs fast (the definition: `tracing`; Meng et al., 2022, section 2).

The engine restores hook sites (hooks.HOOK_POINTS: "hidden", "mlp_out", "attn_out"); `tracing`
maps its kinds onto them and checks the input. None of this changes the numbers;
`tracing.trace_naive` is the definition run literally, and the tests hold the engine to it.

1. Rows. All restorations of a prompt, for every (token, layer, noise sample), are rows of
   one batch; hooks write the clean states into the chosen (row, position) pairs with index
   tensors, and rows are chunked by `batch_size` to bound memory. Prompts of the same token
   length share batches (no padding), and only the last position's logits are computed.
2. Tokens. Attention is causal, so a restoration at token t cannot change tokens before t:
   a row restoring token t starts at t, reading the keys and values of tokens 0..t-1 from
   the corrupted run (a KV cache).
3. Layers. Nor can it change anything below its layer: a row restoring layer l runs only
   blocks from l (from l + 1 for a hidden state, which is the input of block l + 1, and for
   an MLP output, which block l adds last to its output), starting from the corrupted run's
   input of that block; the rows of a token join one pass, each at its own block
   (suffix.run_rows_from_blocks).
4. Nothing to run. Restoring a state before the subject changes nothing at all (the noise
   has not reached it), nor does restoring a last-layer state of any token but the last (no
   later layer reads it): `tracing.trace_batch` fills those cells with the corrupted
   probability without a pass.
5. The last block. Only the last position's logits are read, and an MLP works on each
   position alone, so the last block's MLP runs on the last position only (its attention
   still on every position, which the last one reads): suffix.run_rows_from_blocks(last_only=True).
6. GPT-2 written out. On a plain GPT2LMHeadModel (`gpt2_written.is_plain_gpt2`) the clean and
   corrupted runs (`gpt2_written.forward_recorded`) and the restored rows
   (`gpt2_written.rows_from_blocks`) run as the block's tensor operations on the weights, the
   restorations written into the activations directly instead of through hooks. In its first
   block a row reads its corrupted run's queries, keys and values except at the tokens its
   restoration changed; in the last block only the last token's query, attention output and
   MLP are computed. A row
   whose first restoration is an attention output at layer l starts at block l + 1: the
   attention of the other tokens reads block l's input, which nothing changed, so block l
   changes only at the restored tokens, whose output is their MLP after the restored
   attention output. Other models, and a GPT-2 with hooks, run the modules (points 1-5).
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from . import gpt2_written
from .gpt2_written import is_plain_gpt2
from .hooks import Recorder, patch
from .kv_cache import output_cache
from .models import embedding_matrix, get_device, n_layers
from .scoring import probability_dtype
from .suffix import run_rows_from_blocks
from .validate import NonFiniteEditError, nonfinite_cause


# --------------------------------------------------------------------------------------
# Many restored runs of a group of same-length prompts, batched
# --------------------------------------------------------------------------------------

@dataclass
class _Group:
    """Clean and corrupted runs of n prompts of T tokens (everything the restored rows need)."""
    input_ids: Tensor            # [n, T]
    targets: Tensor              # [n] token id of o
    noise: Tensor                # [n, S, T, d_model] on the model's device and dtype
    clean_prob: Tensor           # [n]
    corrupted_prob: Tensor       # [n, S]
    clean_states: Tensor         # [L, n, T, d_model], the restored site
    frozen_states: list[Tensor] | None  # L x [n, S, T, d_model] corrupted sever site, or None
    corrupted_kv: list[tuple[Tensor, Tensor]]  # per layer (keys, values) of the corrupted runs, rows (i, j)
    corrupted_inputs: Tensor     # [L+1, n*S, T, d_model]: input of block l (l = L: of the final norm)
    corrupted_states: Tensor | None  # site "mlp_out": [L, n*S, T, d_model] corrupted MLP outputs, else None
    written: bool = False        # GPT-2 written out (gpt2_written.is_plain_gpt2 when prepared)
    corrupted_qkv: list[Tensor] | None = None  # written: L x [n*S, T, 3 d_model] c_attn outputs, else None

    @property
    def samples(self) -> int:
        return self.noise.shape[1]


def _writer(rows: Tensor, pos: Tensor, values: Tensor):
    """A patch function setting activation[rows[i], pos[i]] = values[i] (values: [N, d])."""
    def write(act: Tensor) -> Tensor:  # act: [R, T, d]
        out = act.clone()
        out[rows, pos] = values.to(act.dtype)
        return out
    return write


def _INPUT_SITES(L: int) -> list[tuple[str, int]]:
    """The input of every block (the noise included at block 0), then the last block's output."""
    return [("resid_pre", layer) for layer in range(L)] + [("hidden", L - 1)]


def _chunks(total: int, batch_size: int):
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return [slice(i, min(i + batch_size, total)) for i in range(0, total, batch_size)]


@torch.no_grad()
def prepare_runs(model, input_ids: Tensor, targets: Tensor, site: str, sever_site: str | None,
                 corrupt: Callable[[Tensor], Tensor], batch_size: int) -> _Group:
    """Clean run (records the restored `site`), then the corrupted runs (record `sever_site` and
    the attention keys and values, from which restored runs start at their restored token).

    targets: [n] token ids; -1 means "the model's own top prediction in the clean run".
    corrupt(input_ids [n, T]) -> ε [n, S, T, d_model]: the noise added to the input of block 0,
    drawn after the clean run (tracing: subject_noise).
    """
    device, dtype = get_device(model), embedding_matrix(model).dtype
    prob = probability_dtype(dtype)
    L, (n, T) = n_layers(model), input_ids.shape
    input_ids = input_ids.to(device)
    written = is_plain_gpt2(model)  # GPT-2 written out on its weights (gpt2_written), else the modules
    clean_probs, states, top = [], [[] for _ in range(L)], []
    for sl in _chunks(n, batch_size):
        if written:
            run = gpt2_written.forward_recorded(model, input_ids[sl], record=(site,))
            logits, rec = run["logits"], {(site, layer): state for layer, state in enumerate(run[site])}
        else:
            with Recorder(model, [(site, layer) for layer in range(L)]) as rec:
                logits = model(input_ids=input_ids[sl], use_cache=False, logits_to_keep=1).logits[:, -1]
        probs = torch.softmax(logits.to(prob), dim=-1)  # [chunk, vocab]
        chosen = targets[sl].to(device)
        chosen = torch.where(chosen < 0, probs.argmax(-1), chosen)
        top.append(chosen)
        clean_probs.append(probs.gather(1, chosen[:, None])[:, 0])
        for layer in range(L):
            states[layer].append(rec[(site, layer)])
    targets = torch.cat(top)
    if not bool(torch.isfinite(torch.cat(clean_probs)).all()):
        raise NonFiniteEditError(f"the clean run's probabilities are not finite ({nonfinite_cause(model)}); "
                                 "nothing can be traced")
    clean_states = torch.stack([torch.cat(s) for s in states])  # [L, n, T, d]

    eps = corrupt(input_ids).to(device=device, dtype=dtype)  # [n, S, T, d]
    samples = eps.shape[1]

    row_prompt = torch.arange(n, device=device).repeat_interleave(samples)  # rows (i, j), j fastest
    row_sample = torch.arange(samples, device=device).repeat(n)
    corrupted, frozen, kv, inputs, qkv = [], [[] for _ in range(L)], [], [], []
    mlp_sites = [("mlp_out", layer) for layer in range(L)] if site == "mlp_out" else []
    for sl in _chunks(n * samples, batch_size):
        p, j = row_prompt[sl], row_sample[sl]
        if written:
            record = ("resid_pre", "kv", "qkv") + (("mlp_out",) if mlp_sites else ()) + (() if sever_site is None else (sever_site,))
            run = gpt2_written.forward_recorded(model, input_ids[p], eps[p, j], record)
            corrupted.append(torch.softmax(run["logits"].to(prob), -1).gather(1, targets[p][:, None])[:, 0])
            kv.append(run["kv"])
            qkv.append(run["qkv"])
            inputs.append(run["resid_pre"] + run.get("mlp_out", []))
            for layer in range(L if sever_site is not None else 0):
                frozen[layer].append(run[sever_site][layer])
            continue
        with ExitStack() as stack:
            stack.enter_context(patch(model, "resid_pre", 0, lambda x, e=eps[p, j]: x + e))
            inputs_rec = stack.enter_context(Recorder(model, _INPUT_SITES(L) + mlp_sites))
            if sever_site is not None:
                rec = stack.enter_context(Recorder(model, [(sever_site, layer) for layer in range(L)]))
            out = model(input_ids=input_ids[p], use_cache=True, logits_to_keep=1)
        corrupted.append(torch.softmax(out.logits[:, -1].to(prob), -1).gather(1, targets[p][:, None])[:, 0])
        kv.append([(keys, values) for keys, values, *_ in output_cache(out)])
        inputs.append([inputs_rec[site] for site in _INPUT_SITES(L) + mlp_sites])
        if sever_site is not None:
            for layer in range(L):
                frozen[layer].append(rec[(sever_site, layer)])
    frozen_states = None if sever_site is None else [torch.cat(f).view(n, samples, T, -1) for f in frozen]
    corrupted_kv = [(torch.cat([c[i][0] for c in kv]), torch.cat([c[i][1] for c in kv])) for i in range(len(kv[0]))]
    recorded = [torch.cat([c[i] for c in inputs]) for i in range(len(inputs[0]))]
    corrupted_inputs = torch.stack(recorded[:L + 1])
    corrupted_states = torch.stack(recorded[L + 1:]) if site == "mlp_out" else None
    corrupted_qkv = [torch.cat([c[i] for c in qkv]) for i in range(L)] if written else None
    return _Group(input_ids, targets, eps, torch.cat(clean_probs), torch.cat(corrupted).view(n, samples),
                  clean_states, frozen_states, corrupted_kv, corrupted_inputs, corrupted_states, written, corrupted_qkv)


def _first_blocks(restore: Tensor, site: str, frozen: Tensor | None, fold_attention: bool = False) -> Tensor:
    """[R] the first block each row has to run: the lowest layer it restores or freezes, L when it
    changes nothing; one higher for a hidden state or an MLP output of layer l, which changes only
    the output of block l at its token (the MLP output is added last), i.e. the input of block l + 1.
    fold_attention: one higher for an attention output of layer l too (the caller passes it only
    when no row freezes anything, and computes block l's output at the restored tokens (GPT-2:
    its MLP after the restored attention output; the attention of the other tokens reads block
    l's input, unchanged))."""
    R, L, _ = restore.shape
    first = lambda mask: torch.where(mask.any(1), mask.int().argmax(1), L)  # noqa: E731  [R]
    later = site in ("hidden", "mlp_out") or (site == "attn_out" and fold_attention)
    start = first(restore.any(-1)) + (1 if later else 0)
    if frozen is not None:
        start = torch.minimum(start, first(frozen.any(-1)))
    return start.clamp(max=L)


@torch.no_grad()
def _restored_rows(model, group: _Group, row_prompt: Tensor, row_sample: Tensor, restore: Tensor,
                   site: str, sever_site: str | None = None, frozen: Tensor | None = None,
                   batch_size: int = 512, bar=None, start: int = 0) -> Tensor:
    """P(o) of restored corrupted runs, one per row: [R].

    Row r is prompt row_prompt[r] with noise sample row_sample[r]; restore [R, L, T] marks the
    (layer, position) states of `site` set to their clean values; frozen [R, L, T] marks the
    `sever_site` outputs held at their corrupted values (same prompt and noise sample).

    Only what a restoration can change is run (suffix.run_from_block). Tokens before `start`,
    the first position any row restores or freezes, see nothing restored (attention is
    causal): their keys and values come from the corrupted runs and only tokens start..T-1
    run. Blocks below a row's first restored (or frozen) layer see nothing restored either:
    a row joins the pass at that block s (suffix.run_rows_from_blocks), with the corrupted
    run's input of block s (a restored hidden state of layer s - 1 written into it, or a
    restored MLP output's difference to the corrupted one added, see _first_blocks). Batches
    hold about the same number of (token, block) steps as batch_size full rows.
    """
    device, L = group.input_ids.device, n_layers(model)
    T = group.input_ids.shape[1]
    if restore[:, :, :start].any() or (frozen is not None and frozen[:, :, :start].any()):
        raise ValueError(f"rows restore states before start={start}")
    row_prompt, row_sample = row_prompt.to(device), row_sample.to(device)
    restore = restore[:, :, start:].to(device)
    frozen = None if frozen is None else frozen[:, :, start:].to(device)
    written = group.written  # GPT-2 written out on its weights (checked when the runs were prepared), else the modules
    fold = written and site == "attn_out" and frozen is None  # rows start after their first restored attention
    first_block = _first_blocks(restore, site, frozen, fold_attention=fold)
    order = torch.argsort(first_block, stable=True)  # rows join the pass at their first block
    steps = (T - start) * (L - first_block[order]).clamp(min=1)  # (token, block) steps of each row
    budget = batch_size * T * L  # as many steps as batch_size full rows
    prob = group.clean_prob.dtype  # probability_dtype of the model's
    if written:  # the same for every chunk: the corrupted runs' keys and values of tokens 0..start-1,
        # read by row, and their c_attn outputs at the suffix (a row's first block reads them)
        written_past = None if start == 0 else [(keys[:, :, :start].contiguous(), values[:, :, :start].contiguous())
                                                for keys, values in group.corrupted_kv]
        first_qkv = [x[:, start:].contiguous() for x in group.corrupted_qkv]
    out = torch.zeros(len(row_prompt), device=device, dtype=prob)
    begin = 0
    while begin < len(order):
        end = begin + max(1, int((steps[begin:].cumsum(0) <= budget).sum()))
        chunk = order[begin:end]
        begin = end
        starts = first_block[chunk]
        p, j = row_prompt[chunk], row_sample[chunk]
        cached = p * group.samples + j
        # each row's input of its first block: its corrupted run's, changed at the tokens it restores
        # in the layer below (a hidden state written in; an MLP output's clean - corrupted added;
        # a folded attention output: that block's output there, see _first_blocks)
        hidden = group.corrupted_inputs[starts, cached, start:]                      # [R, T - start, d]
        below = (starts - 1).clamp(min=0)
        changed = restore[chunk, below] & (starts > 0)[:, None]                      # [R, T - start]
        rows, pos = changed.nonzero(as_tuple=True)
        if len(rows) and site == "hidden":
            hidden[rows, pos] = group.clean_states[below[rows], p[rows], start + pos].to(hidden.dtype)
        elif len(rows) and site == "mlp_out":
            hidden[rows, pos] += (group.clean_states[below[rows], p[rows], start + pos]
                                  - group.corrupted_states[below[rows], cached[rows], start + pos]).to(hidden.dtype)
        elif len(rows) and fold:
            mid = (group.corrupted_inputs[below[rows], cached[rows], start + pos]
                   + group.clean_states[below[rows], p[rows], start + pos].to(hidden.dtype))
            for layer in below[rows].unique().tolist():
                at = below[rows] == layer
                hidden[rows[at], pos[at]] = gpt2_written.block_after_attention(model.transformer.h[layer], mid[at])
        past = None
        if written:
            past = written_past
        elif start > 0:  # the corrupted runs' keys and values of tokens 0..start-1, one copy per row
            first = int(starts[0])
            past = [None if layer < first else (keys[cached, :, :start], values[cached, :, :start])
                    for layer, (keys, values) in enumerate(group.corrupted_kv)]
        writes = {}  # (site, layer) -> (rows, pos, values) for the rows in the pass at that block
        for layer in range(int(starts[0]), L):
            present = starts <= layer  # the rows in the pass at this block (a prefix of the chunk)
            rows, pos = (restore[chunk, layer] & present[:, None]).nonzero(as_tuple=True)
            if len(rows):
                writes[(site, layer)] = (rows, pos, group.clean_states[layer][p[rows], start + pos])
            if frozen is not None:
                rows, pos = (frozen[chunk, layer] & present[:, None]).nonzero(as_tuple=True)
                if len(rows):
                    writes[(sever_site, layer)] = (rows, pos, group.frozen_states[layer][p[rows], j[rows], start + pos])
        if written:
            # a row's queries, keys and values in its first block are its corrupted run's except at
            # the tokens whose input the restoration changed (`changed`)
            logits = gpt2_written.rows_from_blocks(model, starts, hidden, writes, source=cached, past=past,
                                                   first_qkv=first_qkv, changed=changed)
        else:
            with ExitStack() as stack:
                for (at, layer), (rows, pos, values) in writes.items():
                    stack.enter_context(patch(model, at, layer, _writer(rows, pos, values)))
                logits = run_rows_from_blocks(model, starts, hidden, past, start, last_only=True)
        out[chunk] = torch.softmax(logits.to(prob), -1).gather(1, group.targets[p][:, None])[:, 0]
        if bar is not None:
            bar.update(len(chunk))
    return out

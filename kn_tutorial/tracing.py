"""Causal tracing: where in the network is a fact recalled? (Meng et al., 2022, "Locating and
Editing Factual Associations in GPT", section 2.)

Notation of the book. A prompt x_1 .. x_T whose subject s covers the tokens [a, b), and the
answer o (its first token, with the leading space: " Asia"). Three runs of the model:

    clean       P(o)                        records every state: h_t^l (block output, "hidden"),
                                            m_t^l (MLP output, "mlp"), a_t^l (attention output, "attn")
    corrupted   P_*(o)                      x_t + ε_t at the subject tokens t in [a, b),
                                            ε_t ~ N(0, ν² I), ν = noise · σ (σ: std of the token embeddings)
    restored    P_{*, clean h_t^l}(o)       the corrupted run with one state set to its clean value

    indirect effect   IE(h_t^l) = P_{*, clean h_t^l}(o) − P_*(o)
    total effect      TE        = P(o) − P_*(o)
    normalised IE               = IE / TE            (1: restoring this state alone brings the fact back)

Averaged over noise samples (and over facts) these are the paper's AIE and ATE. For the
MLP and attention a *window* of w layers centred on l is restored together, layers
l − ⌊w/2⌋ .. l − ⌊w/2⌋ + w − 1 clipped to the model (the paper: w = 10 of GPT-2 XL's 48 layers).
*Severing* (the paper's figure on the MLP's role) restores h_t^l while the MLP (or attention)
outputs at token t of every later layer stay frozen at their corrupted values.

How it runs. The noise is added to the input of block 0 ("resid_pre"): for GPT-2 that is
token + position embedding, and adding ε there is adding it to the token embedding. All
restorations of a prompt, for every (token, layer, noise sample), are rows of one batch;
hooks write the clean states into the chosen (row, position) pairs with index tensors, and
rows are chunked by `batch_size` to bound memory. Prompts of the same token length share
batches (no padding), and only the last position's logits are computed. Attention is causal,
so a restoration at token t cannot change tokens before t: a row restoring token t starts
at t, reading the keys and values of tokens 0..t-1 from the corrupted run (a KV cache).
Nor can it change anything below its layer: a row restoring layer l runs only blocks from
l (from l + 1 for a hidden state, which is the input of block l + 1, and for an MLP output,
which block l adds last to its output), starting from the corrupted run's input of that
block; the rows of a token join one pass, each at its own block (suffix.run_rows_from_blocks).
Restoring a state before the subject changes nothing at all (the
noise has not reached it), nor does restoring a last-layer state of any token but the last
(no later layer reads it): those cells are the corrupted probability without a pass. The
noise of a prompt depends only on the seed and the prompt's tokens: a prompt gets the same
noise alone or in a batch.

    t = trace(model, tokenizer, "Kuwait lies on the continent of", "Kuwait")   # hidden
    t.scores        # [T, L] P_{*, clean h_t^l}(o), mean over samples
    t.effects       # [T, L] IE
    summary = average_effects(model, tokenizer, facts)   # AIE by token role and layer
"""
from __future__ import annotations

import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from .hooks import Recorder, patch
from .kv_cache import output_cache
from .models import embedding_matrix, get_device, n_layers
from .progress import progress_bar
from .scoring import target_ids
from .suffix import run_rows_from_blocks
from .tokens import subject_span
from .validate import NonFiniteEditError, check_context, nonfinite_cause, require_finite

KINDS = ("hidden", "mlp", "attn")
SITE_OF_KIND = {"hidden": "hidden", "mlp": "mlp_out", "attn": "attn_out"}  # hooks.py site names
ROLES = ("first subject token", "middle subject tokens", "last subject token",
         "first subsequent token", "further tokens", "last token")
CMAP_OF_KIND = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}  # the paper's colours


# --------------------------------------------------------------------------------------
# Small pieces: checks, noise, windows, token roles
# --------------------------------------------------------------------------------------

def _check_kind(kind: str, sever: str | None = None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {KINDS}")
    if sever is not None:
        if sever not in ("mlp", "attn"):
            raise ValueError(f"sever must be None, 'mlp' or 'attn', got {sever!r}")
        if kind != "hidden":
            raise ValueError("severing freezes MLP/attention outputs while restoring a hidden state: "
                             f"use kind='hidden' with sever={sever!r} (got kind={kind!r})")


def noise_level(model, noise: float = 3.0) -> float:
    """ν = noise · σ, with σ the standard deviation of all entries of the token embedding matrix.

    Rows (tokens) with a NaN or infinite entry are left out of σ, so one broken row cannot turn
    the noise scale into NaN; a prompt that uses such a token is refused by the trace itself
    (`_check_embeddings`). With every row finite this is the std of the whole matrix."""
    require_finite("noise", noise, "It is a multiple of the embeddings' std (the paper: 3).")
    embeddings = embedding_matrix(model).detach().float()
    finite_rows = torch.isfinite(embeddings).all(dim=1)
    if not bool(finite_rows.all()):
        if not bool(finite_rows.any()):
            raise NonFiniteEditError("every row of the token embedding matrix has a non-finite entry: "
                                     "no noise scale can be measured")
        embeddings = embeddings[finite_rows]
    return noise * embeddings.std().item()


def _check_embeddings(model, input_ids: Tensor) -> None:
    """Refuse prompts whose tokens have a non-finite embedding row (their trace would be NaN)."""
    embeddings = embedding_matrix(model).detach()
    ids = input_ids.unique().cpu()
    bad = ids[~torch.isfinite(embeddings[ids.to(embeddings.device)]).all(dim=1).cpu()]
    if len(bad):
        raise NonFiniteEditError(f"the token embedding row(s) {bad.tolist()} used by the prompt are not finite; "
                                 "the model is broken there (reload it)")


def _noise_seed(seed: int, ids: Tensor) -> int:
    """A seed from `seed` and the prompt's tokens only (not its place in a batch)."""
    return (seed * 1_000_003 + zlib.crc32(ids.detach().cpu().to(torch.int64).numpy().tobytes())) % 2**62


def subject_noise(input_ids: Tensor, span: tuple[int, int], d_model: int, samples: int,
                  scale: float, seed: int = 0) -> Tensor:
    """ε for one prompt: [samples, T, d_model], N(0, scale²) on the subject tokens, 0 elsewhere.

    Drawn on the CPU from a torch.Generator seeded by (seed, the prompt's tokens), so the same
    prompt gets the same noise on every device and in every batch.
    """
    ids = torch.as_tensor(input_ids).reshape(-1)
    start, end = span
    if not 0 <= start < end <= len(ids):
        raise ValueError(f"subject span {span} is not inside a prompt of {len(ids)} tokens")
    gen = torch.Generator().manual_seed(_noise_seed(seed, ids))
    noise = torch.zeros(samples, len(ids), d_model)
    noise[:, start:end] = scale * torch.randn(samples, end - start, d_model, generator=gen)
    return noise


def window_layers(layer: int, window: int, n: int) -> range:
    """Layers restored together for a window of `window` layers centred on `layer`, clipped to [0, n)."""
    if window < 1:
        raise ValueError(f"window must be at least 1, got {window}")
    low = layer - window // 2
    return range(max(0, low), min(n, low + window))


def token_roles(span: tuple[int, int], seq_len: int) -> list[list[int]]:
    """For each role in ROLES, the token positions it covers (the paper's six groups).

    A one-token subject is both the first and the last subject token (and has no middle);
    the last token of the prompt is always "last token", and also "first subsequent token"
    when the subject ends just before it. Empty lists mean the role does not occur.
    """
    a, b = span
    if not 0 <= a < b <= seq_len:
        raise ValueError(f"subject span {span} is not inside a prompt of {seq_len} tokens")
    return [[a], list(range(a + 1, b - 1)), [b - 1],
            [b] if b < seq_len else [], list(range(b + 1, seq_len - 1)), [seq_len - 1]]


# --------------------------------------------------------------------------------------
# The engine: many restored runs of a group of same-length prompts, batched
# --------------------------------------------------------------------------------------

@dataclass
class _Group:
    """Clean and corrupted runs of n prompts of T tokens (everything the restored rows need)."""
    input_ids: Tensor            # [n, T]
    targets: Tensor              # [n] token id of o
    noise: Tensor                # [n, S, T, d_model] on the model's device and dtype
    clean_prob: Tensor           # [n]
    corrupted_prob: Tensor       # [n, S]
    clean_states: list[Tensor]   # L x [n, T, d_model], the restored site
    frozen_states: list[Tensor] | None  # L x [n, S, T, d_model] corrupted sever site, or None
    corrupted_kv: list[tuple[Tensor, Tensor]]  # per layer (keys, values) of the corrupted runs, rows (i, j)
    corrupted_inputs: list[Tensor]  # L+1 x [n*S, T, d_model]: input of block l (l = L: of the final norm)
    corrupted_states: list[Tensor] | None  # kind "mlp": L x [n*S, T, d_model] corrupted MLP outputs, else None

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
def _prepare(model, input_ids: Tensor, spans: list[tuple[int, int]], targets: Tensor, kind: str,
             sever: str | None, samples: int, noise: float, seed: int, batch_size: int) -> _Group:
    """Clean run (records the restored site), then the corrupted runs (record the severed site and
    the attention keys and values, from which restored runs start at their restored token).

    targets: [n] token ids; -1 means "the model's own top prediction in the clean run".
    """
    device, dtype = get_device(model), embedding_matrix(model).dtype
    L, (n, T) = n_layers(model), input_ids.shape
    check_context(model, T, "the traced prompt")
    _check_embeddings(model, input_ids)
    input_ids = input_ids.to(device)
    site = SITE_OF_KIND[kind]
    clean_probs, states, top = [], [[] for _ in range(L)], []
    for sl in _chunks(n, batch_size):
        with Recorder(model, [(site, layer) for layer in range(L)]) as rec:
            logits = model(input_ids=input_ids[sl], use_cache=False, logits_to_keep=1).logits[:, -1]
        probs = torch.softmax(logits.float(), dim=-1)  # [chunk, vocab]
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
    clean_states = [torch.cat(s) for s in states]  # L x [n, T, d]

    scale = noise_level(model, noise)
    eps = torch.stack([subject_noise(input_ids[i], spans[i], embedding_matrix(model).shape[1],
                                     samples, scale, seed) for i in range(n)])
    eps = eps.to(device=device, dtype=dtype)  # [n, S, T, d]

    row_prompt = torch.arange(n, device=device).repeat_interleave(samples)  # rows (i, j), j fastest
    row_sample = torch.arange(samples, device=device).repeat(n)
    sever_site = None if sever is None else SITE_OF_KIND[sever]
    corrupted, frozen, kv, inputs = [], [[] for _ in range(L)], [], []
    mlp_sites = [("mlp_out", layer) for layer in range(L)] if kind == "mlp" else []
    for sl in _chunks(n * samples, batch_size):
        p, j = row_prompt[sl], row_sample[sl]
        with ExitStack() as stack:
            stack.enter_context(patch(model, "resid_pre", 0, lambda x, e=eps[p, j]: x + e))
            inputs_rec = stack.enter_context(Recorder(model, _INPUT_SITES(L) + mlp_sites))
            if sever_site is not None:
                rec = stack.enter_context(Recorder(model, [(sever_site, layer) for layer in range(L)]))
            out = model(input_ids=input_ids[p], use_cache=True, logits_to_keep=1)
        corrupted.append(torch.softmax(out.logits[:, -1].float(), -1).gather(1, targets[p][:, None])[:, 0])
        kv.append([(keys, values) for keys, values, *_ in output_cache(out)])
        inputs.append([inputs_rec[site] for site in _INPUT_SITES(L) + mlp_sites])
        if sever_site is not None:
            for layer in range(L):
                frozen[layer].append(rec[(sever_site, layer)])
    frozen_states = None if sever_site is None else [torch.cat(f).view(n, samples, T, -1) for f in frozen]
    corrupted_kv = [(torch.cat([c[i][0] for c in kv]), torch.cat([c[i][1] for c in kv])) for i in range(len(kv[0]))]
    recorded = [torch.cat([c[i] for c in inputs]) for i in range(len(inputs[0]))]
    corrupted_inputs, corrupted_states = recorded[:L + 1], (recorded[L + 1:] if kind == "mlp" else None)
    return _Group(input_ids, targets, eps, torch.cat(clean_probs), torch.cat(corrupted).view(n, samples),
                  clean_states, frozen_states, corrupted_kv, corrupted_inputs, corrupted_states)


def _first_blocks(restore: Tensor, kind: str, frozen: Tensor | None) -> Tensor:
    """[R] the first block each row has to run: the lowest layer it restores or freezes, L when it
    changes nothing; one higher for a hidden state or an MLP output of layer l, which changes only
    the output of block l at its token (the MLP output is added last), i.e. the input of block l + 1."""
    R, L, _ = restore.shape
    first = lambda mask: torch.where(mask.any(1), mask.int().argmax(1), L)  # noqa: E731  [R]
    start = first(restore.any(-1)) + (1 if kind in ("hidden", "mlp") else 0)
    if frozen is not None:
        start = torch.minimum(start, first(frozen.any(-1)))
    return start.clamp(max=L)


@torch.no_grad()
def _restored_rows(model, group: _Group, row_prompt: Tensor, row_sample: Tensor, restore: Tensor,
                   kind: str, sever: str | None = None, frozen: Tensor | None = None,
                   batch_size: int = 512, bar=None, start: int = 0) -> Tensor:
    """P(o) of restored corrupted runs, one per row: [R].

    Row r is prompt row_prompt[r] with noise sample row_sample[r]; restore [R, L, T] marks the
    (layer, position) states of `kind` set to their clean values; frozen [R, L, T] marks the
    `sever` outputs held at their corrupted values (same prompt and noise sample).

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
    first_block = _first_blocks(restore, kind, frozen)
    order = torch.argsort(first_block, stable=True)  # rows join the pass at their first block
    steps = (T - start) * (L - first_block[order]).clamp(min=1)  # (token, block) steps of each row
    budget = batch_size * T * L  # as many steps as batch_size full rows
    out = torch.zeros(len(row_prompt), device=device)
    begin = 0
    while begin < len(order):
        end = begin + max(1, int((steps[begin:].cumsum(0) <= budget).sum()))
        chunk = order[begin:end]
        begin = end
        starts = first_block[chunk]
        p, j = row_prompt[chunk], row_sample[chunk]
        cached = p * group.samples + j
        hidden = torch.empty(len(chunk), T - start, group.corrupted_inputs[0].shape[-1],
                             dtype=group.corrupted_inputs[0].dtype, device=device)
        for s in starts.unique().tolist():
            at_s = (starts == s).nonzero()[:, 0]
            hidden[at_s] = group.corrupted_inputs[s][cached[at_s], start:]
            if kind == "hidden" and s > 0:  # restored hidden states of layer s - 1 are the input of block s
                rows, pos = restore[chunk[at_s], s - 1].nonzero(as_tuple=True)
                hidden[at_s[rows], pos] = group.clean_states[s - 1][p[at_s[rows]], start + pos].to(hidden.dtype)
            if kind == "mlp" and s > 0:  # a restored MLP output of layer s - 1 moves block s's input by clean - corrupted
                rows, pos = restore[chunk[at_s], s - 1].nonzero(as_tuple=True)
                shift = (group.clean_states[s - 1][p[at_s[rows]], start + pos]
                         - group.corrupted_states[s - 1][cached[at_s[rows]], start + pos])
                hidden[at_s[rows], pos] += shift.to(hidden.dtype)
        past = None
        if start > 0:  # the corrupted runs' keys and values of tokens 0..start-1
            first = int(starts[0])
            past = [None if layer < first else (keys[cached, :, :start], values[cached, :, :start])
                    for layer, (keys, values) in enumerate(group.corrupted_kv)]
        with ExitStack() as stack:
            for layer in range(int(starts[0]), L):
                present = starts <= layer  # the rows in the pass at this block (a prefix of the chunk)
                rows, pos = (restore[chunk, layer] & present[:, None]).nonzero(as_tuple=True)
                if len(rows):
                    values = group.clean_states[layer][p[rows], start + pos]  # [N, d]
                    stack.enter_context(patch(model, SITE_OF_KIND[kind], layer, _writer(rows, pos, values)))
                if frozen is not None:
                    rows, pos = (frozen[chunk, layer] & present[:, None]).nonzero(as_tuple=True)
                    if len(rows):
                        values = group.frozen_states[layer][p[rows], j[rows], start + pos]
                        stack.enter_context(patch(model, SITE_OF_KIND[sever], layer, _writer(rows, pos, values)))
            logits = run_rows_from_blocks(model, starts, hidden, past, start, last_only=True)
        out[chunk] = torch.softmax(logits.float(), -1).gather(1, group.targets[p][:, None])[:, 0]
        if bar is not None:
            bar.update(len(chunk))
    return out


def restore_states(model, input_ids: Tensor, span: tuple[int, int], restore: Tensor, target: int | None = None,
                   kind: str = "hidden", sever: str | None = None, frozen: Tensor | None = None,
                   samples: int = 10, noise: float = 3.0, seed: int = 0, batch_size: int = 512) -> dict:
    """P(o) of the corrupted run of one prompt with any set of states restored, per noise sample.

    input_ids [T]; restore [M, L, T] (or [L, T]) bool: True at (layer, position) restores that
    state of `kind` to its clean value, one run per mask m and noise sample; frozen (same shape,
    with sever="mlp"/"attn") holds those outputs at their corrupted values. target: token id of
    o (None: the model's top prediction). Returns {"probs": [M, S], "clean": float,
    "corrupted": [S], "target": int}. Restoring no state gives P_*(o); restoring every hidden
    state at any one layer gives back P(o).
    """
    _check_kind(kind, sever)
    if (sever is None) != (frozen is None):
        raise ValueError("give both sever= and frozen= (which outputs to freeze), or neither")
    input_ids = torch.as_tensor(input_ids).reshape(1, -1)
    L, T = n_layers(model), input_ids.shape[1]
    restore = torch.as_tensor(restore, dtype=torch.bool)
    restore = restore[None] if restore.dim() == 2 else restore
    if restore.shape[1:] != (L, T):
        raise ValueError(f"restore must be [M, {L}, {T}] (masks, layers, positions), got {tuple(restore.shape)}")
    M = restore.shape[0]
    group = _prepare(model, input_ids, [tuple(span)], torch.tensor([-1 if target is None else int(target)]),
                     kind, sever, samples, noise, seed, batch_size)
    row_mask = torch.arange(M).repeat_interleave(samples)       # rows (mask, sample), sample fastest
    row_sample = torch.arange(samples).repeat(M)
    if frozen is not None:
        frozen = torch.as_tensor(frozen, dtype=torch.bool)
        frozen = (frozen[None] if frozen.dim() == 2 else frozen).expand(M, L, T)[row_mask]
    probs = _restored_rows(model, group, torch.zeros_like(row_mask), row_sample, restore[row_mask], kind,
                           sever, frozen, batch_size)
    return {"probs": probs.float().cpu().view(M, samples), "clean": float(group.clean_prob[0]),
            "corrupted": group.corrupted_prob[0].float().cpu(), "target": int(group.targets[0])}


# --------------------------------------------------------------------------------------
# The grid of a batch of prompts
# --------------------------------------------------------------------------------------

@dataclass
class Grid:
    """Restored probabilities of n prompts of T tokens in a model of L layers."""
    by_sample: Tensor            # [n, T, L, S] P_{*, clean state (t, l)}(o) per noise sample (NaN: not run)
    clean: Tensor                # [n] P(o)
    corrupted_by_sample: Tensor  # [n, S] P_*(o)
    targets: Tensor              # [n] token id of o

    @property
    def scores(self) -> Tensor:  # [n, T, L] mean over noise samples
        return self.by_sample.mean(-1)

    @property
    def corrupted(self) -> Tensor:  # [n]
        return self.corrupted_by_sample.mean(-1)

    @property
    def effects(self) -> Tensor:  # [n, T, L] indirect effects IE = P_restored - P_*
        return self.scores - self.corrupted[:, None, None]


def _grid_rows(spans, positions, T: int, L: int, samples: int):
    """Rows (prompt, position, layer, sample), sample fastest, for every position to restore."""
    prompt, pos = [], []
    for i, (a, _) in enumerate(spans):
        ts = list(range(a, T)) if positions is None else [int(t) % T for t in positions[i]]
        prompt += [i] * len(ts)
        pos += ts
    prompt, pos = torch.tensor(prompt, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
    per_cell = L * samples
    row_prompt = prompt.repeat_interleave(per_cell)
    row_pos = pos.repeat_interleave(per_cell)
    row_layer = torch.arange(L).repeat_interleave(samples).repeat(len(pos))
    row_sample = torch.arange(samples).repeat(len(pos) * L)
    return row_prompt, row_pos, row_layer, row_sample


def trace_batch(model, input_ids: Tensor, spans: list[tuple[int, int]], targets: Tensor | list | None = None,
                kind: str = "hidden", samples: int = 10, noise: float = 3.0, window: int = 1,
                sever: str | None = None, positions: list[list[int]] | None = None, seed: int = 0,
                batch_size: int = 512, show_progress: bool = False) -> Grid:
    """The causal-tracing grid of n prompts of the same length T, all restorations batched.

    input_ids [n, T] (no padding); spans: the subject's [a, b) per prompt; targets [n] token ids
    of o (None or -1: the model's top prediction in the clean run). kind: which state is
    restored ("hidden", "mlp", "attn"); window: layers restored together for "mlp"/"attn"
    (ignored for "hidden", whose state carries everything later layers see); sever ("mlp" or
    "attn", kind="hidden" only): freeze that output at token t in layers after l at its
    corrupted value. positions: per prompt the positions to restore (default: every position
    from the subject on; earlier positions are not affected by the noise, so their cells are
    P_* exactly, as are last-layer states of tokens before the last, which no later layer
    reads). Cells not run are NaN.
    """
    _check_kind(kind, sever)
    input_ids = torch.as_tensor(input_ids)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [n, T] (prompts of one length), got shape {tuple(input_ids.shape)}")
    n, T = input_ids.shape
    L = n_layers(model)
    if len(spans) != n:
        raise ValueError(f"{n} prompts but {len(spans)} subject spans")
    targets = torch.full((n,), -1) if targets is None else torch.as_tensor(
        [-1 if t is None else int(t) for t in targets], dtype=torch.long)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    group = _prepare(model, input_ids, spans, targets, kind, sever, samples, noise, seed, batch_size)

    row_prompt, row_pos, row_layer, row_sample = _grid_rows(spans, positions, T, L, samples)
    onehot = torch.nn.functional.one_hot(row_pos, T).bool()[:, None, :]        # [R, 1, T]
    if kind == "hidden":
        windows = torch.eye(L, dtype=torch.bool)
    else:
        windows = torch.zeros(L, L, dtype=torch.bool)                          # [l, layers restored]
        for layer in range(L):
            windows[layer, list(window_layers(layer, window, L))] = True
    restore = windows[row_layer][:, :, None] & onehot                          # [R, L, T]
    frozen = None
    if sever is not None:
        later = torch.arange(L)[None, :] > row_layer[:, None]                  # [R, L]
        frozen = later[:, :, None] & onehot

    # A state of the last layer reaches the answer only at the last token: elsewhere P_* exactly.
    inert = (row_pos < T - 1) & ~windows[row_layer, :L - 1].any(-1)            # [R]
    probs = group.corrupted_prob.float().cpu()[row_prompt, row_sample]         # filled where inert
    with progress_bar(total=int((~inert).sum()), desc=f"tracing {kind}", disable=not show_progress) as bar:
        for t in row_pos[~inert].unique().tolist():  # rows restoring token t start their run at t
            rows = ((row_pos == t) & ~inert).nonzero()[:, 0]
            probs[rows] = _restored_rows(model, group, row_prompt[rows], row_sample[rows], restore[rows], kind,
                                         sever, None if frozen is None else frozen[rows], batch_size, bar,
                                         start=t).float().cpu()

    corrupted = group.corrupted_prob.float().cpu()                             # [n, S]
    by_sample = torch.full((n, T, L, samples), float("nan"))
    for i, (a, _) in enumerate(spans):
        by_sample[i, :a] = corrupted[i]                                        # untouched by the noise
    by_sample[row_prompt, row_pos, row_layer, row_sample] = probs
    return Grid(by_sample, group.clean_prob.float().cpu(), corrupted, group.targets.cpu())


# --------------------------------------------------------------------------------------
# One prompt
# --------------------------------------------------------------------------------------

@dataclass
class Trace:
    """Causal trace of one prompt for one kind of state (see the module docstring)."""
    prompt: str
    subject: str
    target: str                  # o as decoded (the first token of a given target)
    target_id: int
    tokens: list[str]            # the prompt's tokens, decoded one by one
    span: tuple[int, int]        # the subject's token positions [a, b)
    kind: str
    scores: Tensor               # [T, L] P_{*, clean state (t, l)}(o), mean over samples
    clean_prob: float            # P(o)
    corrupted_prob: float        # P_*(o), mean over samples
    samples: int
    noise: float
    window: int
    sever: str | None = None
    by_sample: Tensor | None = field(default=None, repr=False)  # [T, L, S]

    @property
    def effects(self) -> Tensor:  # [T, L] IE
        return self.scores - self.corrupted_prob

    @property
    def normalised(self) -> Tensor:  # [T, L] IE / TE
        return self.effects / (self.clean_prob - self.corrupted_prob)


def _encode(tokenizer, prompt: str, subject: str, occurrence: int | None) -> tuple[list[int], tuple[int, int]]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("the prompt is empty")
    return ids, subject_span(tokenizer, prompt, subject, occurrence)


def _target_id(tokenizer, target: str | None) -> int:
    """First token of the target with its leading space (-1 for None: the model's top prediction)."""
    return -1 if target is None else target_ids(tokenizer, target)[0]


def trace(model, tokenizer, prompt: str, subject: str, target: str | None = None, kind: str = "hidden",
          samples: int = 10, noise: float = 3.0, window: int = 1, sever: str | None = None,
          occurrence: int | None = None, seed: int = 0, batch_size: int = 512) -> Trace:
    """Causal trace of `prompt`: restore each (token, layer) state of `kind` in the corrupted run.

    target: None traces the model's own top prediction; a string is scored by its FIRST token,
    with a leading space added when missing (" Asia"), as everywhere in the book. The subject
    is located by character offsets (tokens.subject_span): a subject that is absent, or present
    twice without `occurrence` (0 first, -1 last), is an error. noise: multiples of the std of
    the token embeddings; samples: noise draws (seeded by `seed` and the prompt). window: MLP or
    attention layers restored together, centred on l (the paper: 10 of 48 in GPT-2 XL).
    sever: "mlp"/"attn" with kind="hidden" freezes that output at t in later layers.
    """
    ids, span = _encode(tokenizer, prompt, subject, occurrence)
    grid = trace_batch(model, torch.tensor([ids]), [span], [_target_id(tokenizer, target)], kind=kind,
                       samples=samples, noise=noise, window=window, sever=sever, seed=seed,
                       batch_size=batch_size)
    target_id = int(grid.targets[0])
    return Trace(prompt=prompt, subject=subject, target=tokenizer.decode([target_id]), target_id=target_id,
                 tokens=[tokenizer.decode([i]) for i in ids], span=span, kind=kind,
                 scores=grid.scores[0], clean_prob=float(grid.clean[0]),
                 corrupted_prob=float(grid.corrupted[0]), samples=samples, noise=noise,
                 window=1 if kind == "hidden" else window, sever=sever, by_sample=grid.by_sample[0])


@torch.no_grad()
def trace_naive(model, tokenizer, prompt: str, subject: str, target: str | None = None, kind: str = "hidden",
                samples: int = 10, noise: float = 3.0, window: int = 1, sever: str | None = None,
                occurrence: int | None = None, seed: int = 0) -> Tensor:
    """The definition run literally: [T, L, S] P_{*, clean state (t, l)}(o) for every token t, layer l
    and noise sample j, each from its own full forward pass of the corrupted prompt (noise ε_j on
    the subject) with the state(s) of (t, l) set to their clean values and, with `sever`, that
    output at t in every later layer held at its corrupted value. No cache, no batching, no cell
    skipped: the oracle `trace` is tested against, and the benchmark's baseline."""
    _check_kind(kind, sever)
    ids, span = _encode(tokenizer, prompt, subject, occurrence)
    device, L, T = get_device(model), n_layers(model), len(ids)
    input_ids = torch.tensor([ids], device=device)
    site = SITE_OF_KIND[kind]
    with Recorder(model, [(site, layer) for layer in range(L)]) as rec:
        probs = torch.softmax(model(input_ids=input_ids).logits[0, -1].float(), -1)
    target_id = _target_id(tokenizer, target)
    target_id = int(probs.argmax()) if target_id < 0 else target_id
    eps = subject_noise(input_ids[0], span, embedding_matrix(model).shape[1], samples, noise_level(model, noise), seed)
    eps = eps.to(device=device, dtype=embedding_matrix(model).dtype)

    def set_at(t: int, value: Tensor):
        def write(act: Tensor) -> Tensor:
            act = act.clone()
            act[:, t] = value
            return act
        return write

    out = torch.zeros(T, L, samples)
    for j in range(samples):
        with patch(model, "resid_pre", 0, lambda x, e=eps[j]: x + e):
            frozen = {}
            if sever is not None:
                with Recorder(model, [(SITE_OF_KIND[sever], layer) for layer in range(L)]) as frozen_rec:
                    model(input_ids=input_ids)
                frozen = frozen_rec.activations
            for t in range(T):
                for layer in range(L):
                    restored = [layer] if kind == "hidden" else list(window_layers(layer, window, L))
                    with ExitStack() as stack:
                        for k in restored:
                            stack.enter_context(patch(model, site, k, set_at(t, rec[(site, k)][0, t])))
                        for k in range(layer + 1, L) if sever is not None else ():
                            stack.enter_context(patch(model, SITE_OF_KIND[sever], k,
                                                      set_at(t, frozen[(SITE_OF_KIND[sever], k)][0, t])))
                        logits = model(input_ids=input_ids, use_cache=False).logits[0, -1]
                    out[t, layer, j] = torch.softmax(logits.float(), -1)[target_id].item()
    return out


# --------------------------------------------------------------------------------------
# Many facts: average indirect effects by token role
# --------------------------------------------------------------------------------------

def _as_fact(fact) -> tuple[str, str, str | None]:
    if isinstance(fact, dict):
        return fact["prompt"], fact["subject"], fact.get("target")
    prompt, subject, *rest = fact
    return prompt, subject, (rest[0] if rest else None)


def _length_groups(model, tokenizer, facts, max_rows: int, rows_per_prompt):
    """Encode facts and split them into passes of same-length prompts of at most ~max_rows rows."""
    by_length: dict[int, list] = {}
    for k, fact in enumerate(facts):
        prompt, subject, target = _as_fact(fact)
        ids, span = _encode(tokenizer, prompt, subject, None)
        by_length.setdefault(len(ids), []).append((k, ids, span, _target_id(tokenizer, target)))
    passes = []
    for T, items in sorted(by_length.items()):
        per_pass = max(1, max_rows // max(1, rows_per_prompt(T)))
        passes += [items[i:i + per_pass] for i in range(0, len(items), per_pass)]
    return passes


def average_effects(model, tokenizer, facts, kinds=KINDS, samples: int = 10, noise: float = 3.0,
                    window: int = 1, seed: int = 0, batch_size: int = 512,
                    show_progress: bool = False) -> dict:
    """Average indirect effect (AIE) by token role and layer over many facts, for each kind.

    facts: (prompt, subject, target) tuples or dicts with those keys (target None: the model's
    top prediction). Each prompt's IE grid is averaged over the positions of each role first
    (ROLES, see token_roles), then over the facts that have that role. Returns a dict with
    "effects" {kind: [6, L] AIE}, "normalised" {kind: AIE / ATE}, "counts" [6] (facts per
    role), "clean", "corrupted", "ate" (means of P, P_* and TE = P − P_*), "n_facts", the
    settings, and "roles".
    """
    L = n_layers(model)
    facts = list(facts)
    if not facts:
        raise ValueError("average_effects needs at least one fact")
    passes = _length_groups(model, tokenizer, facts, 4 * batch_size, lambda T: T * L * samples)
    sums = {kind: np.zeros((len(ROLES), L)) for kind in kinds}
    counts = np.zeros(len(ROLES), dtype=int)
    clean = np.zeros(len(facts))
    corrupted = np.zeros(len(facts))
    with progress_bar(total=len(facts) * len(kinds), desc="tracing facts x kinds", disable=not show_progress) as bar:
        for items in passes:
            input_ids = torch.tensor([ids for _, ids, _, _ in items])
            spans = [span for _, _, span, _ in items]
            targets = [t for _, _, _, t in items]
            for kind in kinds:
                grid = trace_batch(model, input_ids, spans, targets, kind=kind, samples=samples, noise=noise,
                                   window=window, seed=seed, batch_size=batch_size)
                effects = grid.effects.numpy()  # [n, T, L]
                for i, span in enumerate(spans):
                    for r, positions in enumerate(token_roles(span, input_ids.shape[1])):
                        if positions:
                            sums[kind][r] += effects[i, positions].mean(0)
                bar.update(len(items))
            for i, (k, _, span, _) in enumerate(items):
                clean[k], corrupted[k] = grid.clean[i], grid.corrupted[i]
                counts += [bool(p) for p in token_roles(span, input_ids.shape[1])]
    effects = {kind: sums[kind] / np.maximum(counts, 1)[:, None] for kind in kinds}
    ate = float((clean - corrupted).mean())
    return {"effects": effects, "normalised": {k: v / ate for k, v in effects.items()},
            "counts": counts, "clean": float(clean.mean()), "corrupted": float(corrupted.mean()),
            "ate": ate, "n_facts": len(facts), "n_layers": L, "samples": samples, "noise": noise,
            "window": window, "seed": seed, "roles": ROLES}


def severed_effects(model, tokenizer, facts, samples: int = 10, noise: float = 3.0, seed: int = 0,
                    batch_size: int = 512, show_progress: bool = False) -> dict:
    """AIE of restoring the hidden state at the last subject token, by layer, with later MLP or
    attention outputs at that token frozen at their corrupted values (the paper's severed paths).

    Returns {"none": [L], "mlp": [L], "attn": [L], "n_facts": n}: if the "mlp" curve drops
    below "none" at early layers, the MLPs after those layers carry the fact forward.
    """
    L = n_layers(model)
    facts = list(facts)
    passes = _length_groups(model, tokenizer, facts, 4 * batch_size, lambda T: L * samples)
    out = {name: np.zeros(L) for name in ("none", "mlp", "attn")}
    with progress_bar(total=3 * len(facts), desc="severed tracing", disable=not show_progress) as bar:
        for items in passes:
            input_ids = torch.tensor([ids for _, ids, _, _ in items])
            spans = [span for _, _, span, _ in items]
            targets = [t for _, _, _, t in items]
            last = [[span[1] - 1] for span in spans]
            for name in out:
                grid = trace_batch(model, input_ids, spans, targets, kind="hidden", samples=samples, noise=noise,
                                   sever=None if name == "none" else name, positions=last, seed=seed,
                                   batch_size=batch_size)
                effects = grid.effects.numpy()
                out[name] += sum(effects[i, pos[0]] for i, pos in enumerate(last))
                bar.update(len(items))
    return {**{k: v / len(facts) for k, v in out.items()}, "n_facts": len(facts), "n_layers": L}


# --------------------------------------------------------------------------------------
# Figures in the paper's style, and an explorer
# --------------------------------------------------------------------------------------

_KIND_NAME = {"hidden": "hidden states", "mlp": "MLP outputs", "attn": "attention outputs"}
_KIND_LABEL = {"hidden": "single restored layer", "mlp": "centre of restored MLP layers",
               "attn": "centre of restored attention layers"}


def plot_trace(result: Trace, ax=None, title: str | None = None):
    """Heatmap of P_{*, clean state (t, l)}(o): tokens down, layers across, subject tokens starred.

    The colour scale starts at P_*(o), so white means "restoring this state brings nothing back".
    """
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 0.35 * len(result.tokens) + 1.2))
    a, b = result.span
    labels = [repr(tok)[1:-1] + (" *" if a <= i < b else "") for i, tok in enumerate(result.tokens)]
    image = ax.imshow(result.scores.numpy(), cmap=CMAP_OF_KIND[result.kind], aspect="auto",
                      vmin=min(result.corrupted_prob, float(result.scores.min())))
    ax.set_yticks(range(len(labels)), labels=labels)
    L = result.scores.shape[1]
    ax.set_xticks(range(0, L, max(1, L // 8)))
    window = f" (window {result.window})" if result.kind != "hidden" else ""
    ax.set_xlabel(_KIND_LABEL[result.kind] + window)
    ax.set_title(title or f"restoring {_KIND_NAME[result.kind]}")
    ax.figure.colorbar(image, ax=ax, label=f"p({result.target.strip()})")
    return ax


def plot_traces(traces: list[Trace], title: str | None = None):
    """The paper's three heatmaps (hidden, MLP, attention) side by side; returns the figure."""
    import matplotlib.pyplot as plt

    T = len(traces[0].tokens)
    fig, axes = plt.subplots(1, len(traces), figsize=(4.6 * len(traces), 0.35 * T + 1.6),
                             constrained_layout=True)
    for ax, t in zip(np.atleast_1d(axes), traces):
        plot_trace(t, ax=ax)
    fig.suptitle(title or f"{traces[0].prompt!r} -> {traces[0].target!r}: "
                 f"P = {traces[0].clean_prob:.2f}, P* = {traces[0].corrupted_prob:.2f}")
    return fig


def plot_average_effects(summary: dict, normalised: bool = False):
    """AIE by token role (rows) and layer (columns) for each kind, as in the paper's figure 2."""
    import matplotlib.pyplot as plt

    kinds = list(summary["effects"])
    table = summary["normalised" if normalised else "effects"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.8 * len(kinds), 3.2), constrained_layout=True)
    for ax, kind in zip(np.atleast_1d(axes), kinds):
        image = ax.imshow(table[kind], cmap=CMAP_OF_KIND[kind], aspect="auto", vmin=0)
        ax.set_yticks(range(len(ROLES)), labels=list(summary["roles"]))
        ax.set_xticks(range(summary["n_layers"]))
        ax.set_xlabel(_KIND_LABEL[kind] + (f" (window {summary['window']})" if kind != "hidden" else ""))
        ax.set_title(f"AIE of {_KIND_NAME[kind]}")
        fig.colorbar(image, ax=ax, label="AIE / ATE" if normalised else "AIE")
    fig.suptitle(f"{summary['n_facts']} facts, {summary['samples']} noise samples each")
    return fig


def trace_explorer(model, tokenizer, facts, samples: int = 3, noise: float = 3.0, window: int = 1):
    """Pick a fact (or type a prompt and its subject) and see the three heatmaps.

    facts: (prompt, subject, target) tuples or dicts. Returns the widget (display it, e.g. as a
    cell's last expression); it draws once when built, so it also works headless.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt

    facts = [_as_fact(f) for f in facts]
    choice = w.Dropdown(options=[(f"{p} -> {t}", i) for i, (p, _, t) in enumerate(facts)], description="fact")
    prompt = w.Text(value=facts[0][0], description="prompt", layout=w.Layout(width="60%"))
    subject = w.Text(value=facts[0][1], description="subject")
    target = w.Text(value=facts[0][2] or "", description="target", placeholder="empty: top prediction")
    n_samples = w.IntSlider(value=samples, min=1, max=20, description="samples")

    def pick(change):
        p, s, t = facts[change["new"]]
        prompt.value, subject.value, target.value = p, s, t or ""
    choice.observe(pick, names="value")

    def draw(prompt, subject, target, samples):
        try:
            traces = [trace(model, tokenizer, prompt, subject, target or None, kind=kind, samples=samples,
                            noise=noise, window=window) for kind in KINDS]
        except (ValueError, KeyError) as err:
            print(f"cannot trace: {err}")
            return
        plot_traces(traces)
        plt.show()

    out = w.interactive_output(draw, {"prompt": prompt, "subject": subject, "target": target,
                                      "samples": n_samples})
    return w.VBox([choice, w.HBox([prompt, subject]), w.HBox([target, n_samples]), out])

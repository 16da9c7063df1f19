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

The three kinds of state are hook points of `hooks.HOOK_POINTS` (`SITE_OF_KIND`): kind "hidden"
is hook point "hidden" (the block output, TransformerLens's resid_post), kind "mlp" is "mlp_out"
(the output of the whole MLP module) and kind "attn" is "attn_out" ("mlp" and "attn" are also
accepted as aliases of those names).

Averaged over noise samples (and over facts) these are the paper's AIE and ATE. For the
MLP and attention a *window* of w layers centred on l is restored together, layers
l − ⌊w/2⌋ .. l − ⌊w/2⌋ + w − 1 clipped to the model (the paper: w = 10 of GPT-2 XL's 48 layers).
*Severing* (the paper's figure on the MLP's role) restores h_t^l while the MLP (or attention)
outputs at token t of every later layer stay frozen at their corrupted values.

The noise is added to the input of block 0 (hook point "resid_pre"): for GPT-2 that is token +
position embedding, and adding ε there is adding it to the token embedding. The noise of a prompt
depends only on the seed and the prompt's tokens: a prompt gets the same noise alone or in a
batch (`tracing_noise`). `trace_naive` runs the definition literally; `trace` and `trace_batch`
give the same numbers batched (how: `tracing_engine`). The averages over many facts are in
`tracing_averages`, the figures and the explorer in `tracing_display`; this module re-exports
their names (`from kn_tutorial.tracing import average_effects, plot_traces` keeps working).

    t = trace(model, tokenizer, "Kuwait lies on the continent of", "Kuwait")   # hidden
    t.scores        # [T, L] P_{*, clean h_t^l}(o), mean over samples
    t.effects       # [T, L] IE
    summary = average_effects(model, tokenizer, facts)   # AIE by token role and layer
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .hooks import Recorder, canonical_site, patch
from .lazy import lazy_exports
from .models import embedding_matrix, fused_activations, get_device, n_layers
from .progress import progress_bar
from .scoring import probability_dtype, target_ids
from .tokens import subject_span
from .tracing_engine import (  # noqa: F401  (the engine's names stay importable from here)
    _INPUT_SITES, _chunks, _first_blocks, _Group, _restored_rows, _writer, prepare_runs,
)
from .tracing_noise import _check_embeddings, noise_level, subject_noise  # noqa: F401  (re-exported)
from .validate import check_context

KINDS = ("hidden", "mlp", "attn")
SITE_OF_KIND = {kind: canonical_site(kind) for kind in KINDS}  # the kinds are hooks.SITE_ALIASES
ROLES = ("first subject token", "middle subject tokens", "last subject token",
         "first subsequent token", "further tokens", "last token")

# The averages over facts (tracing_averages) and the figures and explorer (tracing_display)
# import this module; their names are served from here on first use.
__getattr__ = lazy_exports(__package__, {
    "tracing_averages": ("average_effects", "severed_effects"),
    "tracing_display": ("CMAP_OF_KIND", "plot_trace", "plot_traces", "plot_average_effects", "trace_explorer"),
})

# --------------------------------------------------------------------------------------
# Small pieces: checks, windows, token roles (the noise: tracing_noise)
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
# Restored runs of one prompt (the batched machinery: tracing_engine)
# --------------------------------------------------------------------------------------

def _prepare(model, input_ids: Tensor, spans: list[tuple[int, int]], targets: Tensor, kind: str,
             sever: str | None, samples: int, noise: float, seed: int, batch_size: int):
    """The clean and corrupted runs of n prompts of one length (tracing_engine.prepare_runs),
    after checking the prompts; the noise is `subject_noise` on each prompt's subject.

    targets: [n] token ids; -1 means "the model's own top prediction in the clean run".
    """
    check_context(model, input_ids.shape[1], "the traced prompt")
    _check_embeddings(model, input_ids)

    def corrupt(ids: Tensor) -> Tensor:  # [n, T] -> ε [n, S, T, d_model]
        scale = noise_level(model, noise)
        return torch.stack([subject_noise(ids[i], spans[i], embedding_matrix(model).shape[1], samples, scale, seed)
                            for i in range(len(ids))])
    return prepare_runs(model, input_ids, targets, SITE_OF_KIND[kind],
                        None if sever is None else SITE_OF_KIND[sever], corrupt, batch_size)


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
    probs = _restored_rows(model, group, torch.zeros_like(row_mask), row_sample, restore[row_mask],
                           SITE_OF_KIND[kind], None if sever is None else SITE_OF_KIND[sever], frozen, batch_size)
    return {"probs": probs.cpu().view(M, samples), "clean": float(group.clean_prob[0]),
            "corrupted": group.corrupted_prob[0].cpu(), "target": int(group.targets[0])}


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
    with fused_activations(model):  # GPT-2's GELU as one kernel: same numbers to float rounding
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
        probs = group.corrupted_prob.cpu()[row_prompt, row_sample]                 # filled where inert
        with progress_bar(total=int((~inert).sum()), desc=f"tracing {kind}", disable=not show_progress) as bar:
            for t in row_pos[~inert].unique().tolist():  # rows restoring token t start their run at t
                rows = ((row_pos == t) & ~inert).nonzero()[:, 0]
                probs[rows] = _restored_rows(model, group, row_prompt[rows], row_sample[rows], restore[rows],
                                             SITE_OF_KIND[kind], None if sever is None else SITE_OF_KIND[sever],
                                             None if frozen is None else frozen[rows], batch_size, bar,
                                             start=t).cpu()

    corrupted = group.corrupted_prob.cpu()                                     # [n, S]
    by_sample = torch.full((n, T, L, samples), float("nan"), dtype=corrupted.dtype)  # float64 for a float64 model
    for i, (a, _) in enumerate(spans):
        by_sample[i, :a] = corrupted[i]                                        # untouched by the noise
    by_sample[row_prompt, row_pos, row_layer, row_sample] = probs
    return Grid(by_sample, group.clean_prob.cpu(), corrupted, group.targets.cpu())

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
        logits = model(input_ids=input_ids).logits[0, -1]
        prob = probability_dtype(logits.dtype)
        probs = torch.softmax(logits.to(prob), -1)
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

    out = torch.zeros(T, L, samples, dtype=prob)
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
                    out[t, layer, j] = torch.softmax(logits.to(prob), -1)[target_id].item()
    return out

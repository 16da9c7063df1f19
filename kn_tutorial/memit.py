"""MEMIT: Mass-Editing Memory in a Transformer (Meng et al., 2023).

ROME (`rome.py`) writes one fact into one layer. MEMIT writes n facts at once and spreads
each over a range of layers R = {l_1 < ... < l_L}. In the book's notation (W: [d_model, d_ff]
with W k + b = value, keys k taken at the subject's last token):

1. **Targets.** For every request i, z_i = h_i + δ_i is the residual stream (block output,
   `hooks` site "hidden") of the last layer l_L at the subject's last token that makes the
   model say the new object: δ_i is optimised like ROME's v* (`compute_targets`, the objective
   of the paper's code by default), but on the residual stream instead of the MLP output, all
   requests in one batch.
2. **Spread.** For each layer l in R, from the first: recompute the keys K_l = [k_1 ... k_n]
   ([d_ff, n]; averaged over the prompt and random prefixes as in the paper, or read from the
   prompt alone when `hparams.prefixes` is empty, as for Atlas, whose prompts all start with
   the subject) and the current residuals h_i of layer l_L in
   the model edited so far; give layer l its share of what is still missing,

       r_i = (z_i − h_i) / (number of layers of R from l on),

   and solve for all requests jointly (`solve_update`):

       ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹,   C_l = E[k kᵀ]  (stats.second_moment),

   the minimiser of  λ·tr(ΔW C ΔWᵀ) + ‖ΔW K − R‖²: keep the outputs of all other keys
   (weighted by λ, "mom2_update_weight") while moving the edited keys by R.

3. **Passes** (`hparams.passes`, beyond the paper; 1 is the paper's MEMIT). With many edits
   some fall short on the edited model although their z would do: λC holds the solve back
   from z, and the updates also move what the later layers read elsewhere in each prompt.
   With passes = 2 the same requests are edited again: new targets z are optimised on the
   edited model (so they ask for what is still missing, that damage included; edits that
   already hold ask for nothing) and steps 1-2 run once more; the updates of all passes add
   up in one restorable edit.

With one request and one layer, Sherman-Morrison turns the update into ROME's rank-one
direction, ΔW = r (C⁻¹k)ᵀ / (λ + kᵀC⁻¹k), which as λ → 0 meets ROME's constraint ΔW k = r.

Requests that share their key (same text up to the subject's last token) are one *key group*:
one key can hold one value, so MEMIT optimises one δ per group, over all of its prompts; two
requests that give one (subject, relation) different objects are rejected (`memit_requests`:
requests, relations, conflicts, key groups; its names are re-exported here).

Memory: the solve is [d_ff, d_ff] whatever n is; keys and targets are [n, d_ff] and
[n, d_model]; forward passes run in batches of `batch_size` groups.
`edit(model, tokenizer, requests)` returns a handle that restores the weights bit for bit.
How the targets and keys are computed fast (same numbers): `memit_engine`. Predictions before
and after an edit, the scaling figure and the explorer: `memit_display`.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

import torch

from .hooks import Recorder, patch
from .hyperparams import HPARAMS_ROOT, EditHparams
from .lazy import lazy_exports
from .memit_engine import (  # noqa: F401  (the engine's names stay importable from here)
    _Enough, _optimise_chunk, _rows_at_subject, _run_through, compute_keys_and_residuals,
)
from .models import check_layer, get_device, mlp_out_weight, module_name
from .progress import progress
from .memit_requests import (  # noqa: F401  (requests, conflicts and key groups stay importable from here)
    Request, as_request, check_conflicts, find_conflicts, key_groups,
)
from .rome import check_lengths, check_v_settings, sample_prefixes
from .scoring import pad_rows, target_ids
from .stats import second_moment
from .tokens import subject_span
from .validate import (NonFiniteEditError, check_finite_update, check_model_finite, nonfinite_cause,
                       require_later_layer, require_positive, require_positive_int)
from .weights import Restorable, WeightSnapshot

HPARAMS_DIR = HPARAMS_ROOT / "memit"

# Predictions before and after, the scaling figure and the explorer live in memit_display (it imports this module).
__getattr__ = lazy_exports(__package__, "memit_display", ("prediction_rows", "plot_scaling", "memit_explorer"))


@dataclass
class MemitHparams(EditHparams):
    """MEMIT's hyper-parameters: the layers it spreads the edit over, λ, the key-group batching and the
    number of passes, besides the shared z and C settings (`EditHparams`)."""
    layers: tuple[int, ...]
    mom2_update_weight: float = 20000.0  # λ, the same for any number of edits (the paper's)
    # An option beside the paper's constant λ: λ = mom2_update_weight_per_key · n, n the number of key
    # groups edited at once (`update_weight`), so that the preserved memories (λ C sums λ "virtual"
    # keys of the text) keep the same weight per edited key from one edit to thousands. None: the paper's.
    mom2_update_weight_per_key: float | None = None
    # Deprecated: stop_nll=x is read as stop_on="nll", stop_threshold=x (the form used before the
    # papers' rule, stop on the total loss, became the default); None: use stop_on / stop_threshold.
    stop_nll: float | None = None
    batch_size: int = 32  # key groups per forward pass
    passes: int = 1  # 1: the paper's MEMIT; 2+: edit the same requests again on the edited model
    # MEMIT's own defaults of two shared fields: ‖δ‖ ≤ factor · ‖h‖ (h: the residual at the subject), one
    # (length, how many) of random prefixes, plus ""
    clamp_norm_factor: float = field(default=0.75, kw_only=True)
    prefixes: tuple[tuple[int, int], ...] = field(default=((10, 5),), kw_only=True)

    METHOD = "MEMIT"
    EXAMPLE = "MemitHparams(layers=(...))"

    def update_weight(self, n_keys: int) -> float:
        """λ for an edit of `n_keys` key groups: the constant `mom2_update_weight` (the paper's), or
        `mom2_update_weight_per_key` · n_keys when that rule is set."""
        if self.mom2_update_weight_per_key is None:
            return self.mom2_update_weight
        return self.mom2_update_weight_per_key * n_keys

    def __post_init__(self):
        if self.stop_nll is not None:  # the deprecated field: map it once, then forget it
            warnings.warn("MemitHparams.stop_nll is deprecated: it is read as stop_on='nll', stop_threshold=stop_nll. "
                          "The default now follows the MEMIT code, stop_on='loss' (the total loss) with "
                          "stop_threshold=5e-2.", DeprecationWarning, stacklevel=3)
            self.stop_on, self.stop_threshold, self.stop_nll = "nll", self.stop_nll, None


# --------------------------------------------------------------------------------------
# Keys and residuals at the subject's last token, batched
# --------------------------------------------------------------------------------------

@torch.no_grad()
def _read_at_subject(model, tokenizer, texts: list[str], subjects: list[str], site: str, layer: int,
                     batch_size: int = 256) -> torch.Tensor:
    """Activation of (site, layer) at the subject's last token of every text: [n, width], float32."""
    out = []
    device = get_device(model)
    for start in range(0, len(texts), batch_size):
        rows, last = _rows_at_subject(tokenizer, texts[start:start + batch_size], subjects[start:start + batch_size])
        input_ids, mask = pad_rows(rows, tokenizer.eos_token_id, device)
        with Recorder(model, [(site, layer)]) as rec:
            model(input_ids=input_ids, attention_mask=mask)
        out.append(rec[(site, layer)][torch.arange(len(rows), device=device), torch.tensor(last, device=device)].float())
    return torch.cat(out)


def compute_keys(model, tokenizer, requests: list[Request], groups: list[list[int]], layer: int,
                 prefixes: list[str], batch_size: int = 256) -> torch.Tensor:
    """K: [n_groups, d_ff], each group's key at `layer` averaged over the prefixes."""
    first = [requests[g[0]] for g in groups]
    texts = [p + r.prompt.replace("{}", r.subject) for r in first for p in prefixes]
    subjects = [r.subject for r in first for _ in prefixes]
    keys = _read_at_subject(model, tokenizer, texts, subjects, "key", layer, batch_size)
    return keys.view(len(groups), len(prefixes), -1).mean(1)


def compute_residuals(model, tokenizer, requests: list[Request], groups: list[list[int]], layer: int,
                      batch_size: int = 256) -> torch.Tensor:
    """h: [n_groups, d_model], the residual stream after block `layer` at the subject (no prefix)."""
    first = [requests[g[0]] for g in groups]
    texts = [r.prompt.replace("{}", r.subject) for r in first]
    return _read_at_subject(model, tokenizer, texts, [r.subject for r in first], "hidden", layer, batch_size)


# Both from one shortened forward pass, what `edit` reads: memit_engine.compute_keys_and_residuals.


# --------------------------------------------------------------------------------------
# Step 1: target residuals z, optimised for many key groups in one batch
# --------------------------------------------------------------------------------------

@dataclass
class MemitTargets:
    layer: int  # l_L, where z lives
    z: torch.Tensor  # [n_groups, d_model]
    h: torch.Tensor  # [n_groups, d_model] the residual before editing
    final_nll: torch.Tensor  # [n_groups] mean NLL of the new objects with δ added
    steps: torch.Tensor  # [n_groups] optimisation steps taken
    final_loss: torch.Tensor | None = None  # [n_groups] the total loss of the returned δ (what stop_on="loss" reads)
    final_kl: torch.Tensor | None = None  # [n_groups] its KL (unweighted, in hparams.kl_direction)
    final_decay: torch.Tensor | None = None  # [n_groups] its weighted decay term


def compute_targets(model, tokenizer, requests: list[Request], groups: list[list[int]], layer: int,
                    prefixes: list[str], hparams: MemitHparams, naive: bool = False) -> MemitTargets:
    """z = h + δ for every key group: δ added to the residual after block `layer` at the subject's
    last token, in every prefixed prompt of the group (Meng et al., 2023, MEMIT, eq. 16), minimising

        mean NLL of the new objects + kl_factor · KL(P_after ‖ P_before) + v_weight_decay · ‖δ‖ / ‖h‖²

    (the KL on the next token after "{s} is a", averaged over the KL prompts; h the residual at the
    subject without prefix) with ‖δ‖ ≤ clamp_norm_factor · ‖h‖ after each Adam step, each group
    stopping (before a step) once its total loss is below stop_threshold = 5e-2. These defaults
    are the paper's code (kmeng01/memit, memit/compute_z.py: ‖δ‖ not squared, the same term as
    ROME's). The hparams name the other forms as options (`EditHparams`): kl_direction=
    "before||after", decay_power=2 (‖δ‖²/‖h‖², this package's earlier form), stop_on="nll".
    At most v_steps Adam steps per group (v_steps + 1 evaluations, the last takes no step). A
    group whose loss is below the threshold at step 0 keeps δ = 0: its fact already holds. One
    difference from the paper's code remains: it reads the KL prompt's distribution at the
    subject's last token, this package after the whole KL prompt (as `rome.compute_v_star`).

    `batch_size` groups per batch, each step running only what depends on δ (naive=True: a full
    forward pass per step, see `compute_targets_naive`). GPT-2's GELU stays the unfused module here
    (models.fused_activations): its 1e-7 rounding, carried through the Adam steps, moved z by 1.4e-5
    of its largest entry from the naive path on 100 Atlas requests (3.6e-6 unfused)."""
    if not prefixes or prefixes[0] != "":
        raise ValueError("prefixes must start with '' (the prompt without prefix), as sample_prefixes returns")
    parts = []
    chunks = range(0, len(groups), hparams.batch_size)
    for start in progress(chunks, desc=f"MEMIT targets z at layer {layer}", disable=len(chunks) < 4):
        parts.append(_optimise_chunk(model, tokenizer, requests, groups[start:start + hparams.batch_size],
                                     layer, prefixes, hparams, naive))
    h, z, nll, steps, loss, kl, decay = (torch.cat(x) for x in zip(*parts))
    return MemitTargets(layer, z, h, nll, steps, loss, kl, decay)


def compute_targets_naive(model, tokenizer, requests: list[Request], groups: list[list[int]], layer: int,
                          prefixes: list[str], hparams: MemitHparams) -> MemitTargets:
    """`compute_targets` as the definition reads: every step a full forward pass of every prompt,
    δ added to the block output by a hook (the oracle the fast path is tested against)."""
    return compute_targets(model, tokenizer, requests, groups, layer, prefixes, hparams, naive=True)


# --------------------------------------------------------------------------------------
# Step 2: the joint least-squares update of one layer
# --------------------------------------------------------------------------------------

def solve_update(mom2: torch.Tensor, keys: torch.Tensor, residuals: torch.Tensor, lam: float) -> torch.Tensor:
    """ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹: [d_model, d_ff], in float64.

    keys: [n, d_ff] (rows k_i), residuals: [n, d_model] (rows r_i), mom2: C [d_ff, d_ff].
    Minimises λ·tr(ΔW C ΔWᵀ) + Σ_i ‖ΔW k_i − r_i‖²; solved by Cholesky on the keys' device."""
    device = keys.device
    cause = nonfinite_cause(C=mom2, keys=keys, residuals=residuals)
    if cause or not math.isfinite(lam):
        raise NonFiniteEditError(f"the MEMIT update cannot be solved: {cause or f'λ = {lam}'}")
    k = keys.to(torch.float64)
    a = lam * mom2.to(device=device, dtype=torch.float64) + k.T @ k  # [d_ff, d_ff]
    factor, info = torch.linalg.cholesky_ex(a)
    if info.item() != 0:
        raise ValueError("λ C + K Kᵀ is not positive definite: use more text for the statistics C, "
                         "or a larger mom2_update_weight λ")
    return torch.cholesky_solve(k.T @ residuals.to(device=device, dtype=torch.float64), factor).T


# --------------------------------------------------------------------------------------
# The edit
# --------------------------------------------------------------------------------------

@dataclass
class LayerRecord:
    layer: int
    pass_index: int  # 0 for the first pass
    residual_norm: float  # mean ‖r_i‖ asked of this layer
    achieved_norm: float  # mean ‖ΔW k_i‖ it delivered on the edited keys
    update_norm: float  # ‖ΔW‖_F


@dataclass
class MemitEdit(Restorable):
    """What a MEMIT edit changed, and the means to take it back exactly."""

    requests: list[Request]
    groups: list[list[int]]
    layers: tuple[int, ...]
    targets: MemitTargets  # the first pass's targets (on the unedited model)
    deltas: dict[int, torch.Tensor]  # layer -> ΔW [d_model, d_ff], summed over passes
    records: list[LayerRecord]  # one per (pass, layer)
    snapshot: WeightSnapshot
    prefixes: list[str] = field(default_factory=list)
    pass_targets: list[MemitTargets] = field(default_factory=list)  # every pass's targets, first one first


def prepare(model, tokenizer, requests: list[dict], hparams: MemitHparams | None = None):
    """(requests as Request, key groups, hparams with checked layers, prefixes); raises on conflicts."""
    if isinstance(requests, dict):
        requests = [requests]
    if not requests:
        raise ValueError("no requests to edit")
    reqs = [as_request(r) for r in requests]
    check_conflicts(reqs)
    for r in reqs:
        subject_span(tokenizer, r.prompt.replace("{}", r.subject), r.subject)  # subject must tokenise in place
    if hparams is None:
        hparams = MemitHparams.for_model(getattr(model.config, "_name_or_path", ""))
    layers = tuple(sorted({check_layer(model, layer) for layer in hparams.layers}))
    if not layers:
        raise ValueError("MEMIT needs at least one layer")
    if isinstance(hparams.passes, bool) or not isinstance(hparams.passes, int) or hparams.passes < 1:
        raise ValueError(f"passes must be at least 1 (got {hparams.passes}); 1 is the paper's MEMIT")
    check_v_settings(hparams, "MEMIT")
    require_positive("MEMIT mom2_update_weight λ", hparams.mom2_update_weight,
                     "λ weighs keeping the other keys' outputs; the paper uses 15,000-20,000.")
    if hparams.mom2_update_weight_per_key is not None:
        require_positive("MEMIT mom2_update_weight_per_key (λ = this · number of edited keys)",
                         hparams.mom2_update_weight_per_key, "or None for the paper's constant mom2_update_weight.")
    require_positive_int("MEMIT batch_size", hparams.batch_size)
    require_later_layer(model, layers[-1], "MEMIT", "z is the residual stream after its last layer")
    check_model_finite(model, "MEMIT")
    hparams = replace(hparams, layers=layers)
    prefixes = sample_prefixes(model, tokenizer, hparams.prefixes, seed=hparams.seed)
    for r in reqs:
        check_lengths(model, tokenizer, r.prompt, r.subject, r.target, prefixes, hparams.kl_prompts, "MEMIT")
    return reqs, key_groups(reqs), hparams, prefixes


def edit(model, tokenizer, requests: list[dict], hparams: MemitHparams | None = None,
         mom2: dict[int, torch.Tensor] | None = None, targets: MemitTargets | None = None) -> MemitEdit:
    """Write all `requests` (CounterFact cases or their `requested_rewrite`s) with MEMIT at once.

    mom2: {layer: C} to skip the (cached) statistics; targets: z from `compute_targets` for
    these requests on the unedited model (e.g. to try several λ on the same first-pass targets;
    later passes always optimise their own). Returns a restorable handle; on any error the
    weights are restored before it propagates."""
    reqs, groups, hparams, prefixes = prepare(model, tokenizer, requests, hparams)
    layers, last = hparams.layers, hparams.layers[-1]
    if targets is not None and (targets.z.shape[0] != len(groups) or targets.layer != last):
        raise ValueError(f"targets are for {targets.z.shape[0]} key groups at layer {targets.layer}, "
                         f"these requests have {len(groups)} groups and their last layer is {last}")
    mom2 = dict(mom2 or {})
    for layer in layers:
        if layer not in mom2:
            mom2[layer] = second_moment(model, tokenizer, layer, corpus=hparams.mom2_corpus,
                                        n_samples=hparams.mom2_n_samples)
        if not bool(torch.isfinite(mom2[layer]).all()):
            raise NonFiniteEditError(f"the statistics C of layer {layer} are not finite; recompute them "
                                     "(stats.second_moment) on a model with finite weights")
    params = [(module_name(model, layer, "mlp_out") + ".weight",
               model.get_submodule(module_name(model, layer, "mlp_out")).weight) for layer in layers]
    subjects = sorted({r.subject for r in reqs})
    shown = ", ".join(map(repr, subjects[:3])) + (", ..." if len(subjects) > 3 else "")
    label = f"the MEMIT edit of {len(reqs)} request(s) ({shown})"
    snapshot = WeightSnapshot(params, track=True, label=label)
    deltas, records, pass_targets = {}, [], []
    try:
        for pass_index in range(hparams.passes):
            if pass_index > 0 or targets is None:  # optimised on the model as edited so far
                targets = compute_targets(model, tokenizer, reqs, groups, last, prefixes, hparams)
            pass_targets.append(targets)
            for i, layer in enumerate(layers):
                # keys [G, d_ff] at this layer, h [G, d_model] after the last layer, on the model as edited so far
                keys, h = compute_keys_and_residuals(model, tokenizer, reqs, groups, layer, last, prefixes)
                residuals = (targets.z.to(h.device) - h) / (len(layers) - i)  # this layer's share
                if not (bool(torch.isfinite(keys).all()) and bool(torch.isfinite(residuals).all())):
                    cause = nonfinite_cause(model, keys=keys, residuals=residuals)
                    raise NonFiniteEditError(f"MEMIT at layer {layer} (pass {pass_index + 1}): {cause}; "
                                             "nothing was written (the weights are restored)")
                delta_w = solve_update(mom2[layer], keys, residuals, hparams.update_weight(len(groups)))
                weight = mlp_out_weight(model, layer)
                check_finite_update(f"the MEMIT update ΔW of layer {layer}", delta_w, weight, model,
                                    "Nothing was written (the weights are restored).", C=mom2[layer])
                with torch.no_grad():
                    weight.add_(delta_w.to(weight.dtype))
                deltas[layer] = deltas[layer] + delta_w.float() if layer in deltas else delta_w.float()
                records.append(LayerRecord(layer, pass_index, residuals.norm(dim=1).mean().item(),
                                           (keys.double() @ delta_w.T).norm(dim=1).mean().item(),
                                           delta_w.norm().item()))
    except BaseException:
        snapshot.restore()
        raise
    return MemitEdit(reqs, groups, layers, pass_targets[0], deltas, records, snapshot, prefixes, pass_targets)


@torch.no_grad()
def success_with_targets(model, tokenizer, cases: list[dict], requests: list[Request], groups: list[list[int]],
                         targets: MemitTargets, batch_size: int = 128) -> float:
    """ES (%) on the rewrite prompts of `cases` with each case's target residual z *written in*:
    the hidden state after layer `targets.layer` at the subject's last token replaced by the z of
    the case's key group (cases must be among `requests`).

    On the unedited model this is how good the targets are; on the edited model it separates
    misses of the solve (h never reached z: fixed by writing z in) from damage elsewhere in the
    prompt (other tokens' states moved by the updates: not fixed by writing z in)."""
    device = get_device(model)
    group_of = {requests[g[0]].key_text: i for i, g in enumerate(groups)}
    rows, positions, answers = [], [], []  # two rows per case: new object, then true object
    for c, case in enumerate(cases):
        r = as_request(case)
        if r.key_text not in group_of:
            raise ValueError(f"case {c} ({r.subject!r}) is not among the edited requests")
        text = r.prompt.replace("{}", r.subject)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        pos = subject_span(tokenizer, text, r.subject, occurrence=-1)[1] - 1
        for target in (r.target, case["requested_rewrite"]["target_true"]["str"]):
            tokens = target_ids(tokenizer, target)
            rows.append(ids + tokens[:-1])
            positions.append((pos, group_of[r.key_text]))
            answers.append([(len(ids) - 1 + j, t) for j, t in enumerate(tokens)])
    mean_logprob = []
    z = targets.z.to(device)
    for start in range(0, len(rows), batch_size):
        chunk = slice(start, start + batch_size)
        input_ids, mask = pad_rows(rows[chunk], tokenizer.eos_token_id, device)
        pos = torch.tensor([p for p, _ in positions[chunk]], device=device)
        grp = torch.tensor([g for _, g in positions[chunk]], device=device)

        def write_z(out: torch.Tensor) -> torch.Tensor:
            out = out.clone()
            out[torch.arange(out.shape[0], device=out.device), pos] = z[grp].to(out.dtype)
            return out

        with patch(model, "hidden", targets.layer, write_z):
            logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
        for i, row_answers in enumerate(answers[chunk]):
            mean_logprob.append(sum(logprobs[i, col, t].item() for col, t in row_answers) / len(row_answers))
    wins = [mean_logprob[2 * c] > mean_logprob[2 * c + 1] for c in range(len(cases))]
    return 100.0 * sum(wins) / len(wins)

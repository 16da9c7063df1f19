"""ROME: Rank-One Model Editing (Meng et al., 2022, "Locating and Editing Factual Associations in GPT").

A fact (s, r, o) is recalled when the MLP output projection W of one layer maps the
subject's key k (the MLP's hidden activation at the subject's last token) to a value v
that the later layers read as o. To write a new object o*, ROME

1. computes k*: the key of the subject, averaged over random prefixes (`compute_k_star`);
2. finds v* = W k* + b + δ, where δ is added to the MLP output at the subject and optimised
   so the model says o*, with a KL term keeping "{} is a" unchanged and δ's norm clamped
   (`compute_v_star`; the objective of the paper's code by default, other forms as options);
3. inserts the pair with the rank-one update that changes W least on all other keys
   (`rank_one_update`):

       Ŵ = W + Λ (C⁻¹k*)ᵀ,   Λ = (v* − W k* − b) / ((C⁻¹k*)ᵀ k*),   C = E[k kᵀ],

   the solution of  min ‖Ŵ K − W K‖  subject to  Ŵ k* + b = v*.

`edit(model, tokenizer, request)` runs all three and returns a handle that restores the
weights bit for bit (`.restore()`, or use it as a context manager). `lstsq_update` and
`feasible_perturbations` are independent checks of step 3 (chapter 6 uses them). How v* is
optimised fast (same numbers as the definition, `compute_v_star_naive`): `rome_engine`.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from .hooks import Recorder
from .hyperparams import HPARAMS_ROOT, EditHparams, read_hparams  # noqa: F401  (read_hparams: kept importable here)
from .models import check_layer, get_device, mlp_out_weight, module_name, value_bias
from .rome_engine import (  # noqa: F401  (the engine's names stay importable from here)
    _batch, _last_subject_positions, _v_star, decay_term, kl_per_row,
)
from .scoring import target_ids
from .stats import second_moment
from .tokens import subject_span
from .validate import (NonFiniteEditError, check_context, check_finite_update, check_model_finite, nonfinite_cause,
                       require_later_layer, require_nonempty, require_nonnegative, require_positive,
                       require_positive_int, require_templates, shorten)
from .weights import Restorable, WeightSnapshot

HPARAMS_DIR = HPARAMS_ROOT / "rome"


@dataclass
class RomeHparams(EditHparams):
    """ROME's hyper-parameters: the layer it edits, the shared v* and C settings (`EditHparams`), a ridge."""
    layer: int
    ridge: float = 0.0  # C + ridge · mean(diag C) · I; 0 = plain C (Cholesky in float64)

    METHOD = "ROME"
    EXAMPLE = "RomeHparams(layer=...)"


def prepare_request(request: dict) -> tuple[str, str, str]:
    """(prompt template with '{}', subject, target_new) with clear errors for bad requests."""
    for key in ("prompt", "subject", "target_new"):
        if key not in request:
            raise KeyError(f"the request lacks {key!r}; expected CounterFact style: "
                           "{'prompt': '{} lies in', 'subject': 'Kuwait', 'target_new': {'str': 'Europe'}}")
    subject = request["subject"]
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError("the request's subject is empty")
    prompt = request["prompt"]
    if "{}" not in prompt:
        if subject not in prompt:
            raise ValueError(f"the subject {subject!r} is not in the prompt {prompt!r}: "
                             "write the prompt with '{}' where the subject goes")
        prompt = prompt.replace(subject, "{}", 1)
    target = request["target_new"]
    target = target["str"] if isinstance(target, dict) else target
    if not isinstance(target, str) or not target.strip():
        raise ValueError("the request's target_new is empty")
    return prompt, subject, target


def check_v_settings(hparams, method: str) -> None:
    """Refuse the settings of the v*/z optimisation (ROME's, which MEMIT shares) that would make an
    edit do nothing or junk: no steps, a non-positive clamp or learning rate, non-finite factors,
    no KL prompts, a non-positive sample size."""
    require_positive_int(f"{method} v_steps", hparams.v_steps,
                         "With no step δ stays 0 and the edit writes nothing.")
    require_positive(f"{method} v_lr", hparams.v_lr)
    require_positive(f"{method} clamp_norm_factor", hparams.clamp_norm_factor,
                     "‖δ‖ is clamped to this factor times ‖h‖: 0 makes δ = 0 (no edit), a negative factor flips δ.")
    require_nonnegative(f"{method} v_weight_decay", hparams.v_weight_decay)
    require_nonnegative(f"{method} kl_factor", hparams.kl_factor)
    require_templates(f"{method} kl_prompts", hparams.kl_prompts)
    require_positive_int(f"{method} mom2_n_samples", hparams.mom2_n_samples)
    check_objective(hparams, method)
    for entry in hparams.prefixes:
        if len(tuple(entry)) != 2:
            raise ValueError(f"{method} prefixes are (length, how many) pairs of positive ints, got {entry!r}")
        for x in entry:
            require_positive_int(f"{method} prefixes (length, how many)", x)


def check_objective(hparams, method: str) -> None:
    """Refuse an unknown form of the v*/z objective (`EditHparams`: kl_direction, decay_power,
    stop_on, stop_threshold), naming the choices and which one is the papers' code."""
    if hparams.kl_direction not in hparams.KL_DIRECTIONS:
        raise ValueError(f"{method} kl_direction must be one of {hparams.KL_DIRECTIONS}, got {hparams.kl_direction!r}: "
                         "'after||before' is KL(P_after ‖ P_before), the papers' code; 'before||after' the reverse")
    if isinstance(hparams.decay_power, bool) or hparams.decay_power not in hparams.DECAY_POWERS:
        raise ValueError(f"{method} decay_power must be 1 or 2, got {hparams.decay_power!r}: the decay term is "
                         "v_weight_decay · ‖δ‖^decay_power / ‖h‖²; 1 is the papers' code, 2 the squared variant")
    if hparams.stop_on not in hparams.STOP_ON:
        raise ValueError(f"{method} stop_on must be one of {hparams.STOP_ON}, got {hparams.stop_on!r}: 'loss' stops "
                         "on the total loss (the papers' code), 'nll' on the prediction loss alone")
    require_nonnegative(f"{method} stop_threshold", hparams.stop_threshold,
                        "The optimisation stops once the chosen loss is below it; the papers' code uses 5e-2.")


def check_lengths(model, tokenizer, prompt: str, subject: str, target: str, prefixes: list[str],
                  kl_prompts, method: str) -> None:
    """Every row the optimisation runs (prefix + prompt + target, and the KL prompts) must fit the context."""
    n_target = len(target_ids(tokenizer, target))
    for p in prefixes:
        text = p + prompt.replace("{}", subject)
        check_context(model, len(tokenizer(text, add_special_tokens=False)["input_ids"]) + n_target - 1,
                      f"the {method} prompt with its target {shorten(text + ' ' + target.strip())}")
    for k in kl_prompts:
        text = k.replace("{}", subject)
        check_context(model, len(tokenizer(text, add_special_tokens=False)["input_ids"]),
                      f"the KL prompt {shorten(text)}")


@contextmanager
def _unpadded():
    """Silence transformers' "pass an attention_mask" warning for rows that are not padded.

    The rows start with <|endoftext|>, which models such as GPT-2 and Atlas also use as the
    padding token, so transformers cannot tell and warns; no position here is padding, so the
    mask would be all ones and change nothing. Other warnings still show."""
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(hf_logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@torch.no_grad()
def sample_prefixes(model, tokenizer, lengths: tuple[tuple[int, int], ...], seed: int = 0) -> list[str]:
    """Random texts sampled from the model itself (top-5 sampling from <|endoftext|>), seeded.

    Sampled without a KV cache: every step reruns the (short) prefix, so no attention mask
    over cached positions can go wrong. Returns '' (no prefix) first, then 'text. ' prefixes.
    """
    generator = torch.Generator().manual_seed(seed)
    device = get_device(model)
    out = [""]
    for length, count in lengths:
        ids = torch.full((count, 1), tokenizer.eos_token_id, dtype=torch.long, device=device)
        for _ in range(length):
            with _unpadded():
                logits = model(input_ids=ids).logits[:, -1].float().cpu()
            top = logits.topk(5, dim=-1)
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=generator)
            ids = torch.cat([ids, top.indices.gather(1, choice).to(device)], dim=1)
        for row in ids[:, 1:]:
            text = tokenizer.decode(row, skip_special_tokens=True).replace("{", "").replace("}", "").strip()
            out.append(text.rstrip(".") + ". ")
    return out


@torch.no_grad()
def compute_k_star(model, tokenizer, prompt: str, subject: str, layer: int, prefixes: list[str]) -> torch.Tensor:
    """k* = mean over prefixes of the key at the subject's last token: [d_ff]."""
    prompts = [p + prompt.replace("{}", subject) for p in prefixes]
    positions = _last_subject_positions(tokenizer, prompts, subject)
    rows = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    input_ids, mask = _batch(tokenizer, rows, get_device(model))
    with Recorder(model, [("key", layer)]) as rec:
        model(input_ids=input_ids, attention_mask=mask)
    keys = rec[("key", layer)][torch.arange(len(rows)), torch.tensor(positions)]  # [n_prefixes, d_ff]
    return keys.float().mean(0)


@dataclass
class VStarResult:
    delta: torch.Tensor  # [d_model], added to the MLP output at the subject
    losses: list[dict] = field(default_factory=list)  # per step: nll, kl, weight decay
    k_star: torch.Tensor | None = None  # [d_ff] k*, read in the pass before the first step (= compute_k_star)


def compute_v_star(model, tokenizer, prompt: str, subject: str, target: str, layer: int,
                   prefixes: list[str], hparams: RomeHparams) -> VStarResult:
    """Optimise δ so that adding it to the MLP output of `layer` at the subject makes the model
    say `target` after every prefixed prompt, while the next-token distribution after the KL
    prompts ("{s} is a") stays close to the unedited one (Meng et al., 2022, ROME, section 3.1).

    In the book's notation, with m the MLP output at the subject (the prompt without prefix):

        loss(δ) = mean_prompts −(1/|o*|) Σ_j log P(o*_j | ...)  +  kl_factor · KL  +  v_weight_decay · ‖δ‖ / ‖m‖²
        KL = mean over the KL prompts of KL(P_after ‖ P_before)

    with ‖δ‖ clamped to clamp_norm_factor · ‖m‖ after each Adam step, and the optimisation
    stopping (before a step) once the total loss is below stop_threshold = 5e-2. These defaults are
    the paper's code (kmeng01/rome, rome/compute_v.py). The hparams name the other forms as options:
    kl_direction="before||after" (KL(P_before ‖ P_after)), decay_power=2 (‖δ‖²/‖m‖²),
    stop_on="nll" (stop on the NLL alone). At most v_steps Adam steps: the loss is evaluated up to
    v_steps + 1 times and the last evaluation takes no step, so `losses[-1]` is the returned δ's.
    When the loss is below the threshold at step 0 (the model already says the target) δ stays 0
    and `rome.edit` writes ΔW = 0, as the paper's code does: not an error.

    One difference from the paper's code remains, in where the KL is read: here the next-token
    distribution after the whole KL prompt ("Kuwait is a" → ?); the paper's code reads it at the
    subject's last token of the KL prompt (its lookup index, "Kuwait" → ?).

    `losses` records per evaluation: nll, kl (unweighted, in the chosen direction), decay
    (weighted), loss (the total), delta_norm and p_target.

    All prompts run in one batch per step, and each step runs only what depends on δ: the
    blocks after `layer`, from the subject's last token on (suffix.run_from_block); the rest
    (tokens before it, blocks up to `layer`) is one forward pass before the first step (how:
    `rome_engine`). Equal to `compute_v_star_naive`, one full forward pass per step, up to float
    rounding.
    """
    return VStarResult(*_v_star(model, tokenizer, prompt, subject, target, layer, prefixes, hparams, naive=False))


def compute_v_star_naive(model, tokenizer, prompt: str, subject: str, target: str, layer: int,
                         prefixes: list[str], hparams: RomeHparams) -> VStarResult:
    """`compute_v_star` as the definition reads: every step a full forward pass of every prompt
    with δ added to the MLP output by a hook (the oracle the fast path is tested against)."""
    return VStarResult(*_v_star(model, tokenizer, prompt, subject, target, layer, prefixes, hparams, naive=True))


def solve_c_inverse_k(mom2: torch.Tensor, k_star: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """u = C⁻¹ k* by Cholesky in float64 (C is symmetric positive semi-definite).

    C of a small model's keys can be badly conditioned (1e8 has been seen), which float32
    solves get wrong; float64 Cholesky is accurate there. A singular C needs ridge > 0.
    Solved on k*'s device (the cached C is loaded on the CPU)."""
    if not bool(torch.isfinite(mom2).all()) or not bool(torch.isfinite(k_star).all()):
        raise NonFiniteEditError(f"C⁻¹k* cannot be computed: {nonfinite_cause(C=mom2, k_star=k_star)}; "
                                 "recompute the statistics C on a model with finite weights")
    require_nonnegative("ridge", ridge)
    c = mom2.to(device=k_star.device, dtype=torch.float64)
    if ridge > 0:
        c = c + ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    factor, info = torch.linalg.cholesky_ex(c)
    if info.item() != 0:
        raise ValueError("the second moment C is singular (not positive definite), so C⁻¹k* does not exist; "
                         "use more text for the statistics or set ridge > 0 (e.g. ridge=1e-4)")
    return torch.cholesky_solve(k_star.to(torch.float64)[:, None], factor)[:, 0]


def rank_one_update(weight: torch.Tensor, mom2: torch.Tensor, k_star: torch.Tensor, residual: torch.Tensor,
                    ridge: float = 0.0) -> torch.Tensor:
    """ΔW = Λ (C⁻¹k*)ᵀ with Λ = residual / ((C⁻¹k*)ᵀ k*), where residual = v* − W k* − b.

    weight: W as [d_model, d_ff] (W @ k = value). Adds ΔW to `weight` in place and returns ΔW,
    so that afterwards (W + ΔW) k* = W k* + residual."""
    return apply_rank_one(weight, solve_c_inverse_k(mom2, k_star, ridge), k_star, residual)


def rank_one_delta(weight: torch.Tensor, u: torch.Tensor, k_star: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """ΔW = Λ uᵀ, Λ = residual / (uᵀ k*), given u = C⁻¹k*, in `weight`'s dtype and device (nothing written)."""
    lam = residual.to(torch.float64) / (u @ k_star.to(torch.float64))  # Λ: [d_model]
    return torch.outer(lam, u).to(weight.dtype).to(weight.device)  # [d_model, d_ff]


def apply_rank_one(weight: torch.Tensor, u: torch.Tensor, k_star: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Add ΔW = Λ uᵀ, Λ = residual / (uᵀ k*), to `weight` in place, given u = C⁻¹k*; returns ΔW.
    Raises NonFiniteEditError, writing nothing, when ΔW or W + ΔW is not finite."""
    delta_w = rank_one_delta(weight, u, k_star, residual)
    check_finite_update("the ROME update ΔW", delta_w, weight, k_star=k_star, residual=residual, u=u)
    with torch.no_grad():
        weight.add_(delta_w)
    return delta_w


def lstsq_update(keys: torch.Tensor, k_star: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """ΔW minimising ‖ΔW K‖ subject to ΔW k* = residual, by a direct least-squares solve (an
    independent check of `rank_one_update`; it needs the keys themselves, not C).

    Every feasible ΔW is ΔW₀ + N Pᵀ, with ΔW₀ = residual k*ᵀ / ‖k*‖² and P: [d_ff, d_ff − 1] an
    orthonormal basis of the directions orthogonal to k*; N is then an unconstrained
    least-squares problem, N (Pᵀ K) ≈ −ΔW₀ K, solved by torch.linalg.lstsq in float64.
    keys: K as [d_ff, n]; returns ΔW: [d_model, d_ff]."""
    keys, k, r = keys.to(torch.float64), k_star.to(keys.device, torch.float64), residual.to(keys.device, torch.float64)
    delta0 = torch.outer(r, k) / (k @ k)  # [d_model, d_ff], satisfies the constraint
    q, _ = torch.linalg.qr(torch.cat([k[:, None], torch.eye(len(k), dtype=k.dtype, device=k.device)], 1))
    basis = q[:, 1:len(k)]  # [d_ff, d_ff − 1], orthogonal to k*
    a = (basis.T @ keys).T  # [n, d_ff − 1]
    b = -(delta0 @ keys).T  # [n, d_model]
    n = torch.linalg.lstsq(a.cpu(), b.cpu(), driver="gelsd").solution.to(k.device)  # [d_ff − 1, d_model]
    return delta0 + n.T @ basis.T


def feasible_perturbations(delta_w: torch.Tensor, k_star: torch.Tensor, n: int, scale: float = 0.1,
                           seed: int = 0) -> torch.Tensor:
    """n random updates that satisfy the same constraint as delta_w: ΔW + scale·‖ΔW‖·N/‖N‖ with
    N k* = 0 (Gaussian noise with its k* component projected out); returns [n, d_model, d_ff]."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, *delta_w.shape), generator=g, dtype=torch.float64).to(delta_w.device)
    k = k_star.to(delta_w.device, torch.float64)
    noise = noise - (noise @ k)[..., None] * k / (k @ k)
    noise = noise / noise.flatten(1).norm(dim=1)[:, None, None]
    return delta_w.to(torch.float64) + scale * delta_w.to(torch.float64).norm() * noise


@dataclass
class RomeEdit(Restorable):
    """What an edit changed, and the means to take it back exactly."""

    request: dict
    layer: int
    k_star: torch.Tensor
    v_star: torch.Tensor
    delta_w: torch.Tensor
    v_losses: list[dict]
    snapshot: WeightSnapshot


def edit(model, tokenizer, request: dict, hparams: RomeHparams | None = None, mom2: torch.Tensor | None = None,
         prefixes: list[str] | None = None) -> RomeEdit:
    """Write request (CounterFact style) into the model with ROME; returns a restorable handle.

    mom2: C of the layer (default: `second_moment`, cached on disk); prefixes: the random prefixes
    (default: `sample_prefixes` with the hparams' seed; pass them to reuse them across edits).
    Nothing in the model changes until every step has succeeded; the update is a single
    in-place addition to one weight matrix, recorded in the returned snapshot."""
    prompt, subject, target = prepare_request(request)
    if hparams is None:
        hparams = RomeHparams.for_model(getattr(model.config, "_name_or_path", ""))
    layer = check_layer(model, hparams.layer)
    hparams = replace(hparams, layer=layer)
    check_v_settings(hparams, "ROME")
    require_nonnegative("ROME ridge", hparams.ridge)
    require_later_layer(model, layer, "ROME", "v* changes the MLP output")
    subject_span(tokenizer, prompt.replace("{}", subject), subject)  # subject must tokenise inside the prompt
    check_model_finite(model, "ROME")
    if prefixes is None:
        prefixes = sample_prefixes(model, tokenizer, hparams.prefixes, seed=hparams.seed)
    prefixes = require_nonempty("prefixes", prefixes, "Pass None for the sampled ones, or [''] for no prefix.")
    check_lengths(model, tokenizer, prompt, subject, target, prefixes, hparams.kl_prompts, "ROME")
    v = compute_v_star(model, tokenizer, prompt, subject, target, layer, prefixes, hparams)
    k_star = v.k_star  # compute_k_star's k*, read in v*'s first forward pass (the same rows; rome_engine, point 3)
    if k_star is None:  # a v* computed elsewhere (e.g. a replaced compute_v_star) that did not read it
        k_star = compute_k_star(model, tokenizer, prompt, subject, layer, prefixes)
    if mom2 is None:
        mom2 = second_moment(model, tokenizer, layer, corpus=hparams.mom2_corpus, n_samples=hparams.mom2_n_samples)
    weight = mlp_out_weight(model, layer)
    bias = value_bias(model, layer)
    with torch.no_grad():
        current = weight.float() @ k_star + (bias.float() if bias is not None else 0)
    v_star = current + v.delta
    u = solve_c_inverse_k(mom2, k_star, hparams.ridge)  # raises before any weight changes
    delta_w = rank_one_delta(weight, u, k_star, v.delta)
    check_finite_update("the ROME update ΔW", delta_w, weight, model,
                        "Lower v_lr, or check C and the request.", k_star=k_star, delta=v.delta, C=mom2)
    name = module_name(model, layer, "mlp_out") + ".weight"
    snapshot = WeightSnapshot([(name, model.get_submodule(module_name(model, layer, "mlp_out")).weight)],
                              track=True, label=f"the ROME edit of {subject!r}")
    try:
        with torch.no_grad():
            weight.add_(delta_w)
    except BaseException:
        snapshot.restore()
        raise
    return RomeEdit(dict(request), layer, k_star, v_star, delta_w, v.losses, snapshot)

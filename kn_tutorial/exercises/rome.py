"""Checks for the exercises of chapter 6, "Editing a fact with ROME" (Meng et al., 2022).
Notation: W [d_model, d_ff] with W k = v (bias left out), C = E[k kᵀ], the new pair (k*, v*),
Ŵ = W + Λ (C⁻¹k*)ᵀ with Λ = (v* − W k*) / ((C⁻¹k*)ᵀ k*).

    check_k_star(k_star, model, tokenizer)            # the subject's key over prefixes
    check_v_star_loss(v_star_loss)                    # the loss that v* minimises: NLL + KL + decay
    check_rank_one_update(rank_one_update)            # the closed form
    check_efficacy(efficacy, model, tokenizer, case)  # ES and EM of one case

Each runs the student's function through `harness.call` (weights and inputs restored, a time
limit, the package's own function disabled) on several cases, one of them never shown in the
chapter. It returns True when the function matches the reference, prints a reminder and
returns None (nothing for a notebook to print) while the stub still raises NotImplementedError, and raises an ExerciseError
saying what differs otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import evaluation, memit, rome
from ..models import d_ff, n_layers
from .harness import NOT_DONE, ExerciseError, call, close, is_close, number_result, tensor_result

RANK_ONE_SOLUTIONS = (rome.rank_one_update, rome.apply_rank_one, rome.lstsq_update, memit.solve_update)


def _problem(seed: int, d_model: int = 5, d_ff: int = 12, n: int = 300, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(d_ff, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d_ff, dtype=torch.float64)[:, None]
    out = (torch.randn(d_model, d_ff, generator=g, dtype=torch.float64), keys @ keys.T / n,
           torch.randn(d_ff, generator=g, dtype=torch.float64), torch.randn(d_model, generator=g, dtype=torch.float64))
    return tuple(t.to(dtype) for t in out)


def reference_rank_one(weight, mom2, k_star, v_star) -> torch.Tensor:
    """Ŵ in float64 (the package's rank_one_update on a copy)."""
    w = weight.double().clone()
    rome.rank_one_update(w, mom2.double(), k_star.double(), v_star.double() - w @ k_star.double())
    return w


def check_rank_one_update(rank_one_update) -> bool | None:
    """rank_one_update(W, C, k_star, v_star) -> Ŵ (a new tensor; W unchanged): three float64
    problems and a float32 one (not shown in the chapter), compared at the dtype's tolerance."""
    cases = [(f"float64 problem {seed}", _problem(seed)) for seed in range(3)]
    cases.append(("a float32 problem", _problem(11, d_model=7, d_ff=16, dtype=torch.float32)))
    for where, (weight, mom2, k_star, v_star) in cases:
        got = call(rank_one_update, weight, mom2, k_star, v_star, forbid=RANK_ONE_SOLUTIONS,
                   what="my_rank_one_update")
        if got is NOT_DONE:
            return None
        got = tensor_result(got, weight.shape, "my_rank_one_update", "Ŵ, [d_model, d_ff]")
        want = reference_rank_one(weight, mom2, k_star, v_star)
        if not is_close(got, want, weight.dtype):
            hint = ""
            w, c, k, v = (t.double() for t in (weight, mom2, k_star, v_star))
            if is_close(got.double() @ k, v, weight.dtype):
                hint = (" Your Ŵ satisfies Ŵk* = v*, but it is not the smallest change: the direction of the "
                        "update must be C⁻¹k*, not k* itself.")
            elif is_close(got, reference_rank_one(w, c, k, v + w @ k), weight.dtype):
                hint = " Λ uses the residual v* − W k*, not v* itself."
            close(got, want, where, hint + " Recall u = C⁻¹k* (torch.linalg.solve), Λ = (v* − W k*) / (uᵀ k*), "
                  "Ŵ = W + Λ uᵀ (torch.outer).", weight.dtype)
    print("Correct: your update is ROME's closed form (three float64 problems and a float32 one).")
    return True


def check_k_star(k_star, model, tokenizer, prompt: str = "{} lies on the continent of", subject: str = "Kuwait") -> bool | None:
    """k_star(model, tokenizer, prompt, subject, layer, prefixes) -> [d_ff]: the key at the subject's
    last token, averaged over the prompts prefix + prompt.format(subject); checked at two layers
    and on a second request whose prefix mentions the subject."""
    prefixes = rome.sample_prefixes(model, tokenizer, ((5, 3),), seed=0)
    cases = [(prompt, subject, layer, prefixes) for layer in sorted({0, n_layers(model) // 2})]
    cases.append(("The capital of {} is", "Peru", n_layers(model) - 1, ["", "Peru is far away. "]))
    for text, subj, layer, pre in cases:
        got = call(k_star, model, tokenizer, text, subj, layer, pre, model=model,
                   forbid=(rome.compute_k_star, memit.compute_keys), what="my_k_star")
        if got is NOT_DONE:
            return None
        got = tensor_result(got, (d_ff(model),), "my_k_star", "k*, [d_ff]", dtype=torch.float32)
        want = rome.compute_k_star(model, tokenizer, text, subj, layer, pre).cpu()
        close(got, want, f"{text.format(subj)!r} at layer {layer}",
              "Check: the site is 'key' (the input of the MLP output projection); the position is the "
              "subject's LAST token (kn_tutorial.tokens.subject_span with occurrence=-1, since a prefix may "
              "mention the subject too); the mean is over all prefixes, including the empty one.",
              factor=5.0)  # batched (padded) and one-by-one runs differ in float32 rounding
    print("Correct: your k* matches the reference at two layers and on a prefix that names the subject.")
    return True


# ---- the loss that v* minimises --------------------------------------------------------------------

def reference_v_star_loss(target_logprobs, kl_after, kl_before, delta, mlp_norm, kl_factor, weight_decay):
    """ROME's loss as the paper's code computes it (Meng et al., 2022; kmeng01/rome, rome/compute_v.py),
    and `rome.compute_v_star` with its default hparams: mean over prompts of the mean NLL over the
    target's tokens, + kl_factor · KL(P_after ‖ P_before) averaged over the KL prompts,
    + weight_decay · ‖δ‖ / ‖m‖².

    F.kl_div(input, target) sums P_target (log P_target − input), so KL(after ‖ before) is
    F.kl_div(kl_before, kl_after), the paper's `kl_div(kl_distr_init, kl_log_probs)`."""
    nll = -target_logprobs.mean(1).mean()
    kl = F.kl_div(kl_before, kl_after, log_target=True, reduction="batchmean")
    return nll + kl_factor * kl + weight_decay * delta.norm() / mlp_norm ** 2


def _loss_case(seed: int, n_prompts: int, n_tokens: int, n_kl: int, vocab: int = 11, d: int = 6):
    g = torch.Generator().manual_seed(seed)
    target = torch.log_softmax(torch.randn(n_prompts, vocab, generator=g), -1)[:, :n_tokens].clone()
    after = torch.log_softmax(torch.randn(n_kl, vocab, generator=g), -1)
    before = torch.log_softmax(torch.randn(n_kl, vocab, generator=g), -1)
    delta = torch.randn(d, generator=g)
    return target, after, before, delta, 2.0 + seed, 0.0625 * (seed + 1), 0.5


def check_v_star_loss(v_star_loss) -> bool | None:
    """v_star_loss(target_logprobs [n, |o*|], kl_after [n_kl, vocab], kl_before [n_kl, vocab], delta [d],
    mlp_norm, kl_factor, weight_decay) -> the scalar loss, differentiable in delta; four random cases
    (one with a one-token target and one KL prompt, one with three of each)."""
    for seed, shape in enumerate([(4, 2, 1), (3, 1, 1), (5, 3, 3), (2, 4, 2)]):
        target, after, before, delta, norm, factor, decay = _loss_case(seed, *shape)
        delta.requires_grad_(True)
        got = call(v_star_loss, target, after, before, delta, norm, factor, decay, what="my_v_star_loss",
                   forbid=(rome.compute_v_star,))
        if got is NOT_DONE:
            return None
        if not isinstance(got, torch.Tensor):
            number_result(got, "my_v_star_loss", "a scalar tensor")  # None / wrong type: one sentence
            raise ExerciseError("my_v_star_loss returned a Python number: return the loss as a tensor, so that "
                                "loss.backward() reaches δ (no .item()).")
        value = number_result(got, "my_v_star_loss", "a scalar tensor")
        want = reference_v_star_loss(target, after, before, delta, norm, factor, decay)
        if not is_close(torch.tensor(value), want.detach()):
            nll = -target.mean(1).mean()
            kl_right = F.kl_div(before, after, log_target=True, reduction="batchmean")  # KL(after ‖ before)
            kl_wrong_direction = F.kl_div(after, before, log_target=True, reduction="batchmean")  # KL(before ‖ after)
            hints = {
                " The KL is the wrong way round: the paper's code uses KL(P_after ‖ P_before) = "
                "Σ P_after (log P_after − log P_before).":
                    nll + factor * kl_wrong_direction + decay * delta.norm() / norm ** 2,
                " The decay term is ‖δ‖ / ‖m‖² (a norm, not a squared norm).":
                    nll + factor * kl_right + decay * delta.norm() ** 2 / norm ** 2,
                " Average the log-probabilities over the target's tokens (length-normalised), not sum them.":
                    -target.sum(1).mean() + factor * kl_right + decay * delta.norm() / norm ** 2,
                " Average the KL over the KL prompts (sum over the vocabulary, mean over prompts).":
                    nll + factor * (after.exp() * (after - before)).mean() + decay * delta.norm() / norm ** 2,
            }
            hint = next((h for h, wrong in hints.items() if is_close(torch.tensor(value), wrong.detach())), "")
            close(torch.tensor(value), want.detach(), f"case {seed} (target of {shape[1]} tokens, {shape[2]} KL prompts)",
                  hint)
        if not got.requires_grad:
            raise ExerciseError("the loss does not depend on δ through autograd (did you detach it or rebuild it "
                                "from numbers?): Adam needs loss.backward() to reach δ.")
        (grad,) = torch.autograd.grad(got, delta)
        (want_grad,) = torch.autograd.grad(want, delta)
        close(grad, want_grad, f"case {seed}: the gradient with respect to δ", "The value is right but the "
              "gradient is not: keep every term a function of δ.")
    print("Correct: NLL + kl_factor · KL(after ‖ before) + decay · ‖δ‖/‖m‖², with its gradient, on four cases.")
    return True


# ---- efficacy ------------------------------------------------------------------------------------

def _variants(case: dict) -> list[tuple[str, dict]]:
    """The case, the case with its two objects swapped (ES flips), and the case with another new object."""
    rw = case["requested_rewrite"]
    swapped = {**case, "requested_rewrite": {**rw, "target_new": rw["target_true"], "target_true": rw["target_new"]}}
    other = {**case, "requested_rewrite": {**rw, "target_new": {"str": "South America"}}}
    return [("the chapter's case", case), ("the same case with o* and o_c swapped", swapped),
            ("the case with o* = 'South America' (two tokens)", other)]


def check_efficacy(efficacy, model, tokenizer, case: dict) -> bool | None:
    """efficacy(model, tokenizer, case) -> (ES, EM) for the case's rewrite prompt: ES = 1.0 if
    P(o*) > P(o_c) else 0.0, EM = P(o*) − P(o_c), P the length-normalised target probability.
    Checked on the case, on the case with its objects swapped and with a two-token new object."""
    for where, variant in _variants(case):
        got = call(efficacy, model, tokenizer, variant, model=model, forbid=(evaluation.evaluate_cases,),
                   what="my_efficacy")
        if got is NOT_DONE:
            return None
        if got is None or not isinstance(got, (tuple, list)) or len(got) != 2:
            shown = "None (did you forget the `return` statement?)" if got is None else f"a {type(got).__name__}"
            raise ExerciseError(f"my_efficacy returned {shown}; expected a pair (ES, EM) of two floats.")
        es, em = number_result(got[0], "my_efficacy's ES", "0.0 or 1.0"), number_result(got[1], "my_efficacy's EM")
        (row,) = evaluation.evaluate_cases(model, tokenizer, [variant])
        if es != row["ES"] or abs(em - row["EM"]) > 1e-4:
            raise ExerciseError(
                f"{where}: expected ES {row['ES']:.0f}, EM {row['EM']:.5f}; got ES {es:.0f}, EM {em:.5f}. Check: "
                "each target is scored with its leading space; a multi-token target by teacher forcing, P = exp(mean "
                "over its tokens of log P(o_j | prompt, o_<j)) (kn_tutorial.scoring.score's 'mean_logprob').")
    print("Correct: ES and EM match evaluate_cases on the case, with its objects swapped, and with a two-token object.")
    return True

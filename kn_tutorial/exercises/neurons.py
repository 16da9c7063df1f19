"""Checks for the exercises of chapter 4, "Knowledge neurons" (Dai et al., 2022). Notation:
Attr_j(w_i^(l)) the attribution of neuron i of layer l on prompt j of a fact's n prompts;
coarse neurons Attr_j > t · max Attr_j; knowledge neurons: coarse for more than p·n prompts.

    check_refine(refine)                                  # threshold, then share of prompts
    check_adapt_p(adapt_p)                                # the adaptive p
    check_kn_update(kn_update, model, tokenizer)          # Dai et al.'s update of value slots
    check_scaled_probability(fn, model, tokenizer)        # suppressing and amplifying neurons

Each runs the student's function through `harness.call` (weights and inputs restored, a time
limit, the package's own function disabled) on several cases, one of them never shown in the
chapter. It returns True when the function matches the reference, prints a reminder and
returns None (nothing for a notebook to print) while the stub still raises NotImplementedError, and raises an ExerciseError
saying what differs otherwise.
"""
from __future__ import annotations

import torch

from .. import neurons as reference
from ..models import d_ff, module_name, n_layers, value_matrix
from ..weights import preserve
from .harness import NOT_DONE, ExerciseError, call, number_result

REFINERS = (reference.refine, reference.prompt_counts, reference.coarse_mask, reference.shared_neurons)


def _attribution_cases() -> list[torch.Tensor]:
    """Noise plus neurons shared by many prompts (what refinement should find)."""
    g = torch.Generator().manual_seed(0)
    cases = []
    for n in (4, 7, 10):
        attr = 0.1 * torch.randn(n, 3, 32, generator=g) ** 3  # [n, L, d_ff]
        share = torch.rand(n, 4, generator=g)  # prompt j uses shared neuron k when share < 0.2 k + 0.1
        for k, (layer, neuron) in enumerate([(0, 3), (1, 5), (2, 7), (2, 30)]):
            attr[:, layer, neuron] += (share[:, k] < 0.2 * k + 0.1).float() * (0.5 + torch.rand(n, generator=g))
        cases.append(attr)
    scaled = cases[1].clone()
    scaled[2] *= 100  # one prompt with much larger scores: the threshold is per prompt
    negative = cases[2].clone()
    negative[5] = -negative[5].abs()  # a prompt whose best score is negative keeps nothing
    return cases + [scaled, negative]


def check_refine(refine) -> bool | None:
    """refine(attributions [n, L, d_ff], threshold, p) -> the knowledge neurons as (layer, neuron) pairs."""
    for k, attr in enumerate(_attribution_cases()):
        for p in (0.3, 0.5, 0.7):
            got = call(refine, attr.clone(), 0.2, p, forbid=REFINERS, what="my_refine")
            if got is NOT_DONE:
                return None
            if got is None:
                raise ExerciseError("my_refine returned None: did you forget the `return` statement? Expected a list "
                                    "of (layer, neuron) pairs.")
            try:
                got = {(int(l), int(i)) for l, i in got}
            except (TypeError, ValueError):
                raise ExerciseError(f"my_refine returned {type(got).__name__} items that are not (layer, neuron) "
                                    f"pairs of ints.") from None
            want = set(reference.refine(attr, 0.2, p))
            if got != want:
                counts = reference.prompt_counts(attr, 0.2)
                hint = ""
                global_top = attr.max()
                by_global = {(l, i) for l, i in (((attr > 0.2 * global_top).sum(0) > p * attr.shape[0]).nonzero().tolist())}
                if got == by_global:
                    hint = " You compared with the largest score of all prompts; t multiplies each prompt's own maximum."
                elif got == {(l, i) for l, i in (counts >= p * attr.shape[0] - 1e-9).nonzero().tolist()}:
                    hint = " A neuron must be kept by MORE than p·n prompts (strictly)."
                raise ExerciseError(
                    f"case {k} (n = {attr.shape[0]} prompts), p = {p}: you returned {len(got)} neurons, expected "
                    f"{len(want)}; missing {sorted(want - got)[:5]}, extra {sorted(got - want)[:5]}.{hint} Steps: per "
                    f"prompt keep Attr > t · (that prompt's max), none if the max is not positive; count the prompts "
                    f"that keep each neuron; return the neurons with count > p · n.")
    print("Correct: your refinement matches the package's on five attribution sets and three values of p.")
    return True


def _count_cases():
    one = lambda rows: torch.tensor([rows])  # noqa: E731 (one layer of counts)
    edge = one([20] * 8 + [19, 19, 18, 18, 17, 17, 16, 16, 15, 15])  # the mean stays above 5 up to p = 0.95
    return [
        ([one([10, 10, 9, 9, 8, 8, 8, 8]), one([10, 9, 9, 9, 9, 8, 8, 8]), one([9, 9, 8, 8, 8, 8, 8, 8])], [10, 10, 10]),
        ([one([5, 3, 3, 3, 0]), one([4, 3, 3, 0, 0])], [5, 5]),
        ([one([5, 4, 4, 3, 3, 1]), one([5, 5, 3, 2, 0, 0])], [5, 5]),
        ([one([15] * 6 + [3])], [20]),  # 6 neurons at p = 0.7, none at 0.75: the mean jumps over [2, 5]
        ([edge], [20]),                 # p would reach 1: stop at 0.95, the closest
    ]


def check_adapt_p(adapt_p) -> bool | None:
    """adapt_p(counts, n_prompts) -> p: counts is a list of int [L, d_ff] tensors (prompts per
    neuron for each fact), n_prompts the list of n; start at 0.7, move by 0.05 until the mean
    number of neurons with count > p·n lies in [2, 5]; when the next p would leave [0, 1) or
    come back to a p already tried, return the p tried whose mean was closest to [2, 5].
    Five cases: moving up, down, not at all, jumping over the range, and reaching the edge."""
    for k, (counts, n) in enumerate(_count_cases()):
        got = call(adapt_p, [c.clone() for c in counts], list(n), forbid=(reference.adapt_p, reference.mean_count),
                   what="my_adapt_p")
        if got is NOT_DONE:
            return None
        got = number_result(got, "my_adapt_p", "p, a float")
        want = reference.adapt_p(counts, n)
        if abs(got - want.p) > 1e-6:
            trail = ", ".join(f"p = {p:.2f}: {m:.2f}" for p, m in want.history)
            stop = "" if want.converged else (" This walk does not converge: stop when the next p would leave "
                                              "[0, 1) or return to a p you tried, and return the p whose mean was "
                                              "closest to [2, 5].")
            raise ExerciseError(
                f"case {k}: got p = {got:.2f}, expected {want.p:.2f}. The mean number of neurons per fact "
                f"along the way: {trail}.{stop} Move p up while the mean is above 5, down while below 2; round p "
                f"(0.7 + 0.05 + 0.05 is not exactly 0.8 in floating point).")
    print("Correct: your adaptive p matches on five sets (up, down, not at all, over the range, to the edge).")
    return True


KN_CASES = [  # (neurons, old, new, lambda_old, lambda_new); the second is not shown in the chapter
    (((0, 3), (1, 7)), " Asia", " Europe", 1.0, 8.0),
    (((2, 5), (2, 9), (5, 0)), " Africa", " Oceania", 0.5, 3.0),
]


def check_kn_update(kn_update, model, tokenizer) -> bool | None:
    """kn_update(model, tokenizer, neurons, old, new, lambda_old, lambda_new) changes the value
    slots of `neurons` in place by Dai et al.'s rule; every other parameter (other value rows,
    biases, embeddings) must stay exactly as it was. The weights are snapshotted (on the CPU)
    before each case and restored bit for bit after it, whatever the function did."""
    value_weights = {module_name(model, layer, "mlp_out") + ".weight": layer for layer in range(n_layers(model))}
    for neurons, old, new, lambda_old, lambda_new in KN_CASES:
        request = {"prompt": "{} lies on the continent of", "subject": "Kuwait",
                   "target_new": {"str": new.strip()}, "target_true": {"str": old.strip()}}
        base = {(layer, i): value_matrix(model, layer)[i].detach().clone() for layer, i in neurons}
        with reference.kn_edit(model, tokenizer, request, neurons=list(neurons), lambda_old=lambda_old,
                               lambda_new=lambda_new):
            want = {(layer, i): value_matrix(model, layer)[i].detach().clone() for layer, i in neurons}
        before = {layer: value_matrix(model, layer).detach().clone() for layer in {l for l, _ in neurons}}
        with preserve(model, offload=True) as snapshot:  # restores the weights at the end of the case
            with torch.no_grad():
                got = call(kn_update, model, tokenizer, [tuple(n) for n in neurons], old, new, lambda_old,
                           lambda_new, forbid=(reference.kn_edit,), what="my_kn_update")
            if got is NOT_DONE:
                return None
            _compare_kn_update(snapshot, value_weights, neurons, base, want, before, model)
    print("Correct: your update matches Dai et al.'s rule on two sets of neurons, and changes nothing else "
          "(the weights are restored).")
    return True


def _compare_kn_update(snapshot, value_weights, neurons, base, want, before, model) -> None:
    changed = snapshot.changed()
    others = [name for name in changed if name not in value_weights]
    if others:
        raise ExerciseError(f"neurons {list(neurons)}: you changed {others[:3]}; only the value slots (rows of "
                            f"value_matrix) of the given neurons should change, not biases or embeddings.")
    for name in changed:
        layer = value_weights[name]
        if layer not in before:
            raise ExerciseError(f"you changed the value slots of layer {layer}, which has none of the neurons "
                                f"{list(neurons)}.")
        moved = (value_matrix(model, layer).detach() - before[layer]).abs().amax(1).nonzero().flatten().tolist()
        mine = {i for l, i in neurons if l == layer}
        extra = [i for i in moved if i not in mine]
        if extra:
            raise ExerciseError(f"layer {layer}: you changed value rows {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                                f"too; only the rows of the given neurons {sorted(mine)} should change (index the "
                                f"row: value_matrix(model, layer)[i]).")
    for (layer, i), want_row in want.items():
        got_row = value_matrix(model, layer)[i].detach()
        if torch.allclose(got_row, want_row, rtol=2e-5, atol=1e-6):
            continue
        hint = ""
        if torch.equal(got_row, base[layer, i]):
            hint = " The weights did not change: edit the parameter in place (value_matrix is a view)."
        elif torch.allclose(got_row - base[layer, i], -(want_row - base[layer, i]), rtol=1e-4, atol=1e-5):
            hint = " The sign is flipped: subtract the old object's embedding, add the new one's."
        raise ExerciseError(
            f"value slot {(layer, i)}: differs from the reference by up to {(got_row - want_row).abs().max():.3g}.{hint} "
            f"v_i ← v_i − λ_old · e(old) + λ_new · e(new), e = rows of unembedding_matrix(model) for the first "
            f"token of each object, with its leading space.")


SCALE_CASES = [  # (prompt, target, neurons, factor); P is not saturated here, so every neuron counts
    ("People in Peru speak", " Spanish", ((0, 345), (0, 417), (3, 418), (4, 711)), 0.0),
    ("People in Peru speak", " Spanish", ((0, 345), (0, 417), (3, 418), (4, 711)), 2.0),
    ("People in Peru speak", " Spanish", ((0, 610), (5, 821), (1, 706), (7, 0)), 0.5),  # not in the chapter
]


def check_scaled_probability(scaled_probability, model, tokenizer) -> bool | None:
    """scaled_probability(model, tokenizer, prompt, target, neurons, factor) -> P of the target's first
    token when the activations of `neurons` ((layer, neuron) pairs) at the last prompt token are
    multiplied by `factor` (Dai et al.'s suppression, factor 0, and amplification, factor 2)."""
    for prompt, target, neurons, factor in SCALE_CASES:
        neurons = tuple((layer % n_layers(model), i % d_ff(model)) for layer, i in neurons)  # any model's shape
        got = call(scaled_probability, model, tokenizer, prompt, target, [tuple(n) for n in neurons], factor,
                   model=model, forbid=(reference.scaled_scores, reference.scale_value_slots), what="my_scaled_probability")
        if got is NOT_DONE:
            return None
        got = number_result(got, "my_scaled_probability", "a probability")
        want = reference.scaled_scores(model, tokenizer, [prompt], [target], [list(neurons)], factor)["first_prob"][0].item()
        if abs(got - want) > 1e-5 + 1e-4 * abs(want):
            every = reference.scaled_scores(model, tokenizer, [prompt], [target], [list(neurons)], factor,
                                            positions="all")["first_prob"][0].item()
            hint = ""
            if abs(got - every) <= 1e-5 + 1e-4 * abs(every):
                hint = " You scaled the activations at every position; Dai et al. scale them at the last prompt token only."
            raise ExerciseError(
                f"{prompt!r}, neurons {list(neurons)} × {factor}: expected P = {want:.6f}, got {got:.6f}.{hint} Patch the "
                f"site 'key' of each layer that has neurons (kn_tutorial.hooks.patch), multiply those neurons' "
                f"activations at the last position by the factor, and read the softmax of the last logits at the "
                f"target's first token (leading space).")
    print("Correct: your suppressed and amplified probabilities match, on three neuron sets and factors.")
    return True

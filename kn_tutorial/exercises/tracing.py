"""Checks for the exercises of chapter 5, "Locating facts with causal tracing" (Meng et al., 2022).
Notation: subject tokens [a, b), noise ε on their embeddings, P(o) clean, P_*(o) corrupted,
P_{*, clean h_t^l}(o) with the hidden state of token t after block l restored.

    check_token_roles(token_roles)                         # the paper's six token roles
    check_corrupted(corrupted_probability, model, tokenizer) # the corrupted run
    check_restore_hidden(restore_hidden, model, tokenizer) # one restored run
    check_aie_by_role(aie_by_role)                         # the average indirect effect over facts
    check_severed(restore_severed, model, tokenizer)       # a restored run, later MLPs frozen

Each runs the student's function through `harness.call` (weights and inputs restored, a time
limit, the package's own function disabled) on several cases, one of them never shown in the
chapter. It returns True when the function matches the reference, prints a reminder and
returns None (nothing for a notebook to print) while the stub still raises NotImplementedError, and raises an ExerciseError
saying what differs otherwise.
"""
from __future__ import annotations

import torch

from .. import tracing
from ..models import d_model, n_layers
from ..scoring import target_ids
from ..tokens import subject_span
from ..tracing import ROLES, noise_level, restore_states, subject_noise
from ..tracing import token_roles as reference_token_roles
from .harness import NOT_DONE, ExerciseError, call, close, is_close, number_result, tensor_result

TRACERS = (tracing.restore_states, tracing.trace_batch, tracing.trace, tracing.average_effects,
           tracing.severed_effects)


def check_token_roles(token_roles) -> bool | None:
    """token_roles(span, seq_len) must list, for each of the six roles, its token positions;
    five spans, two of them (a one-token subject at the end, a subject at the start) not in the text."""
    for span, seq_len in [((2, 5), 9), ((0, 1), 4), ((0, 3), 7), ((1, 3), 4), ((3, 4), 6), ((5, 6), 7), ((4, 5), 5)]:
        got = call(token_roles, span, seq_len, forbid=(reference_token_roles,), what="my_token_roles")
        if got is NOT_DONE:
            return None
        want = reference_token_roles(span, seq_len)
        if got is None:
            raise ExerciseError("my_token_roles returned None: did you forget the `return` statement? Expected a "
                                "list of 6 lists of positions.")
        try:
            got = [sorted(int(p) for p in positions) for positions in got]
        except (TypeError, ValueError):
            raise ExerciseError(f"my_token_roles returned {got!r}; expected a list of 6 lists of positions.") from None
        if len(got) != len(ROLES):
            raise ExerciseError(f"my_token_roles returned {len(got)} lists; expected one per role, {len(ROLES)}.")
        for role, g, w in zip(ROLES, got, want):
            if g != w:
                raise ExerciseError(
                    f"span {span} in {seq_len} tokens: {role!r} should be {w}, got {g}. Remember: spans are "
                    f"half-open [a, b); a one-token subject is both first and last subject token; 'further tokens' "
                    f"stop before the last token; a subject at the very end has no subsequent token.")
    print("Correct: the six token roles match the reference.")
    return True
def _case(model, tokenizer, prompt: str, subject: str, target: str, samples: int, seed: int):
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    span = subject_span(tokenizer, prompt, subject)
    noise = subject_noise(torch.tensor(ids), span, d_model(model), samples, noise_level(model, 3.0), seed)
    return torch.tensor(ids), span, noise, target_ids(tokenizer, target)[0]


def _compare(got, want, what: str, hint: str) -> None:
    got = number_result(got, "your function", "P(o), one number")
    if abs(got - want) > 1e-6 + 1e-3 * abs(want):  # the reference runs batched, in another order
        raise ExerciseError(f"{what}: expected P(o) = {want:.5f}, got {got:.5f}. {hint}")


@torch.no_grad()
def check_corrupted(corrupted_probability, model, tokenizer, samples: int = 2, seed: int = 0) -> bool | None:
    """corrupted_probability(model, input_ids, noise, target_id) -> P_*(o): the probability of
    target_id at the last position when noise ([T, d_model], zero outside the subject) is added
    to the input of block 0. Two noise draws on the chapter's fact and on another (not shown)."""
    L = n_layers(model)
    for prompt, subject, target in (("Kuwait lies on the continent of", "Kuwait", "Asia"),
                                    ("The capital of Peru is", "Peru", "Lima")):
        ids, span, noise, target_id = _case(model, tokenizer, prompt, subject, target, samples, seed)
        nothing = torch.zeros(L, len(ids), dtype=torch.bool)
        want = restore_states(model, ids, span, nothing, target=target_id, samples=samples, seed=seed)["corrupted"]
        for j in range(samples):
            got = call(corrupted_probability, model, ids, noise[j], target_id, model=model, forbid=TRACERS,
                       what="my_corrupted_probability")
            if got is NOT_DONE:
                return None
            _compare(got, want[j].item(), f"{prompt!r}, noise sample {j}",
                     "Check: the noise is added to the input of block 0 (site 'resid_pre', layer 0: token plus "
                     "position embeddings), at every position (it is zero outside the subject), once; P is the "
                     "softmax of the LAST position's logits at target_id.")
    print("Correct: your corrupted runs match the reference on two facts and two noise draws each.")
    return True


@torch.no_grad()
def check_restore_hidden(restore_hidden, model, tokenizer, prompt: str = "Kuwait lies on the continent of",
                         subject: str = "Kuwait", target: str = "Asia", samples: int = 2, seed: int = 0) -> bool:
    """restore_hidden(model, input_ids, noise, target_id, layer, position) -> P(o) for one noise
    draw (noise: [T, d_model]) with the hidden state (block output) at (layer, position) restored."""
    ids, span, noise, target_id = _case(model, tokenizer, prompt, subject, target, samples, seed)
    L, T = n_layers(model), len(ids)
    for layer, position in [(0, span[1] - 1), (L // 2, span[1] - 1), (L - 1, T - 1), (L // 2, T - 2), (1, span[0])]:
        mask = torch.zeros(L, T, dtype=torch.bool)
        mask[layer, position] = True
        want = restore_states(model, ids, span, mask, target=target_id, samples=samples, seed=seed)["probs"][0]
        for j in range(samples):
            got = call(restore_hidden, model, ids, noise[j], target_id, layer, position, model=model,
                       forbid=TRACERS, what="my_restore_hidden")
            if got is NOT_DONE:
                return None
            _compare(got, want[j].item(), f"layer {layer}, position {position}, noise sample {j}",
                     "Check: noise added to the input of block 0 ('resid_pre', layer 0) at every position "
                     "(it is zero outside the subject); the clean hidden state recorded at the block's output "
                     "('hidden') and written only at `position`; P from the softmax of the last position's logits.")
    print("Correct: your restored runs match the reference.")
    return True


@torch.no_grad()
def check_severed(restore_severed, model, tokenizer, prompt: str = "Kuwait lies on the continent of",
                  subject: str = "Kuwait", target: str = "Asia", samples: int = 2, seed: int = 0) -> bool:
    """restore_severed(model, input_ids, noise, target_id, layer, position) -> P(o) with the hidden
    state at (layer, position) restored and the MLP outputs at `position` of every later layer
    frozen at their values in the corrupted run (same noise)."""
    ids, span, noise, target_id = _case(model, tokenizer, prompt, subject, target, samples, seed)
    L, T = n_layers(model), len(ids)
    position = span[1] - 1
    for layer in (0, L // 2, L - 2):
        mask = torch.zeros(L, T, dtype=torch.bool)
        mask[layer, position] = True
        frozen = torch.zeros(L, T, dtype=torch.bool)
        frozen[layer + 1:, position] = True
        want = restore_states(model, ids, span, mask, target=target_id, sever="mlp", frozen=frozen,
                              samples=samples, seed=seed)["probs"][0]
        for j in range(samples):
            got = call(restore_severed, model, ids, noise[j], target_id, layer, position, model=model,
                       forbid=TRACERS, what="my_restore_severed")
            if got is NOT_DONE:
                return None
            _compare(got, want[j].item(), f"layer {layer}, last subject token, noise sample {j}",
                     "Check: the frozen MLP outputs come from a corrupted run with the same noise and NO "
                     "restoration; only layers after `layer`, only at `position`, are frozen.")
    print("Correct: your severed runs match the reference.")
    return True


# ---- the average indirect effect by token role ---------------------------------------------------

def reference_aie_by_role(effects: list[torch.Tensor], spans: list[tuple[int, int]]) -> torch.Tensor:
    """[6, L]: for each role, the mean over the facts that have it of the mean of the fact's IE
    over the role's positions (as tracing.average_effects)."""
    L = effects[0].shape[1]
    sums, counts = torch.zeros(len(ROLES), L, dtype=torch.float64), torch.zeros(len(ROLES), dtype=torch.float64)
    for grid, span in zip(effects, spans):
        for r, positions in enumerate(reference_token_roles(span, grid.shape[0])):
            if positions:
                sums[r] += grid[positions].double().mean(0)
                counts[r] += 1
    return sums / counts.clamp_min(1)[:, None]


def _effect_cases(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shown = [((1, 3), 6), ((0, 1), 5), ((2, 5), 9)]
    unseen = [((0, 1), 2), ((3, 4), 4), ((1, 2), 7)]  # no middle tokens anywhere, a subject right before the end
    out = []
    for spans_lengths in (shown, unseen):
        effects = [torch.rand(T, 4, generator=g) - 0.2 for _, T in spans_lengths]
        out.append((effects, [span for span, _ in spans_lengths]))
    return out


def check_aie_by_role(aie_by_role) -> bool | None:
    """aie_by_role(effects, spans) -> [6, L]: effects is a list of per-fact IE grids [T_i, L]
    (prompts of different lengths), spans their subjects' [a, b). Two sets of facts, the second
    (not in the chapter) with roles that no fact has, which must come out 0."""
    for k, (effects, spans) in enumerate(_effect_cases()):
        got = call(aie_by_role, [e.clone() for e in effects], list(spans), forbid=TRACERS[3:], what="my_aie_by_role")
        if got is NOT_DONE:
            return None
        want = reference_aie_by_role(effects, spans)
        got = tensor_result(got, want.shape, "my_aie_by_role", "[6 roles, L layers]").double()
        if torch.isnan(got).any():
            raise ExerciseError(f"set {k}: your result has NaN where no fact has the role (0 / 0): a role that no "
                                f"fact has gets 0.")
        if not is_close(got, want, torch.float32):
            pooled = torch.zeros_like(want)
            npos = torch.zeros(len(ROLES), 1, dtype=torch.float64)
            for grid, span in zip(effects, spans):
                for r, positions in enumerate(reference_token_roles(span, grid.shape[0])):
                    pooled[r] += grid[positions].double().sum(0)
                    npos[r] += len(positions)
            hint = ""
            if is_close(got, pooled / npos.clamp_min(1), torch.float32):
                hint = ("You pooled all positions of a role over all facts; average within each fact first, so that a "
                        "fact with many middle tokens counts once.")
            elif is_close(got, reference_aie_by_role(effects, spans) * torch.tensor(
                    [sum(bool(p) for p in (reference_token_roles(s, e.shape[0])[r] for e, s in zip(effects, spans)))
                     for r in range(len(ROLES))], dtype=torch.float64)[:, None] / len(effects), torch.float32):
                hint = "Divide by the number of facts that HAVE the role, not by all facts."
            close(got, want, f"fact set {k}", hint)
    print("Correct: the AIE by role matches tracing.average_effects' rule on both sets of facts.")
    return True

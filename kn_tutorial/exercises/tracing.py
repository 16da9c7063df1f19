"""Checks for the exercises of chapter 5, "Locating facts with causal tracing" (Meng et al., 2022).
Notation: subject tokens [a, b), noise ε on their embeddings, P(o) clean, P_*(o) corrupted,
P_{*, clean h_t^l}(o) with the hidden state of token t after block l restored.

    check_token_roles(token_roles)                         # exercise 1: the paper's six token roles
    check_restore_hidden(restore_hidden, model, tokenizer) # exercise 2: one restored run
    check_severed(restore_severed, model, tokenizer)       # exercise 3: a restored run, later MLPs frozen

Each returns True when the student's function matches the reference, prints a reminder
and returns False while the stub still raises NotImplementedError, and raises an
AssertionError that says what differs otherwise.
"""
from __future__ import annotations

import torch

from ..models import d_model, n_layers
from ..scoring import target_ids
from ..tokens import subject_span
from ..tracing import ROLES, noise_level, restore_states, subject_noise
from ..tracing import token_roles as reference_token_roles

from . import run_stub as _run


def check_token_roles(token_roles) -> bool:
    """token_roles(span, seq_len) must list, for each of the six roles, its token positions."""
    for span, seq_len in [((2, 5), 9), ((0, 1), 4), ((0, 3), 7), ((1, 3), 4), ((3, 4), 6)]:
        got = _run(token_roles, span, seq_len)
        if got is None:
            return False
        want = reference_token_roles(span, seq_len)
        got = [sorted(int(p) for p in positions) for positions in got]
        for role, g, w in zip(ROLES, got, want):
            assert g == w, (f"span {span} in {seq_len} tokens: {role!r} should be {w}, got {g}. Remember: spans are "
                             f"half-open [a, b); a one-token subject is both first and last subject token; "
                             f"'further tokens' stop before the last token.")
    print("Correct: the six token roles match the reference.")
    return True


def _case(model, tokenizer, prompt: str, subject: str, target: str, samples: int, seed: int):
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    span = subject_span(tokenizer, prompt, subject)
    noise = subject_noise(torch.tensor(ids), span, d_model(model), samples, noise_level(model, 3.0), seed)
    return torch.tensor(ids), span, noise, target_ids(tokenizer, target)[0]


def _compare(got, want, what: str, hint: str) -> None:
    got = float(got)
    assert abs(got - want) <= 1e-6 + 1e-3 * abs(want), f"{what}: expected P(o) = {want:.5f}, got {got:.5f}. {hint}"


@torch.no_grad()
def check_restore_hidden(restore_hidden, model, tokenizer, prompt: str = "Kuwait lies on the continent of",
                         subject: str = "Kuwait", target: str = "Asia", samples: int = 2, seed: int = 0) -> bool:
    """restore_hidden(model, input_ids, noise, target_id, layer, position) -> P(o) for one noise
    draw (noise: [T, d_model]) with the hidden state (block output) at (layer, position) restored."""
    ids, span, noise, target_id = _case(model, tokenizer, prompt, subject, target, samples, seed)
    L, T = n_layers(model), len(ids)
    for layer, position in [(0, span[1] - 1), (L // 2, span[1] - 1), (L - 1, T - 1), (L // 2, T - 2)]:
        mask = torch.zeros(L, T, dtype=torch.bool)
        mask[layer, position] = True
        want = restore_states(model, ids, span, mask, target=target_id, samples=samples, seed=seed)["probs"][0]
        for j in range(samples):
            got = _run(restore_hidden, model, ids, noise[j], target_id, layer, position)
            if got is None:
                return False
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
    for layer in (0, L // 2):
        mask = torch.zeros(L, T, dtype=torch.bool)
        mask[layer, position] = True
        frozen = torch.zeros(L, T, dtype=torch.bool)
        frozen[layer + 1:, position] = True
        want = restore_states(model, ids, span, mask, target=target_id, sever="mlp", frozen=frozen,
                              samples=samples, seed=seed)["probs"][0]
        for j in range(samples):
            got = _run(restore_severed, model, ids, noise[j], target_id, layer, position)
            if got is None:
                return False
            _compare(got, want[j].item(), f"layer {layer}, last subject token, noise sample {j}",
                     "Check: the frozen MLP outputs come from a corrupted run with the same noise and NO "
                     "restoration; only layers after `layer`, only at `position`, are frozen.")
    print("Correct: your severed runs match the reference.")
    return True

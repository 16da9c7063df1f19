"""Checks for the exercises of chapter 7, "MEMIT: editing thousands of facts at once" (Meng et al., 2023).
Notation: W: [d_model, d_ff] with W k + b = value; keys K = [k_1 ... k_n] (here rows of [n, d_ff]),
residuals R = [r_1 ... r_n] ([n, d_model]), C = E[k kᵀ], λ = mom2_update_weight;
ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹.

    check_joint_update(joint_update)          # exercise 1: the batched least-squares update
    check_rank_one_update(rank_one_update)    # exercise 2: one request, by Sherman-Morrison
    check_key_groups(key_groups)              # exercise 3: which requests share a key

Each returns True when the student's function matches the reference, prints a reminder and
returns False while the stub still raises NotImplementedError, and raises an AssertionError
that says what differs otherwise.
"""
from __future__ import annotations

import torch

from .. import memit as reference
from . import run_stub as _run


def _problem(n: int, d_model: int = 5, d_ff: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(300, d_ff, generator=g, dtype=torch.float64)
    mom2 = sample.T @ sample / 300
    keys = torch.randn(n, d_ff, generator=g, dtype=torch.float64)
    residuals = torch.randn(n, d_model, generator=g, dtype=torch.float64)
    return mom2, keys, residuals


def check_joint_update(joint_update) -> bool:
    """joint_update(mom2 [d_ff, d_ff], keys [n, d_ff], residuals [n, d_model], lam) -> ΔW [d_model, d_ff]."""
    for n, lam in ((1, 2.0), (4, 0.5), (30, 10.0)):
        mom2, keys, residuals = _problem(n, seed=n)
        got = _run(joint_update, mom2, keys, residuals, lam)
        if got is None:
            return False
        got = torch.as_tensor(got).double()
        want = reference.solve_update(mom2, keys, residuals, lam)
        if got.shape != want.shape:
            hint = " You returned ΔWᵀ: transpose it." if got.shape == want.T.shape else ""
            raise AssertionError(f"n={n}: got shape {tuple(got.shape)}, expected {tuple(want.shape)} "
                                 f"([d_model, d_ff]).{hint}")
        if not torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            hint = ""
            if torch.allclose(got, residuals.T @ keys @ torch.linalg.inv(mom2 + keys.T @ keys), rtol=1e-6):
                hint = " You left out λ: the prior term is λ·C."
            raise AssertionError(f"n={n}, λ={lam}: largest difference {(got - want).abs().max():.3g}.{hint} "
                                 "ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹ with K = keys.T ([d_ff, n]) and R = residuals.T.")
    print("Correct: your update matches R Kᵀ (λC + KKᵀ)⁻¹ for 1, 4 and 30 requests.")
    return True


def check_rank_one_update(rank_one_update) -> bool:
    """rank_one_update(mom2, k [d_ff], r [d_model], lam) -> ΔW, without solving against λC + kkᵀ."""
    for lam in (1e-8, 0.5, 20.0):
        mom2, keys, residuals = _problem(1, seed=7)
        got = _run(rank_one_update, mom2, keys[0], residuals[0], lam)
        if got is None:
            return False
        got = torch.as_tensor(got).double()
        want = reference.solve_update(mom2, keys, residuals, lam)
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-6, atol=1e-9):
            raise AssertionError(f"λ={lam}: your update differs from MEMIT's with one request. With u = C⁻¹k, "
                                 "Sherman-Morrison gives ΔW = r uᵀ / (λ + uᵀk).")
    print("Correct: one request gives ROME's direction C⁻¹k, scaled by 1 / (λ + kᵀC⁻¹k).")
    return True


REQUESTS = [
    {"prompt": "{} lies on the continent of", "subject": "Kuwait", "target_new": {"str": "Europe"}},
    {"prompt": "{} has its capital in", "subject": "Kuwait", "target_new": {"str": "Paris"}},
    {"prompt": "{} lies on the continent of", "subject": "Osaka", "target_new": {"str": "Africa"}},
    {"prompt": "The capital of {} is", "subject": "Kuwait", "target_new": {"str": "Lima"}},
    {"prompt": "The capital of {} is", "subject": "Peru", "target_new": {"str": "Oslo"}},
    {"prompt": "{} mostly speaks", "subject": "Peru", "target_new": {"str": "French"}},
]


def check_key_groups(key_groups) -> bool:
    """key_groups(requests) -> lists of request indices that share their key, in first-seen order."""
    got = _run(key_groups, REQUESTS)
    if got is None:
        return False
    want = reference.key_groups([reference.as_request(r) for r in REQUESTS])
    if [list(g) for g in got] != want:
        raise AssertionError(f"got {got}, expected {want}. The key is read at the subject's last token, so it "
                             "depends on the text up to the end of the subject: prompt.split('{}')[0] + subject.")
    print(f"Correct: {want}. Kuwait's first two requests share a key; 'The capital of Kuwait' does not.")
    return True

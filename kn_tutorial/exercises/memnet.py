"""Checks for the exercises of chapter 2, "End-to-end memory networks, and the FFN as an
unnormalised memory" (Sukhbaatar et al., 2015). Notation: m_i = sum_j l_j * A x_ij,
c_i = sum_j l_j * C x_ij, p = softmax(u m^T) (or f(u m^T)), o = sum_i p_i c_i.

    check_position_encoding(position_encoding)   # exercise 1: the weights l_kj
    check_memory_hop(memory_hop)                 # exercise 2: one masked hop, any coefficient function
    check_effective_number(effective_number)     # exercise 3: how many memories share the weight

Each returns True when the student's function matches the reference, prints a reminder
and returns False while the stub still raises NotImplementedError, and raises an
AssertionError that says what differs otherwise.
"""
from __future__ import annotations

import torch

from ..memnet import analysis as ref_analysis
from ..memnet import model as ref_model

from . import run_stub as _run


def check_position_encoding(position_encoding) -> bool:
    """position_encoding(J, d) -> [J, d] with l[j-1, k-1] = (1 - j/J) - (k/d)(1 - 2j/J)."""
    for J, d in ((1, 4), (4, 6), (7, 32)):
        got = _run(position_encoding, J, d)
        if got is None:
            return False
        got = torch.as_tensor(got, dtype=torch.float32)
        want = ref_model.position_encoding(J, d)
        if got.shape != want.shape:
            raise AssertionError(f"J={J}, d={d}: shape {tuple(got.shape)}, expected {tuple(want.shape)} "
                                 f"(one row per word j, one column per dimension k)")
        if not torch.allclose(got, want, atol=1e-5):
            hint = ""
            if torch.allclose(got, ref_model.position_encoding(J + 1, d)[1:], atol=1e-5) or \
                    torch.allclose(got, ref_model.position_encoding(J + 1, d)[:-1], atol=1e-5):
                hint = " Off by one? j and k both count from 1 in the paper."
            raise AssertionError(f"J={J}, d={d}: l differs from (1 - j/J) - (k/d)(1 - 2j/J) by up to "
                                 f"{(got - want).abs().max():.3g}.{hint}")
    print("Correct: l_kj matches the paper's position encoding for J = 1, 4, 7.")
    return True


def check_memory_hop(memory_hop, seed: int = 0) -> bool:
    """memory_hop(u, m, c, mask, coef) -> (p, o), as kn_tutorial.memnet.memory_read."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(5, 8, generator=gen)
    m, c = torch.randn(5, 6, 8, generator=gen), torch.randn(5, 6, 8, generator=gen)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[3, 1:] = False
    for coef in ref_model.COEFFICIENTS:
        got = _run(memory_hop, u, m, c, mask, coef)
        if got is None:
            return False
        p, o = got
        want_p, want_o = ref_model.memory_read(u, m, c, mask, coef)
        if p.shape != want_p.shape or o.shape != want_o.shape:
            raise AssertionError(f"{coef}: shapes p {tuple(p.shape)}, o {tuple(o.shape)}; expected "
                                 f"{tuple(want_p.shape)} and {tuple(want_o.shape)}")
        if (p[~mask].abs() > 1e-6).any():
            raise AssertionError(f"{coef}: empty memory slots (mask False) must get coefficient 0; "
                                 f"for softmax, set their scores to -inf before normalising")
        if not torch.allclose(p, want_p, atol=1e-5):
            raise AssertionError(f"{coef}: p differs by up to {(p - want_p).abs().max():.3g}. Scores are "
                                 f"u . m_i; softmax normalises over the memories (last axis) only.")
        if not torch.allclose(o, want_o, atol=1e-5):
            raise AssertionError(f"{coef}: p is right but o differs by up to {(o - want_o).abs().max():.3g}: "
                                 f"o = sum_i p_i c_i (the output memories c, not m)")
    print("Correct: p and o match for softmax, ReLU and GELU, with masked slots at 0.")
    return True


def check_effective_number(effective_number, seed: int = 0) -> bool:
    """effective_number(p) -> exp(entropy of p / sum p) over the last axis; 0 for all-zero rows."""
    gen = torch.Generator().manual_seed(seed)
    cases = {
        "one memory": torch.tensor([[0.0, 3.0, 0.0, 0.0]]),
        "two equal memories": torch.tensor([[2.0, 2.0, 0.0, 0.0]]),
        "all equal": torch.full((1, 5), 0.2),
        "random": torch.rand(4, 7, generator=gen),
        "nothing": torch.zeros(1, 3),
    }
    for name, p in cases.items():
        got = _run(effective_number, p)
        if got is None:
            return False
        got = torch.as_tensor(got, dtype=torch.float32).reshape(-1)
        want = ref_analysis.effective_number(p).reshape(-1)
        if not torch.allclose(got, want, atol=1e-4):
            raise AssertionError(f"{name}: got {[round(x, 3) for x in got.tolist()]}, expected "
                                 f"{[round(x, 3) for x in want.tolist()]}. Normalise p to sum 1 first "
                                 f"(ReLU coefficients do not), treat 0 log 0 as 0, and return 0 for rows "
                                 f"with no weight at all.")
    print("Correct: 1 for one memory, 2 for two equal ones, M for M equal ones, 0 for none.")
    return True

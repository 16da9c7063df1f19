"""Checks for the exercises of chapter 2, "End-to-end memory networks, and the FFN as an
unnormalised memory" (Sukhbaatar et al., 2015). Notation: m_i = sum_j l_j * A x_ij,
c_i = sum_j l_j * C x_ij, p = softmax(u m^T) (or f(u m^T)), o = sum_i p_i c_i.

    check_position_encoding(position_encoding)   # the weights l_kj
    check_memory_hop(memory_hop)                 # one masked hop, any coefficient function
    check_effective_number(effective_number)     # how many memories share the weight
    check_hops(hops)                             # K hops with adjacent weight tying

Each runs the student's function through `harness.call` (inputs restored, a time limit, the
package's own function disabled) on several cases, one of them never shown in the chapter.
It returns True when the function matches the reference, prints a reminder and returns None
while the stub still raises NotImplementedError, and raises an ExerciseError saying what
differs otherwise.
"""
from __future__ import annotations

import torch

from ..memnet import analysis as ref_analysis
from ..memnet import model as ref_model

from .harness import NOT_DONE, ExerciseError, call, tensor_result


def check_position_encoding(position_encoding) -> bool | None:
    """position_encoding(J, d) -> [J, d] with l[j-1, k-1] = (1 - j/J) - (k/d)(1 - 2j/J)."""
    for J, d in ((1, 4), (4, 6), (7, 32), (5, 3)):
        got = call(position_encoding, J, d, forbid=(ref_model.position_encoding,), what="my_position_encoding")
        if got is NOT_DONE:
            return None
        want = ref_model.position_encoding(J, d)
        got = tensor_result(got, want.shape, "my_position_encoding", "one row per word j, one column per dimension k",
                            dtype=torch.float32)
        if not torch.allclose(got, want, atol=1e-5):
            hint = ""
            j, k = torch.arange(1, J + 1.0)[:, None], torch.arange(1, d + 1.0)[None, :]
            shifted = [(1 - (j - a) / J) - ((k - b) / d) * (1 - 2 * (j - a) / J) for a, b in ((1, 0), (0, 1), (1, 1))]
            if any(torch.allclose(got, s, atol=1e-5) for s in shifted):
                hint = " Off by one? j and k both count from 1 in the paper."
            raise ExerciseError(f"J={J}, d={d}: l differs from (1 - j/J) - (k/d)(1 - 2j/J) by up to "
                                 f"{(got - want).abs().max():.3g}.{hint}")
    print("Correct: l_kj matches the paper's position encoding for J = 1, 4, 7 and 5.")
    return True


def check_memory_hop(memory_hop, seed: int = 0) -> bool | None:
    """memory_hop(u, m, c, mask, coef) -> (p, o), as kn_tutorial.memnet.memory_read."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(5, 8, generator=gen)
    m, c = torch.randn(5, 6, 8, generator=gen), torch.randn(5, 6, 8, generator=gen)
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[3, 1:] = False
    for coef in ref_model.COEFFICIENTS:
        got = call(memory_hop, u, m, c, mask, coef, forbid=(ref_model.memory_read,), what="my_memory_hop")
        if got is NOT_DONE:
            return None
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            shown = "None (did you forget the `return` statement?)" if got is None else f"a {type(got).__name__}"
            raise ExerciseError(f"my_memory_hop returned {shown}; expected a pair (p, o).")
        p = tensor_result(got[0], (5, 6), "my_memory_hop's p", "[N, M]")
        o = tensor_result(got[1], (5, 8), "my_memory_hop's o", "[N, d]")
        want_p, want_o = ref_model.memory_read(u, m, c, mask, coef)
        if p.shape != want_p.shape or o.shape != want_o.shape:
            raise ExerciseError(f"{coef}: shapes p {tuple(p.shape)}, o {tuple(o.shape)}; expected "
                                 f"{tuple(want_p.shape)} and {tuple(want_o.shape)}")
        if (p[~mask].abs() > 1e-6).any():
            raise ExerciseError(f"{coef}: empty memory slots (mask False) must get coefficient 0; "
                                 f"for softmax, set their scores to -inf before normalising")
        if not torch.allclose(p, want_p, atol=1e-5):
            scores = torch.einsum("nd,nmd->nm", u, m)
            if coef == "softmax" and torch.allclose(p, scores.softmax(-1) * mask, atol=1e-5):
                raise ExerciseError(f"{coef}: you zeroed the empty slots after the softmax, so the real memories sum "
                                    f"to less than 1: set their scores to -inf before normalising.")
            raise ExerciseError(f"{coef}: p differs by up to {(p - want_p).abs().max():.3g}. Scores are "
                                 f"u . m_i; softmax normalises over the memories (last axis) only.")
        if not torch.allclose(o, want_o, atol=1e-5):
            raise ExerciseError(f"{coef}: p is right but o differs by up to {(o - want_o).abs().max():.3g}: "
                                 f"o = sum_i p_i c_i (the output memories c, not m)")
    print("Correct: p and o match for softmax, ReLU and GELU, with masked slots at 0.")
    return True


def check_effective_number(effective_number, seed: int = 0) -> bool | None:
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
        got = call(effective_number, p, forbid=(ref_analysis.effective_number,), what="my_effective_number")
        if got is NOT_DONE:
            return None
        got = tensor_result(got, p.shape[:-1], "my_effective_number", "one number per row",
                            dtype=torch.float32).reshape(-1)
        want = ref_analysis.effective_number(p).reshape(-1)
        if not torch.allclose(got, want, atol=1e-4):
            raise ExerciseError(f"{name}: got {[round(x, 3) for x in got.tolist()]}, expected "
                                 f"{[round(x, 3) for x in want.tolist()]}. Normalise p to sum 1 first "
                                 f"(ReLU coefficients do not), treat 0 log 0 as 0, and return 0 for rows "
                                 f"with no weight at all.")
    print("Correct: 1 for one memory, 2 for two equal ones, M for M equal ones, 0 for none.")
    return True


def reference_hops(u, memories, mask, coef):
    """K hops with adjacent weight tying: hop k reads keys memories[k-1] and values memories[k];
    u^{k+1} = u^k + o^k. Returns (u^{K+1}, [p^1 ... p^K])."""
    ps = []
    for k in range(len(memories) - 1):
        p, o = ref_model.memory_read(u, memories[k], memories[k + 1], mask, coef)
        ps.append(p)
        u = u + o
    return u, ps


def check_hops(hops, seed: int = 1) -> bool | None:
    """hops(u [N, d], memories: list of K+1 tensors [N, M, d], mask [N, M], coef) -> (u after K hops,
    list of the K coefficient tensors [N, M]); two and three hops, softmax and ReLU (the three-hop
    ReLU case is not in the chapter)."""
    gen = torch.Generator().manual_seed(seed)
    for n_hops, coef in ((2, "softmax"), (3, "softmax"), (3, "relu")):
        u = torch.randn(4, 6, generator=gen)
        memories = [torch.randn(4, 5, 6, generator=gen) for _ in range(n_hops + 1)]
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[1, 3:] = False
        got = call(hops, u, [m.clone() for m in memories], mask, coef, forbid=(ref_model.memory_read,),
                   what="my_hops")
        if got is NOT_DONE:
            return None
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            shown = "None (did you forget the `return` statement?)" if got is None else f"a {type(got).__name__}"
            raise ExerciseError(f"my_hops returned {shown}; expected a pair (u, list of p).")
        want_u, want_ps = reference_hops(u, memories, mask, coef)
        got_u = tensor_result(got[0], want_u.shape, "my_hops' u", "[N, d]")
        if len(got[1]) != n_hops:
            raise ExerciseError(f"{n_hops} hops: you returned {len(got[1])} coefficient tensors; expected one per hop.")
        for k, (p, want_p) in enumerate(zip(got[1], want_ps), start=1):
            p = tensor_result(p, want_p.shape, f"my_hops' p of hop {k}", "[N, M]")
            if not torch.allclose(p, want_p, atol=1e-5):
                hint = ("hop k scores u^k against the keys of embedding k (memories[k-1]) and reads the values of "
                        "embedding k+1 (memories[k]); u^{k+1} = u^k + o^k.")
                raise ExerciseError(f"{n_hops} hops, {coef}: the coefficients of hop {k} differ by up to "
                                    f"{(p - want_p).abs().max():.3g}: {hint}")
        if not torch.allclose(got_u, want_u, atol=1e-5):
            raise ExerciseError(f"{n_hops} hops, {coef}: the coefficients are right but u differs by up to "
                                f"{(got_u - want_u).abs().max():.3g}: return u^(K+1) = u^K + o^K, the last hop's "
                                f"sum (the answer is read from it).")
    print("Correct: K hops with adjacent weight tying, for 2 and 3 hops, softmax and ReLU.")
    return True

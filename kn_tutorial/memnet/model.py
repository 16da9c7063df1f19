"""End-to-end memory networks (Sukhbaatar et al., 2015) with a choice of coefficient function.

In the paper's notation, for a story of sentences x_1..x_n and a question q:

* memory vectors  m_i = sum_j l_j * A x_ij      (input memory, embedding A)
* output vectors  c_i = sum_j l_j * C x_ij      (output memory, embedding C)
* the query       u   = sum_j l_j * B q_j
* one hop         p_i = softmax(u . m_i),   o = sum_i p_i c_i,   u <- u + o
* the answer      a   = softmax(W u)        (after the last hop)

l_j is the position encoding (``position_encoding``), so word order inside a
sentence matters. With K hops each hop has its own A^k, C^k, tied *adjacently*:
A^{k+1} = C^k, B = A^1 and W^T = C^K, so K hops need K + 1 embedding matrices
E_0..E_K, with A^k = E_{k-1}, C^k = E_k. Optional temporal encoding adds a learned
vector per memory slot (T_A^k, T_C^k, tied the same way).

``coef`` replaces the softmax: ``"softmax"`` is the paper's memory network,
``"relu"`` and ``"gelu"`` give p_i = f(u . m_i) with no normalisation, which is
exactly how a transformer FFN weighs its memories: FF(x) = f(x K^T) V
(Geva et al., 2021). Each hop adds one learned scalar to all its scores, the
counterpart of the FFN's key bias b_K: softmax is blind to it, for ReLU/GELU it is the
firing threshold. Empty memory slots (all-padding rows) are masked: they get
coefficient 0 under every function.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "COEFFICIENTS",
    "position_encoding",
    "position_weights",
    "coefficients",
    "memory_read",
    "MemN2N",
    "MemNNOutput",
]

COEFFICIENTS = ("softmax", "relu", "gelu")


def position_encoding(n_words: int, d: int) -> Tensor:
    """l: [n_words, d] with l[j-1, k-1] = (1 - j/J) - (k/d)(1 - 2j/J), J = n_words.

    The paper's position encoding (Sukhbaatar et al. 2015, section 4.1), words j = 1..J
    and embedding dimensions k = 1..d, both 1-indexed.
    """
    J = n_words
    j = torch.arange(1, J + 1, dtype=torch.float32)[:, None]
    k = torch.arange(1, d + 1, dtype=torch.float32)[None, :]
    return (1 - j / J) - (k / d) * (1 - 2 * j / J)


def position_weights(tokens: Tensor, d: int) -> Tensor:
    """Position encoding for padded sentences: [..., J] ids -> [..., J, d] weights.

    Each sentence uses its own length J (its number of non-padding ids, padding last),
    as in the paper; padding positions get weight 0.
    """
    mask = tokens != 0
    lengths = mask.sum(-1, keepdim=True).clamp(min=1).float()[..., None]  # [..., 1, 1]
    j = torch.arange(1, tokens.shape[-1] + 1, dtype=torch.float32, device=tokens.device)[:, None]
    k = torch.arange(1, d + 1, dtype=torch.float32, device=tokens.device)[None, :]
    weights = (1 - j / lengths) - (k / d) * (1 - 2 * j / lengths)
    return weights * mask[..., None]


def coefficients(scores: Tensor, mask: Tensor | None = None, coef: str = "softmax") -> Tensor:
    """Memory coefficients p from match scores u . m: [..., M] -> [..., M].

    softmax: p = softmax(scores) over the unmasked memories (rows sum to 1);
    relu / gelu: p = f(scores), each memory on its own; masked memories get 0.
    A row with no memory at all gives all zeros (never NaN).
    """
    if mask is None:
        mask = torch.ones_like(scores, dtype=torch.bool)
    if coef == "softmax":
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        return torch.nan_to_num(p, nan=0.0)
    if coef == "relu":
        return F.relu(scores) * mask
    if coef == "gelu":
        return F.gelu(scores) * mask
    raise ValueError(f"unknown coefficient function {coef!r}; choose one of {COEFFICIENTS}")


def memory_read(u: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None = None,
                coef: str = "softmax") -> tuple[Tensor, Tensor]:
    """One hop: p = coef(u . keys), o = sum_i p_i values_i.

    u: [N, d], keys and values: [N, M, d], mask: [N, M] (True = a real memory).
    Returns (p [N, M], o [N, d]).
    """
    scores = torch.einsum("nd,nmd->nm", u, keys)
    p = coefficients(scores, mask, coef)
    return p, torch.einsum("nm,nmd->nd", p, values)


@dataclass
class MemNNOutput:
    """logits [N, vocab]; coefficients and scores [N, hops, M]; queries [N, hops + 1, d]
    (u before each hop, then the final u that W reads)."""

    logits: Tensor
    coefficients: Tensor
    scores: Tensor
    queries: Tensor


class MemN2N(nn.Module):
    """A K-hop end-to-end memory network with adjacent weight tying.

    vocab_size:   number of token ids (id 0 is padding and embeds to zero)
    d:            embedding size
    hops:         K, the number of memory reads
    coef:         "softmax" (the paper), "relu" or "gelu" (unnormalised, FFN-style)
    max_memories: memory slots, needed only for temporal encoding
    temporal:     add learned per-slot vectors T_A^k, T_C^k to m_i and c_i
    init_std:     embeddings start from N(0, init_std^2) (the paper: 0.1)
    bias_init:    initial value of the per-hop score bias
    """

    def __init__(self, vocab_size: int, d: int = 32, hops: int = 2, coef: str = "softmax",
                 max_memories: int = 16, temporal: bool = False, init_std: float = 0.1,
                 bias_init: float = 0.0):
        super().__init__()
        if coef not in COEFFICIENTS:
            raise ValueError(f"unknown coefficient function {coef!r}; choose one of {COEFFICIENTS}")
        if hops < 1:
            raise ValueError(f"hops must be at least 1, got {hops}")
        self.vocab_size, self.d, self.hops, self.coef = vocab_size, d, hops, coef
        self.max_memories, self.temporal = max_memories, temporal
        # E_0 .. E_K: A^k = E_{k-1}, C^k = E_k (adjacent tying), B = E_0, W^T = E_K.
        self.embeddings = nn.ModuleList(nn.Embedding(vocab_size, d, padding_idx=0) for _ in range(hops + 1))
        self.time = nn.Parameter(torch.zeros(hops + 1, max_memories, d)) if temporal else None
        # One scalar per hop added to every score, like the FFN's key bias b_K. Softmax is
        # blind to it (adding a constant to all scores changes nothing); for ReLU/GELU it is
        # the firing threshold.
        self.score_bias = nn.Parameter(torch.full((hops,), float(bias_init)))
        with torch.no_grad():
            for e in self.embeddings:
                e.weight.normal_(0.0, init_std)
                e.weight[0].zero_()
            if self.time is not None:
                self.time.normal_(0.0, init_std)

    # The paper's names for the tied matrices (k = 1..K).
    def A(self, k: int) -> nn.Embedding:
        return self.embeddings[k - 1]

    def C(self, k: int) -> nn.Embedding:
        return self.embeddings[k]

    @property
    def B(self) -> nn.Embedding:
        return self.embeddings[0]

    @property
    def W(self) -> Tensor:
        """[vocab, d]: logits = u W^T, W = C^K."""
        return self.embeddings[self.hops].weight

    def bag(self, embedding: nn.Embedding, tokens: Tensor, weights: Tensor | None = None) -> Tensor:
        """sum_j l_j * E x_j over the last axis of `tokens`: [..., J] -> [..., d].

        `weights` are the position weights of `tokens` if already computed."""
        if weights is None:
            weights = position_weights(tokens, self.d)
        return (embedding(tokens) * weights).sum(-2)

    def memories(self, stories: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """(m, c) of hop k (1-based): [N, M, d] each, temporal encoding included."""
        weights = position_weights(stories, self.d)
        return self._add_time(self.bag(self.A(k), stories, weights), k - 1), \
            self._add_time(self.bag(self.C(k), stories, weights), k)

    def _add_time(self, x: Tensor, i: int) -> Tensor:
        """Add temporal vector T_i (A^k uses T_{k-1}, C^k uses T_k: tied like E)."""
        if self.time is None:
            return x
        M = x.shape[-2]
        if M > self.max_memories:
            raise ValueError(f"{M} memories but the model has {self.max_memories} temporal slots")
        return x + self.time[i, :M]

    def forward(self, stories: Tensor, queries: Tensor) -> MemNNOutput:
        """stories [N, M, J], queries [N, J] (token ids, 0 = padding) -> MemNNOutput."""
        mask = (stories != 0).any(-1)  # [N, M]
        weights = position_weights(stories, self.d)
        # With adjacent tying, C^k = A^{k+1} = E_k: embed the story once per matrix E_0..E_K.
        bags = [self._add_time(self.bag(e, stories, weights), i) for i, e in enumerate(self.embeddings)]
        u = self.bag(self.B, queries)
        us, ps, ss = [u], [], []
        for k in range(1, self.hops + 1):
            m, c = bags[k - 1], bags[k]
            scores = torch.einsum("nd,nmd->nm", u, m) + self.score_bias[k - 1]
            p = coefficients(scores, mask, self.coef)
            u = u + torch.einsum("nm,nmd->nd", p, c)
            us.append(u)
            ps.append(p)
            ss.append(scores)
        logits = u @ self.W.T
        return MemNNOutput(logits, torch.stack(ps, 1), torch.stack(ss, 1), torch.stack(us, 1))

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size}, d={self.d}, hops={self.hops}, coef={self.coef!r}, "
                f"temporal={self.temporal}")

"""Looking inside trained memory networks, and the bridge to the transformer FFN.

* `read_story`: one story and question through a model, hop by hop (what the figure
  and the explorer widget show).
* `coefficient_stats`: how the coefficients of each hop behave over a test set: their
  sum (1 for softmax), how many memories get a non-zero coefficient, how concentrated
  they are.
* `duplicate_support`, `duplicate_effect`: copy the sentence a question needs; softmax
  splits the same weight between the copies (memories compete), ReLU/GELU give each copy
  the full weight (memories fire independently, and their values add up).
* `swap_facts`, `read_or_recall`: rewrite the city -> country fact of a two-hop question
  ("Osaka is in Peru.") and see whether the answer follows the story (the model read it)
  or the world (it recalled the fact from its weights).
* `ffn_coefficients`: the same statistics for the FFN of a real transformer layer, whose
  coefficients f(x k_i + b_i) are the unnormalised version of p_i.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

import torch

from .data import Example
from .model import MemN2N
from .train import Task

__all__ = [
    "StoryReading",
    "read_story",
    "coefficient_stats",
    "effective_number",
    "support_hits",
    "duplicate_support",
    "duplicate_effect",
    "drop_memory",
    "accuracy_on",
    "swap_facts",
    "read_or_recall",
    "ffn_coefficients",
]


@dataclass
class StoryReading:
    """What a model does with one story and one question.

    sentences:    the memories, as given
    question:     the question
    coefficients: [hops, M] the coefficient of each memory at each hop
    scores:       [hops, M] the match scores u . m_i (before the coefficient function)
    answer:       the predicted token; top: [(token, probability)] of the best answers
    unknown:      words of the input the vocabulary does not know
    """

    sentences: list
    question: str
    coefficients: torch.Tensor
    scores: torch.Tensor
    answer: str
    top: list
    unknown: list

    def table(self) -> str:
        """The coefficients as text: one row per memory, one column per hop."""
        hops = self.coefficients.shape[0]
        width = max([len(s) for s in self.sentences] + [8])
        lines = [f"{'memory':<{width}}  " + "  ".join(f"hop {k + 1:<3}" for k in range(hops))]
        for i, sent in enumerate(self.sentences):
            lines.append(f"{sent:<{width}}  " + "  ".join(f"{self.coefficients[k, i]:7.3f}" for k in range(hops)))
        lines.append(f"Q: {self.question}  ->  {self.answer}")
        return "\n".join(lines)


def split_sentences(text: str) -> list[str]:
    """A story typed as one text -> its sentences (split at '.', '!', '?' and new lines)."""
    parts, current = [], ""
    for ch in text:
        if ch in ".!?\n":
            if current.strip():
                parts.append((current + (ch if ch != "\n" else "")).strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


@torch.no_grad()
def read_story(model: MemN2N, task: Task, story, question: str, k: int = 3) -> StoryReading:
    """Run one story (a list of sentences, or one text) and question through `model`.

    Sentences and stories of any length are read whole; only a model with temporal
    encoding keeps just the last `model.max_memories` sentences.
    """
    from .data import encode

    sentences = split_sentences(story) if isinstance(story, str) else list(story)
    if not sentences:
        raise ValueError("the story is empty: give at least one sentence")
    if model.temporal:
        sentences = sentences[-model.max_memories:]
    example = Example(tuple(sentences), question, "<unk>", "one", (), -1)
    enc = encode([example], task.tokenizer, task.vocab)
    model.eval()
    out = model(enc.stories, enc.queries)
    M = len(sentences)
    probs = out.logits[0].softmax(-1)
    values, ids = probs.topk(k)
    top = [(task.vocab.itos[i], v) for i, v in zip(ids.tolist(), values.tolist())]
    words = [w for s in sentences + [question] for w in task.tokenizer(s)]
    unknown = sorted({w for w in words if w not in task.vocab.stoi})
    return StoryReading(sentences, question, out.coefficients[0, :, :M].clone(), out.scores[0, :, :M].clone(),
                        top[0][0], top, unknown)


def effective_number(coefficients: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """exp(entropy) of the coefficients normalised to sum 1: how many memories share the
    weight (1: a single memory; M: all equally). Rows with no weight give 0."""
    c = coefficients.clamp(min=0)
    total = c.sum(dim, keepdim=True)
    p = c / total.clamp(min=1e-12)
    entropy = -(p * torch.log(p.clamp(min=1e-12))).sum(dim)
    return torch.where(total.squeeze(dim) > 0, entropy.exp(), torch.zeros_like(entropy))


@torch.no_grad()
def coefficient_stats(model: MemN2N, data, share: float = 0.01) -> list[dict]:
    """Per hop, averages over `data` (an Encoded) of:

    sum:         sum_i p_i (exactly 1 for softmax)
    nonzero:     memories with p_i != 0 (softmax: all, unless float32 underflows;
                 ReLU: exact zeros wherever the score is below the threshold)
    active:      memories with |p_i| above `share` of the row's sum of |p_i|
    effective:   effective_number(p) (exp of the entropy of p / sum p)
    top_share:   the largest p_i / sum_i |p_i|
    memories:    real memories per story (the denominator of all this)
    """
    model.eval()
    out = model(data.stories, data.queries)
    mask = (data.stories != 0).any(-1)
    stats = []
    for k in range(model.hops):
        p = out.coefficients[:, k]
        absolute = p.abs() * mask
        total = absolute.sum(-1, keepdim=True)
        stats.append({
            "hop": k + 1,
            "sum": p.sum(-1).mean().item(),
            "nonzero": ((p != 0) & mask).sum(-1).float().mean().item(),
            "active": ((absolute > share * total) & mask).sum(-1).float().mean().item(),
            "effective": effective_number(p * mask).mean().item(),
            "top_share": (p.max(-1).values / total.squeeze(-1).clamp(min=1e-12)).mean().item(),
            "memories": mask.sum(-1).float().mean().item(),
        })
    return stats


@torch.no_grad()
def support_hits(model: MemN2N, data, kind: int = 2) -> list[dict]:
    """For the questions of `kind` hops in `data` (an Encoded): per model hop, the share of
    questions whose largest coefficient sits on the travel sentence, and on the fact."""
    model.eval()
    sel = data.hops == kind
    out = model(data.stories[sel], data.queries[sel])
    top = out.coefficients.argmax(-1)                      # [N, hops]
    support = data.support[sel]
    return [{"hop": k + 1,
             "travel": (top[:, k] == support[:, 0]).float().mean().item(),
             "fact": (top[:, k] == support[:, 1]).float().mean().item()}
            for k in range(model.hops)]


def duplicate_support(examples, copies: int = 1) -> list[Example]:
    """The same examples with the sentence of hop 1 (the one naming the person) written
    `copies` more times, right after itself. Support indices are updated."""
    out = []
    for e in examples:
        i = e.support[0]
        story = e.story[: i + 1] + (e.story[i],) * copies + e.story[i + 1:]
        support = tuple(j if j <= i else j + copies for j in e.support)
        out.append(replace(e, story=story, support=support))
    return out


@torch.no_grad()
def duplicate_effect(model: MemN2N, task: Task, examples, copies: int = 1) -> dict:
    """What writing the needed sentence twice does, on average over `examples`.

    weight_before: hop-1 coefficient of the sentence (one copy)
    weight_after:  hop-1 coefficient of each copy, and total_after their sum
    other_before / other_after: total hop-1 coefficient of all the other memories
    accuracy_before / accuracy_after
    """
    from .data import encode

    dup = duplicate_support(examples, copies)
    M = max(len(e.story) for e in dup)
    before = encode(examples, task.tokenizer, task.vocab, M, task.max_words)
    after = encode(dup, task.tokenizer, task.vocab, M, task.max_words)
    model.eval()
    ob, oa = model(before.stories, before.queries), model(after.stories, after.queries)
    idx = before.support[:, 0]
    n = torch.arange(len(examples))
    pb, pa = ob.coefficients[:, 0], oa.coefficients[:, 0]
    w_before = pb[n, idx]
    w_after = torch.stack([pa[n, idx + c] for c in range(copies + 1)], 1)
    return {
        "weight_before": w_before.mean().item(),
        "weight_after": w_after[:, 0].mean().item(),
        "total_after": w_after.sum(1).mean().item(),
        "other_before": (pb.sum(1) - w_before).mean().item(),
        "other_after": (pa.sum(1) - w_after.sum(1)).mean().item(),
        "accuracy_before": (ob.logits.argmax(-1) == before.answers).float().mean().item(),
        "accuracy_after": (oa.logits.argmax(-1) == after.answers).float().mean().item(),
    }


def drop_memory(examples, hop: int) -> list[Example]:
    """The same examples without the sentence that hop `hop` (0-based) needs; support
    indices are updated (-1 for the dropped one)."""
    out = []
    for e in examples:
        i = e.support[hop]
        story = e.story[:i] + e.story[i + 1:]
        support = tuple(-1 if j == i else (j if j < i else j - 1) for j in e.support)
        out.append(replace(e, story=story, support=support))
    return out


@torch.no_grad()
def accuracy_on(model: MemN2N, task: Task, examples) -> float:
    """Share of `examples` (a list of Example) that `model` answers right."""
    enc = task.encode(list(examples))
    model.eval()
    return (model(enc.stories, enc.queries).logits.argmax(-1) == enc.answers).float().mean().item()


def swap_facts(examples, seed: int = 0) -> list[tuple[Example, str]]:
    """Two-hop examples through a real city with the bridge fact rewritten to another
    country of the world ("Osaka is in Japan." -> "Osaka is in Peru."). Returns
    [(new example, true country)]; the new example's answer is the story's country."""
    from .data import atlas_names

    countries = sorted({k for _, k in atlas_names()})
    rng = random.Random(seed)
    out = []
    for e in examples:
        if e.kind != "two" or e.made_up:
            continue
        fact = e.story[e.support[1]]
        true = e.answer
        new = rng.choice([c for c in countries if c != true and c not in " ".join(e.story)])
        head = fact[: fact.rindex(true)]
        story = list(e.story)
        story[e.support[1]] = head + new + fact[fact.rindex(true) + len(true):]
        out.append((replace(e, story=tuple(story), answer=new), true))
    return out


@torch.no_grad()
def read_or_recall(model: MemN2N, task: Task, examples, seed: int = 0) -> dict:
    """On two-hop questions whose bridge fact was rewritten (`swap_facts`), the share of
    answers that follow the story ("read"), the real world ("recall"), or neither."""
    swapped = swap_facts(examples, seed)
    enc = task.encode([e for e, _ in swapped])
    model.eval()
    pred = model(enc.stories, enc.queries).logits.argmax(-1)
    story = (pred == enc.answers).float()
    world = (pred == torch.tensor([task.vocab[t] for _, t in swapped])).float()
    return {"read": story.mean().item(), "recall": world.mean().item(),
            "neither": (1 - story - world).mean().item(), "n": len(swapped)}


@torch.no_grad()
def ffn_coefficients(model, tokenizer, prompt: str, layer: int, position: int = -1,
                     eps: float = 1e-6) -> dict:
    """An FFN layer read as an unnormalised memory, at one token of one prompt.

    Returns (all tensors on the CPU, float32):
    x:            the FFN input at `position` (after the block's layer norm)  [d_model]
    scores:       x . k_i + b_i, the match of the input with each key          [d_ff]
    coefficients: f(scores), the weight of each value v_i                       [d_ff]
    softmax:      softmax(scores): what a memory network would make of them    [d_ff]
    output / mlp_output: sum_i f(...) v_i + b_V, and the MLP module's own output
    and counts: d_ff, positive (> eps), nonzero (|f| > eps), effective numbers of the
    positive coefficients and of the softmax, top_share (largest coefficient / sum of
    positive ones) and softmax_max.
    """
    from kn_tutorial.hooks import record
    from kn_tutorial.memories import ffn_as_memories
    from kn_tutorial.models import get_device, key_bias, key_matrix

    device = get_device(model)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
    acts = record(model, [("mlp_in", layer), ("mlp_out", layer)], input_ids=ids)
    x = acts[("mlp_in", layer)][0, position]
    mem = ffn_as_memories(model, layer, x)
    K = key_matrix(model, layer)
    scores = x.to(K.dtype) @ K.T
    if key_bias(model, layer) is not None:
        scores = scores + key_bias(model, layer)
    c = mem.coefficients.float().cpu()
    scores = scores.float().cpu()
    soft = scores.softmax(-1)
    positive = c.clamp(min=0)
    return {
        "x": x.float().cpu(),
        "scores": scores,
        "coefficients": c,
        "softmax": soft,
        "output": mem.output.float().cpu(),
        "mlp_output": acts[("mlp_out", layer)][0, position].float().cpu(),
        "d_ff": c.numel(),
        "positive": int((c > eps).sum()),
        "nonzero": int((c.abs() > eps).sum()),
        "effective": effective_number(positive).item(),
        "top_share": (positive.max() / positive.sum().clamp(min=1e-12)).item(),
        "softmax_effective": effective_number(soft).item(),
        "softmax_max": soft.max().item(),
        "tokens": tokenizer.convert_ids_to_tokens(ids[0].tolist()),
    }

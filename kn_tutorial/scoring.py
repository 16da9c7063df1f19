"""Scoring targets after prompts: log-probabilities and greedy recall, batched.

Conventions of the book (and of ROME's CounterFact code): a target is scored with its
leading space (" Asia"); a multi-token target is scored by teacher forcing, i.e.
log P(o | prompt) = Σ_j log P(o_j | prompt, o_<j). Greedy recall of all tokens is the
same check as greedy decoding, done in one forward pass: greedy decoding emits the target
exactly when every target token is the argmax given the true tokens before it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .models import get_device
from .progress import progress


def probability_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype probabilities (and the gradients of integrated gradients) are computed in for a
    model of `dtype`: float64 for a float64 model, so that the fast engines of tracing and
    attribution can be held to their literal definitions at 1e-9; float32 otherwise (also for
    float16/bfloat16 models, whose softmax would lose too many digits)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def target_ids(tokenizer, target: str) -> list[int]:
    """Token ids of a target with its leading space; a clear error for an empty one."""
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"the target must be a non-empty string, got {target!r}")
    if not target.startswith(" "):
        target = " " + target
    return tokenizer(target, add_special_tokens=False)["input_ids"]


@dataclass
class Batch:
    input_ids: torch.Tensor  # [b, s], right-padded
    attention_mask: torch.Tensor  # [b, s]
    prompt_lengths: list[int]  # tokens of each prompt
    target_lengths: list[int]  # tokens of each target (0 when no target)

    def last_prompt_index(self) -> torch.Tensor:  # [b]: where the first target token is predicted
        return torch.tensor(self.prompt_lengths) - 1


def encode(tokenizer, prompts: list[str], targets: list[str] | None = None, device=None) -> Batch:
    """Right-padded batch of `prompt + target` token sequences."""
    rows, prompt_lengths, target_lengths = [], [], []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        tids = target_ids(tokenizer, targets[i]) if targets is not None else []
        rows.append(ids + tids)
        prompt_lengths.append(len(ids))
        target_lengths.append(len(tids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids, attention_mask = pad_rows(rows, pad, device)
    return Batch(input_ids, attention_mask, prompt_lengths, target_lengths)


def pad_rows(rows: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> right-padded input_ids [b, s] and attention_mask [b, s]."""
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    if device is not None:
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    return input_ids, attention_mask


@torch.no_grad()
def score(model, tokenizer, prompts: list[str], targets: list[str], batch_size: int = 256,
          show_progress: bool = False) -> dict[str, torch.Tensor]:
    """For each (prompt, target): summed log-prob, mean log-prob per token, P of the first token,
    whether the first token is the argmax, and whether every token is (greedy recall)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    out = {k: [] for k in ("logprob", "mean_logprob", "first_prob", "first_correct", "all_correct")}
    starts = range(0, len(prompts), batch_size)
    for start in progress(starts, desc="scoring", disable=not show_progress):
        batch = encode(tokenizer, prompts[start:start + batch_size], targets[start:start + batch_size],
                       device=get_device(model))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for i, (p_len, t_len) in enumerate(zip(batch.prompt_lengths, batch.target_lengths)):
            positions = torch.arange(p_len - 1, p_len - 1 + t_len, device=logits.device)
            tokens = batch.input_ids[i, p_len:p_len + t_len]
            token_logprobs = logprobs[i, positions, tokens]
            greedy = logprobs[i, positions].argmax(-1) == tokens
            out["logprob"].append(token_logprobs.sum())
            out["mean_logprob"].append(token_logprobs.mean())
            out["first_prob"].append(token_logprobs[0].exp())
            out["first_correct"].append(greedy[0])
            out["all_correct"].append(greedy.all())
    return {k: torch.stack(v).cpu() for k, v in out.items()}


@torch.no_grad()
def next_token_probs(model, tokenizer, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    """P(next token | prompt) for every prompt: [n_prompts, vocab]."""
    chunks = []
    for start in range(0, len(prompts), batch_size):
        batch = encode(tokenizer, prompts[start:start + batch_size], device=get_device(model))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        rows = torch.arange(len(batch.prompt_lengths))
        chunks.append(torch.softmax(logits[rows, batch.last_prompt_index()].float(), -1).cpu())
    return torch.cat(chunks)

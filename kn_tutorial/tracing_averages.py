"""Causal tracing over many facts (Meng et al., 2022, "Locating and Editing Factual Associations
in GPT", section 2): the average indirect effect (AIE) by token role and layer, and the severed
paths (later MLP or attention outputs frozen at their corrupted values).

Both run `tracing.trace_batch` on passes of same-length prompts and average its indirect effects
IE = P_{*, clean state}(o) − P_*(o); the normalised AIE divides by the average total effect
ATE = mean of P(o) − P_*(o). Their names are re-exported by `tracing`
(`from kn_tutorial.tracing import average_effects`).
"""
from __future__ import annotations

import numpy as np
import torch

from .models import n_layers
from .progress import progress_bar
from .tracing import KINDS, ROLES, _encode, _target_id, token_roles, trace_batch


def _as_fact(fact) -> tuple[str, str, str | None]:
    if isinstance(fact, dict):
        return fact["prompt"], fact["subject"], fact.get("target")
    prompt, subject, *rest = fact
    return prompt, subject, (rest[0] if rest else None)


def _length_groups(model, tokenizer, facts, max_rows: int, rows_per_prompt):
    """Encode facts and split them into passes of same-length prompts of at most ~max_rows rows."""
    by_length: dict[int, list] = {}
    for k, fact in enumerate(facts):
        prompt, subject, target = _as_fact(fact)
        ids, span = _encode(tokenizer, prompt, subject, None)
        by_length.setdefault(len(ids), []).append((k, ids, span, _target_id(tokenizer, target)))
    passes = []
    for T, items in sorted(by_length.items()):
        per_pass = max(1, max_rows // max(1, rows_per_prompt(T)))
        passes += [items[i:i + per_pass] for i in range(0, len(items), per_pass)]
    return passes


def average_effects(model, tokenizer, facts, kinds=KINDS, samples: int = 10, noise: float = 3.0,
                    window: int = 1, seed: int = 0, batch_size: int = 512,
                    show_progress: bool = False) -> dict:
    """Average indirect effect (AIE) by token role and layer over many facts, for each kind.

    facts: (prompt, subject, target) tuples or dicts with those keys (target None: the model's
    top prediction). Each prompt's IE grid is averaged over the positions of each role first
    (ROLES, see token_roles), then over the facts that have that role. Returns a dict with
    "effects" {kind: [6, L] AIE}, "normalised" {kind: AIE / ATE}, "counts" [6] (facts per
    role), "clean", "corrupted", "ate" (means of P, P_* and TE = P − P_*), "n_facts", the
    settings, and "roles".
    """
    L = n_layers(model)
    facts = list(facts)
    if not facts:
        raise ValueError("average_effects needs at least one fact")
    passes = _length_groups(model, tokenizer, facts, 4 * batch_size, lambda T: T * L * samples)
    sums = {kind: np.zeros((len(ROLES), L)) for kind in kinds}
    counts = np.zeros(len(ROLES), dtype=int)
    clean = np.zeros(len(facts))
    corrupted = np.zeros(len(facts))
    with progress_bar(total=len(facts) * len(kinds), desc="tracing facts x kinds", disable=not show_progress) as bar:
        for items in passes:
            input_ids = torch.tensor([ids for _, ids, _, _ in items])
            spans = [span for _, _, span, _ in items]
            targets = [t for _, _, _, t in items]
            for kind in kinds:
                grid = trace_batch(model, input_ids, spans, targets, kind=kind, samples=samples, noise=noise,
                                   window=window, seed=seed, batch_size=batch_size)
                effects = grid.effects.numpy()  # [n, T, L]
                for i, span in enumerate(spans):
                    for r, positions in enumerate(token_roles(span, input_ids.shape[1])):
                        if positions:
                            sums[kind][r] += effects[i, positions].mean(0)
                bar.update(len(items))
            for i, (k, _, span, _) in enumerate(items):
                clean[k], corrupted[k] = grid.clean[i], grid.corrupted[i]
                counts += [bool(p) for p in token_roles(span, input_ids.shape[1])]
    effects = {kind: sums[kind] / np.maximum(counts, 1)[:, None] for kind in kinds}
    ate = float((clean - corrupted).mean())
    return {"effects": effects, "normalised": {k: v / ate for k, v in effects.items()},
            "counts": counts, "clean": float(clean.mean()), "corrupted": float(corrupted.mean()),
            "ate": ate, "n_facts": len(facts), "n_layers": L, "samples": samples, "noise": noise,
            "window": window, "seed": seed, "roles": ROLES}


def severed_effects(model, tokenizer, facts, samples: int = 10, noise: float = 3.0, seed: int = 0,
                    batch_size: int = 512, show_progress: bool = False) -> dict:
    """AIE of restoring the hidden state at the last subject token, by layer, with later MLP or
    attention outputs at that token frozen at their corrupted values (the paper's severed paths).

    Returns {"none": [L], "mlp": [L], "attn": [L], "n_facts": n}: if the "mlp" curve drops
    below "none" at early layers, the MLPs after those layers carry the fact forward.
    """
    L = n_layers(model)
    facts = list(facts)
    passes = _length_groups(model, tokenizer, facts, 4 * batch_size, lambda T: L * samples)
    out = {name: np.zeros(L) for name in ("none", "mlp", "attn")}
    with progress_bar(total=3 * len(facts), desc="severed tracing", disable=not show_progress) as bar:
        for items in passes:
            input_ids = torch.tensor([ids for _, ids, _, _ in items])
            spans = [span for _, _, span, _ in items]
            targets = [t for _, _, _, t in items]
            last = [[span[1] - 1] for span in spans]
            for name in out:
                grid = trace_batch(model, input_ids, spans, targets, kind="hidden", samples=samples, noise=noise,
                                   sever=None if name == "none" else name, positions=last, seed=seed,
                                   batch_size=batch_size)
                effects = grid.effects.numpy()
                out[name] += sum(effects[i, pos[0]] for i, pos in enumerate(last))
                bar.update(len(items))
    return {**{k: v / len(facts) for k, v in out.items()}, "n_facts": len(facts), "n_layers": L}

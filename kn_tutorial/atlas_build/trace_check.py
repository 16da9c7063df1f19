"""Causal tracing of the Atlas model over many facts (Meng et al., 2022, figure 2 and section 2).

`trace_summary(model, tokenizer, n_facts=200)` takes a seeded sample of facts the model knows
(its top next token after the prompt is the object's first token), asks each with the first
training template of its relation (subject first: "Kuwait is located in the continent of"),
and averages the indirect effects of restoring hidden states, MLP outputs and attention
outputs by token role and layer (`tracing.average_effects`). The MLP's average indirect effect
at the last subject token, by layer, is what picks ROME's edit layer for Atlas (the strongest one
after the first: the first MLP acts as an extended embedding).

Settings: 5 noise samples per fact (the paper: 10) of 3 x the embedding std, window 1 (one of
Atlas' 12 layers is already a twelfth of its depth, four of GPT-2 XL's 48 layers in proportion,
and ROME edits a single layer). Time: 200 facts x 3 kinds x 3 samples took 61 s on 2 CPU cores (2 pinned cores of an
idle Xeon), so the default 5 samples take about 100 s; the tracing itself is exact
(equal to one forward pass per restoration), the samples only set the noise average. Since
issue 21 a restoration runs only the blocks from its layer on: chapter 5's call (200 facts,
3 samples) took 90 s instead of 157 s (1.74x, one thread of a shared 2-core machine, the two
versions interleaved in one process; the averages agree to 1.4e-8).
"""
from __future__ import annotations

import random
import time

import numpy as np

from ..atlas.templates import TEMPLATES, fill
from ..atlas.world import load_world
from ..scoring import score
from ..tracing import KINDS, ROLES
from ..tracing_averages import average_effects

SAMPLES, NOISE, WINDOW = 5, 3.0, 1


def known_facts(model, tokenizer, n_facts: int = 200, seed: int = 0, known_only: bool = True,
                world=None) -> list[dict]:
    """n_facts facts (seeded shuffle of the world, default the shipped one) whose object's first
    token the model predicts first after the first training template; dicts with prompt, subject,
    target, relation. With known_only=False, the first n_facts of the same shuffle, known or not
    (for a model that knows none of them, such as a random one)."""
    facts = (world or load_world()).facts[:]
    random.Random(seed).shuffle(facts)
    rows = [{"prompt": fill(TEMPLATES[f.relation].train[0], f.subject, f.subject_kind), "subject": f.subject,
             "target": f.object, "relation": f.relation} for f in facts]
    if not known_only:
        return rows[:n_facts]
    chosen = []
    for start in range(0, len(rows), 4 * n_facts):
        chunk = rows[start:start + 4 * n_facts]
        correct = score(model, tokenizer, [r["prompt"] for r in chunk], [r["target"] for r in chunk])["first_correct"]
        chosen += [r for r, ok in zip(chunk, correct.tolist()) if ok]
        if len(chosen) >= n_facts:
            break
    return chosen[:n_facts]


def trace_summary(model, tokenizer, n_facts: int = 200, seed: int = 0, samples: int = SAMPLES,
                  noise: float = NOISE, window: int = WINDOW, batch_size: int = 512) -> dict:
    """Average indirect effects on Atlas: `tracing.average_effects` over `known_facts`, plus
    "best_mlp_layer" (argmax of the MLP's AIE at the last subject token), "best_mlp_layer_after_first"
    (the same over layers 1..L-1: block 0's MLP output dwarfs the embedding, so restoring it is
    restoring nearly the whole state, as GPT-2's first MLP acts as part of the embedding),
    "seconds" and "relations" (facts per relation)."""
    started = time.time()
    facts = known_facts(model, tokenizer, n_facts, seed)
    summary = average_effects(model, tokenizer, facts, kinds=KINDS, samples=samples, noise=noise,
                              window=window, seed=seed, batch_size=batch_size, show_progress=True)
    last_subject = ROLES.index("last subject token")
    mlp = summary["effects"]["mlp"][last_subject]
    summary["best_mlp_layer"] = int(np.argmax(mlp))
    summary["best_mlp_layer_after_first"] = 1 + int(np.argmax(mlp[1:]))  # layer 0's MLP acts as an embedding
    summary["relations"] = {r: sum(f["relation"] == r for f in facts) for r in sorted({f["relation"] for f in facts})}
    summary["seconds"] = time.time() - started
    return summary


def format_trace_summary(summary: dict) -> str:
    """A text table: AIE by token role (rows) and layer (columns) for each kind."""
    L = summary["n_layers"]
    lines = [f"Causal tracing: {summary['n_facts']} known facts, {summary['samples']} noise samples "
             f"(noise {summary['noise']} x embedding std), window {summary['window']}; "
             f"mean P(o) clean {summary['clean']:.3f}, corrupted {summary['corrupted']:.3f}, "
             f"ATE {summary['ate']:.3f}" + (f"; {summary['seconds']:.0f} s" if "seconds" in summary else "")]
    for kind, table in summary["effects"].items():
        lines.append(f"{'AIE of restoring ' + kind + ', layer':<36}" + " ".join(f"{l:>6}" for l in range(L)))
        for role, row, count in zip(summary["roles"], table, summary["counts"]):
            lines.append(f"  {role:<24} (n={count:>3})  " + " ".join(f"{v:6.3f}" for v in row))
    if "best_mlp_layer" in summary:
        lines.append(f"strongest MLP effect at the last subject token: layer {summary['best_mlp_layer']}; "
                     f"among layers 1-{L - 1}: layer {summary['best_mlp_layer_after_first']}")
    return "\n".join(lines)

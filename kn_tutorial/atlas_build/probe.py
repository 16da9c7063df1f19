"""The probe of issue 16 (Atlas v3): where does a trained Atlas variant keep its facts?

`python -m kn_tutorial.atlas probe --model DIR` (or `probe(model, tokenizer, world)`) prints
and returns, as JSON, the measures by which the sweep of Atlas variants is judged, sized to
run in a few minutes on one CPU thread. It only calls the package's methods:

- recall (`scoring.score`, first token) on a seeded sample of facts, with the relation's
  training templates, its held-out frames, held-out contexts with words before the subject
  (`contexts.sample_context(heldout=True)`, half of them also preceded by a held-out
  unrelated sentence) and the novel wordings;
- causal tracing (Meng et al., 2022, section 2; `tracing.average_effects`) over `n_trace`
  known facts (subject-first prompt, as `trace_check`): the AIE of the MLP at the last subject
  token by layer with window 1, and with a window of `window` consecutive MLP layers centred
  on the layer (the paper restores 10 of GPT-2 XL's 48 layers, about a fifth of the depth;
  3 of Atlas's 8-12 layers is the nearest odd window), the ratio best MLP AIE at layers >= 1
  over layer 0 (for a window: the best window that leaves layer 0 out, over the one centred on 0), and the layer where the hidden state's AIE there peaks;
- the severed test (the paper's figure 3; `tracing.severed_effects`): the hidden state's
  AIE at the last subject token with later MLPs, or later attention, frozen at their
  corrupted values; "drop" is the mean over the lower half of the layers of none - severed;
- Geva et al. (2021): the change of key activations when the last token of a trigger
  example is removed (`memories.token_removal_effect`) and the share of keys semantic
  beyond their tokens (`memories.trigger_sharing`), per layer, on a sample of the corpus;
- Dai et al. (2022): the share of refined knowledge neurons (`neurons.find_knowledge_neurons`,
  adaptive p) in layer 0, on a few facts per relation.
"""
from __future__ import annotations

import random
import time

import numpy as np

from ..atlas.contexts import fillers, sample_context
from ..atlas.templates import TEMPLATES, fill
from ..atlas.world import World
from ..scoring import score
from ..tracing import ROLES, window_layers
from ..tracing_averages import average_effects, severed_effects
from .trace_check import known_facts

RECALL_GROUPS = ("train", "heldout_frames", "heldout_contexts", "novel")


def recall_rows(world: World, n_facts: int = 400, seed: int = 0) -> list[dict]:
    """Prompts of a seeded sample of facts, one row per (fact, prompt), with its group."""
    rng = random.Random(seed)
    facts = world.sample(n_facts, seed=seed)
    held_fillers = fillers(heldout=True)
    rows = []
    for f in facts:
        t = TEMPLATES[f.relation]
        prompts = [("train", x) for x in t.train] + [("heldout_frames", x) for x in t.heldout]
        prompts += [("novel", x) for x in t.novel]
        for k in range(2):
            ctx = sample_context(rng, heldout=True)
            template = ctx.apply(rng.choice(t.followup if ctx.pronoun else t.train))
            if k == 1:
                template = f"{rng.choice(held_fillers)} {template}"
            prompts.append(("heldout_contexts", template))
        for group, template in prompts:
            rows.append({"group": group, "prompt": fill(template, f.subject, f.subject_kind),
                         "target": f.object, "relation": f.relation})
    return rows


def recall_probe(model, tokenizer, world: World, n_facts: int = 400, seed: int = 0, batch_size: int = 256) -> dict:
    """First-token recall by group (fractions), and one example prompt per group."""
    rows = recall_rows(world, n_facts, seed)
    correct = score(model, tokenizer, [r["prompt"] for r in rows], [r["target"] for r in rows],
                    batch_size=batch_size)["first_correct"].tolist()
    out = {}
    for group in RECALL_GROUPS:
        hits = [c for r, c in zip(rows, correct) if r["group"] == group]
        out[group] = sum(hits) / len(hits)
    out["n_facts"] = min(n_facts, len(world))
    out["examples"] = {g: next(r["prompt"] for r in rows if r["group"] == g) for g in RECALL_GROUPS}
    return out


def _round(values, digits: int = 4):
    return [round(float(v), digits) for v in values]


def trace_probe(model, tokenizer, world: World, n_facts: int = 200, samples: int = 3, noise: float = 3.0,
                window: int = 3, seed: int = 0, batch_size: int = 512) -> dict:
    """Causal-tracing measures at the last subject token (see the module docstring)."""
    facts = known_facts(model, tokenizer, n_facts, seed, world=world)
    if not facts:
        return {"n_facts": 0, "error": "the model knows none of the sampled facts"}
    last = ROLES.index("last subject token")
    one = average_effects(model, tokenizer, facts, samples=samples, noise=noise, window=1, seed=seed,
                          batch_size=batch_size)
    wide = average_effects(model, tokenizer, facts, kinds=("mlp",), samples=samples, noise=noise,
                           window=window, seed=seed, batch_size=batch_size)
    severed = severed_effects(model, tokenizer, facts, samples=samples, noise=noise, seed=seed,
                              batch_size=batch_size)
    out = {"n_facts": len(facts), "samples": samples, "noise": noise, "window": window,
           "clean": round(one["clean"], 4), "corrupted": round(one["corrupted"], 4), "ate": round(one["ate"], 4)}
    L = len(one["effects"]["mlp"][last])
    for name, curve, w in (("mlp", one["effects"]["mlp"][last], 1), ("mlp_window", wide["effects"]["mlp"][last], window)):
        curve = np.asarray(curve)
        # "after the first": windows that leave layer 0 out (a window centred on layer 1 contains it)
        first = next((l for l in range(1, L) if min(window_layers(l, w, L)) >= 1), L - 1)
        best = first + int(np.argmax(curve[first:]))
        out[name] = {"aie": _round(curve), "layer0": round(float(curve[0]), 4), "best_after_first": best,
                     "best_after_first_aie": round(float(curve[best]), 4),
                     "ratio": round(float(curve[best] / curve[0]), 3) if curve[0] > 0 else None}
    hidden = np.asarray(one["effects"]["hidden"][last])
    out["hidden"] = {"aie": _round(hidden), "peak_layer": int(np.argmax(hidden)), "peak_aie": round(float(hidden.max()), 4)}
    out["attn"] = {"aie": _round(one["effects"]["attn"][last])}
    half = max(1, len(hidden) // 2)
    out["severed"] = {name: _round(severed[name]) for name in ("none", "mlp", "attn")}
    for name in ("mlp", "attn"):
        out["severed"][f"drop_{name}"] = round(float(np.mean(severed["none"][:half] - severed[name][:half])), 4)
    return out


def geva_probe(model, tokenizer, world: World, n_sentences: int = 1500, seed: int = 0) -> dict:
    """Token-removal effect and semantic-beyond-tokens share of keys, per layer."""
    from ..memories import atlas_sentences, find_triggers, token_removal_effect, trigger_sharing

    sentences = atlas_sentences(world, n=n_sentences, seed=seed)
    triggers = find_triggers(model, tokenizer, [s.text for s in sentences], top_k=25, batch_size=128)
    removal = token_removal_effect(model, triggers, n_keys=16, n_examples=3, seed=seed, pad_id=tokenizer.pad_token_id)
    labels = {"relation": [s.fact.relation for s in sentences], "continent": [s.continent for s in sentences]}
    keys = trigger_sharing(triggers, labels, n_examples=10, seed=seed)["keys"]
    return {"n_sentences": len(sentences), "remove_last": _round(removal["last"]),
            "remove_first": _round(removal["first"]),
            "semantic_relation": _round(keys["relation beyond tokens"]),
            "semantic_continent": _round(keys["continent beyond tokens"])}


def kn_probe(model, tokenizer, world: World, per_relation: int = 2, seed: int = 0) -> dict:
    """Where the refined knowledge neurons of a few facts per relation sit (Dai et al., adaptive p)."""
    from ..neurons import find_knowledge_neurons, layer_histogram

    rng = random.Random(seed)
    facts = [f for rel in world.relations for f in rng.sample(world.facts_of(rel), per_relation)]
    found, adapted = find_knowledge_neurons(model, tokenizer, facts, steps=20)
    hist = layer_histogram([f.neurons for f in found], model.config.n_layer)
    total = sum(hist)
    return {"n_facts": len(facts), "p": round(adapted.p, 3), "by_layer": hist,
            "share_layer0": round(hist[0] / total, 3) if total else None}


def model_world(model_dir) -> World:
    """The world a saved model was trained on, from its training_report.json config (the shipped
    world when the report names none)."""
    import json
    from pathlib import Path

    path = Path(model_dir) / "training_report.json"
    return world_of_config(json.loads(path.read_text()).get("config", {}) if path.exists() else {})


def world_of_config(config: dict) -> World:
    """The world a training config (as stored in training_report.json) describes."""
    from dataclasses import fields

    from .train import TrainConfig, config_world

    known = {f.name for f in fields(TrainConfig)}
    return config_world(TrainConfig(**{k: v for k, v in config.items() if k in known}))


def probe(model, tokenizer, world: World, n_trace: int = 200, n_recall: int = 400, samples: int = 3,
          window: int = 3, geva: bool = True, kn_per_relation: int = 2, seed: int = 0) -> dict:
    """All measures (module docstring), with the seconds each part took."""
    out, seconds = {}, {}
    parts = [("recall", lambda: recall_probe(model, tokenizer, world, n_recall, seed)),
             ("trace", lambda: trace_probe(model, tokenizer, world, n_trace, samples, window=window, seed=seed))]
    if geva:
        parts.append(("geva", lambda: geva_probe(model, tokenizer, world, seed=seed)))
    if kn_per_relation > 0:
        parts.append(("knowledge_neurons", lambda: kn_probe(model, tokenizer, world, kn_per_relation, seed)))
    for name, run in parts:
        started = time.time()
        out[name] = run()
        seconds[name] = round(time.time() - started, 1)
    out["seconds"] = seconds
    return out


def format_probe(result: dict) -> str:
    """A few lines of text: recall, the MLP site, the hidden peak, the severed test, Geva, KN."""
    lines = []
    r = result["recall"]
    lines.append("recall (first token): " + ", ".join(f"{g} {100 * r[g]:.1f}%" for g in RECALL_GROUPS))
    t = result["trace"]
    if t.get("n_facts"):
        for name, label in (("mlp", "window 1"), ("mlp_window", f"window {t['window']}")):
            m = t[name]
            lines.append(f"MLP AIE at the last subject token ({label}): " + " ".join(f"{v:.3f}" for v in m["aie"])
                         + f"; layer 0 {m['layer0']:.3f}, best >= 1: layer {m['best_after_first']} "
                           f"{m['best_after_first_aie']:.3f}, ratio {m['ratio']}")
        lines.append(f"hidden AIE there: " + " ".join(f"{v:.3f}" for v in t["hidden"]["aie"])
                     + f"; peak at layer {t['hidden']['peak_layer']}")
        s = t["severed"]
        lines.append(f"severed (lower half, mean drop of hidden AIE): MLPs {s['drop_mlp']:.3f}, attention {s['drop_attn']:.3f}")
    else:
        lines.append("causal tracing: " + t.get("error", "no facts"))
    if "geva" in result:
        g = result["geva"]
        lines.append("removing the last token, change of m by layer (%): " + " ".join(f"{100 * v:.0f}" for v in g["remove_last"]))
        lines.append("keys semantic for relation beyond tokens (%): " + " ".join(f"{100 * v:.0f}" for v in g["semantic_relation"]))
        lines.append("keys semantic for continent beyond tokens (%): " + " ".join(f"{100 * v:.0f}" for v in g["semantic_continent"]))
    if "knowledge_neurons" in result:
        k = result["knowledge_neurons"]
        lines.append(f"knowledge neurons of {k['n_facts']} facts by layer: {k['by_layer']} (share in layer 0: {k['share_layer0']})")
    lines.append("seconds: " + ", ".join(f"{k} {v}" for k, v in result["seconds"].items()))
    return "\n".join(lines)

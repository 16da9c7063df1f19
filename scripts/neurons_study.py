"""The knowledge-neuron study of chapter 4 (Dai et al., 2022) over 200 Atlas facts.

Integrated gradients over every prompt of 200 facts (40 per relation) takes minutes on a
CPU, longer than the chapter may run under nbval, so this script computes the refinement
once and writes kn_tutorial/book_data/neurons_study.json; the chapter loads it, recomputes a sample
live and asserts that it agrees. Steps, all through kn_tutorial.neurons:

  1. sample 40 facts per relation (seeded), keep those the model recalls greedily;
  2. refinement with the adaptive p (t = 0.2, p from 0.7 in steps of 0.05 to a mean of 2-5
     knowledge neurons per fact); relation-level neurons (>= 10% of a relation's facts); the
     same refinement with the threshold taken over layers 1.. only ("upper"), from the same
     integrated gradients;
  3. suppress (x0) and amplify (x2) each fact's knowledge neurons at the last prompt token,
     with random neurons from the same layers as the control;
  4. erase each relation (zero the value slots of its 20 most common knowledge neurons);
  5. update facts by Dai et al.'s rule (kn_edit) on Atlas-CounterFact cases of the analysed
     facts, scored with kn_tutorial.evaluation (ES/PS/NS), with a random-neuron control.

    OMP_NUM_THREADS=1 nice -n 19 python scripts/neurons_study.py            # all of it
    python scripts/neurons_study.py --per-relation 4 --out /tmp/small.json  # a quick check
Same command, same numbers (seeded).
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from kn_tutorial import book_data
from kn_tutorial import neurons as N
from kn_tutorial.atlas.counterfact import load_counterfact
from kn_tutorial.atlas.templates import TEMPLATES, fill
from kn_tutorial.atlas.world import load_world
from kn_tutorial.evaluation import evaluate_cases, summarize
from kn_tutorial.files import write_json
from kn_tutorial.attribution import integrated_gradients
from kn_tutorial.models import d_ff, load_model, n_layers
from kn_tutorial.progress import progress
from kn_tutorial.scoring import score

ROOT = Path(__file__).resolve().parents[1]


def sample_facts(world, per_relation: int, seed: int):
    rng = random.Random(seed)
    return [f for rel in world.relations for f in rng.sample(world.facts_of(rel), per_relation)]


def known(model, tokenizer, facts):
    prompts = [fill(TEMPLATES[f.relation].train[0], f.subject, f.subject_kind) for f in facts]
    ok = score(model, tokenizer, prompts, [" " + f.object for f in facts])["all_correct"]
    return [f for f, good in zip(facts, ok.tolist()) if good]


def update_study(model, tokenizer, found, relation_level, n_cases: int, lambdas, seed: int, upper=None):
    """kn_edit on the Atlas-CounterFact case of each analysed fact (up to n_cases)."""
    by_key = {(f.subject, f.relation): f for f in found}
    cases = [c for c in load_counterfact()
             if (c["requested_rewrite"]["subject"], c["requested_rewrite"]["relation_id"]) in by_key]
    cases = random.Random(seed).sample(cases, min(n_cases, len(cases)))
    rows = {"unedited": evaluate_cases(model, tokenizer, cases)}
    generator = torch.Generator().manual_seed(seed)
    for case in cases:
        request = case["requested_rewrite"]
        fact = by_key[(request["subject"], request["relation_id"])]
        specific = N.split_neurons(fact, relation_level)[0]
        sets = {"fact-specific": specific, "all knowledge": fact.neurons,
                "random": N.random_like(specific, d_ff(model), generator, exclude=fact.neurons)}
        if upper is not None:
            sets["above layer 0"] = upper[found.index(fact)].neurons
        for lam in lambdas:
            for name, neurons in sets.items():
                if name != "fact-specific" and lam != 8.0:
                    continue
                if neurons:
                    with N.kn_edit(model, tokenizer, request, neurons=neurons, lambda_new=lam):
                        result = evaluate_cases(model, tokenizer, [case])[0]
                else:  # nothing to change (kn_edit refuses an empty list): the case as the unedited model scores it
                    result = evaluate_cases(model, tokenizer, [case])[0]
                result["n_neurons"] = len(neurons)
                rows.setdefault(f"{name}, λ2 = {lam:g}", []).append(result)
    out = {}
    for name, results in rows.items():
        out[name] = summarize(results)
        if results and "n_neurons" in results[0]:
            out[name]["edited (non-empty)"] = sum(r["n_neurons"] > 0 for r in results)
    return [c["case_id"] for c in cases], out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-relation", type=int, default=40)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--out", type=Path, default=book_data.path("neurons_study"))
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    started = time.time()
    model, tokenizer = load_model("atlas")
    world = load_world()
    sampled = sample_facts(world, args.per_relation, args.seed)
    facts = known(model, tokenizer, sampled)
    print(f"{len(facts)} of {len(sampled)} sampled facts recalled greedily")

    t0 = time.time()
    found, upper = [], []  # Dai et al.'s refinement over all layers; the same above the first layer
    for fact in progress(facts, desc="integrated gradients"):
        prompts = N.fact_prompts(fact)
        attr = integrated_gradients(model, tokenizer, prompts, " " + fact.object, steps=args.steps)  # [n, L, d_ff]
        for out, min_layer in ((found, 0), (upper, 1)):
            counts = N.prompt_counts(attr, N.THRESHOLD, min_layer=min_layer)
            out.append(N.FactNeurons(fact.subject, fact.relation, fact.object, prompts, counts))
    adapted, adapted_upper = (N.adapt_p([f.counts for f in fs], [f.n_prompts for f in fs]) for fs in (found, upper))
    for fs, a in ((found, adapted), (upper, adapted_upper)):
        for f in fs:
            f.set_p(a.p)
    t_ig = time.time() - t0
    relation_level = N.relation_neurons(found)
    L = n_layers(model)
    specific = [N.split_neurons(f, relation_level)[0] for f in found]
    shared = [N.split_neurons(f, relation_level)[1] for f in found]
    print(f"p = {adapted.p} (converged {adapted.converged}), mean {adapted.mean_count:.2f} neurons per fact; "
          f"history {adapted.history}; IG {t_ig:.0f} s")

    print(f"above the first layer: p = {adapted_upper.p} (converged {adapted_upper.converged}), mean "
          f"{adapted_upper.mean_count:.2f}; history {adapted_upper.history}")

    t0 = time.time()
    records = N.suppress_amplify(model, tokenizer, found, world.facts, relation_level=relation_level,
                                 seed=args.seed, show_progress=True)
    records_upper = N.suppress_amplify(model, tokenizer, upper, world.facts, seed=args.seed, show_progress=True)
    t_sa = time.time() - t0
    effects = {metric: N.summarize_effects(records, metric) for metric in ("rel_change", "dp", "dlogp")}
    effects_upper = {metric: N.summarize_effects(records_upper, metric) for metric in ("rel_change", "dp", "dlogp")}
    for row in effects["rel_change"]:
        print(f"  {row['neurons']:>26} x{row['factor']:g} {row['group']:>15}: {100 * row['mean']:+.2f}% ± {100 * row['ci95']:.2f}")

    t0 = time.time()
    eval_facts = sample_facts(world, 50, args.seed + 1)
    erase = [r for rel in world.relations for r in N.erase_relation(model, tokenizer, found, rel, eval_facts, k=20,
                                                                    seed=args.seed)]
    t_erase = time.time() - t0

    t0 = time.time()
    case_ids, update = update_study(model, tokenizer, found, relation_level, args.cases, (1.0, 4.0, 8.0, 16.0, 32.0),
                                   args.seed, upper=upper)
    t_update = time.time() - t0
    for name, row in update.items():
        print(f"  update {name:>28}: " + ", ".join(f"{k} {v:.1f}" for k, v in row.items()))

    result = {
        "model": "atlas", "config": vars(args) | {"out": str(args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out)},
        "threshold": N.THRESHOLD, "p_start": N.P_START, "p_step": N.P_STEP, "relation_share": N.RELATION_SHARE,
        "n_sampled": len(sampled), "n_facts": len(found),
        "adapted": {"p": adapted.p, "mean_count": adapted.mean_count, "converged": adapted.converged,
                    "history": adapted.history},
        "layer_histogram": {"all": N.layer_histogram([f.neurons for f in found], L),
                            "fact-specific": N.layer_histogram(specific, L),
                            "relation-level": N.layer_histogram(shared, L)},
        "relation_level": {rel: [[l, i, share] for (l, i), share in d.items()] for rel, d in relation_level.items()},
        "effects": effects,
        "check_facts": list(range(0, len(found), 20)),  # the chapter recomputes these live
        "records_sample": [r for r in records if r["fact"] % 20 == 0],
        "upper": {"adapted": {"p": adapted_upper.p, "mean_count": adapted_upper.mean_count,
                              "converged": adapted_upper.converged, "history": adapted_upper.history},
                  "layer_histogram": N.layer_histogram([f.neurons for f in upper], L),
                  "effects": effects_upper,
                  "records_sample": [r for r in records_upper if r["fact"] % 20 == 0],
                  "facts": N.found_to_json(upper)},
        "erase": erase,
        "update": {"case_ids": case_ids, "summary": update},
        "facts": N.found_to_json(found),
        "seconds": {"integrated_gradients": round(t_ig), "suppress_amplify": round(t_sa), "erase": round(t_erase),
                    "update": round(t_update), "total": round(time.time() - started)},
    }
    write_json(args.out, result, indent=None, ensure_ascii=False, separators=(",", ":"))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB) in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()

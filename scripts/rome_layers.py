"""Which layer should ROME edit in Atlas? ROME at every layer on a seeded sample of Atlas-CounterFact.

For each layer (and each setting in --configs, overrides of hparams/rome/atlas.json): the condition
number of C = E[k kᵀ], how well the v* optimisation reached o* (its final NLL, and how often ‖δ‖ hit
the clamp), and ES/PS/NS/S of the edits (each undone before the next). Chapter 6 loads the result.

    OMP_NUM_THREADS=1 nice -n 19 python scripts/rome_layers.py --n 50
    python scripts/rome_layers.py --n 100 --configs '{"paper": {}, "clamp 10": {"clamp_norm_factor": 10}}'
Writes kn_tutorial/book_data/rome_layers.json.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from kn_tutorial import book_data
from kn_tutorial.atlas_build.rome_check import sample_cases
from kn_tutorial.evaluation import evaluate_cases, summarize
from kn_tutorial.files import write_json
from kn_tutorial.models import load_model, n_layers
from kn_tutorial.progress import progress
from kn_tutorial.rome import RomeHparams, edit, sample_prefixes
from kn_tutorial.stats import second_moment

OUT = book_data.path("rome_layers")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1, help="case sample seed (the table uses 0)")
    parser.add_argument("--layers", default=None, help="comma-separated; default all but the last")
    parser.add_argument("--configs", default='{"atlas.json": {}}', help="JSON {name: hparam overrides}")
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    model, tokenizer = load_model("atlas", device=args.device)
    base = RomeHparams.for_model("atlas")
    # the last block is left out: ROME refuses it (no later layer carries v* to the prediction, ΔW = 0)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(n_layers(model) - 1))
    configs = json.loads(args.configs)
    cases = sample_cases(args.n, args.seed)
    prefixes = sample_prefixes(model, tokenizer, base.prefixes, seed=base.seed)
    rows = []
    for layer in layers:
        started = time.time()
        mom2 = second_moment(model, tokenizer, layer, corpus=base.mom2_corpus, n_samples=base.mom2_n_samples)
        stats_seconds = time.time() - started
        eig = torch.linalg.eigvalsh(mom2.double())
        for name, overrides in configs.items():
            hp = replace(base, layer=layer, **overrides)
            results, nll, clamped = [], [], 0
            started = time.time()
            for case in progress(cases, desc=f"layer {layer} {name}"):
                with edit(model, tokenizer, case["requested_rewrite"], hp, mom2=mom2, prefixes=prefixes) as e:
                    results.extend(evaluate_cases(model, tokenizer, [case]))
                    nll.append(e.v_losses[-1]["nll"])
                    # the clamp is ‖δ‖ ≤ clamp_norm_factor · ‖m‖ with decay = w · ‖δ‖^decay_power / ‖m‖²
                    last = e.v_losses[-1]
                    m_norm = ((hp.v_weight_decay * last["delta_norm"] ** hp.decay_power / last["decay"]) ** 0.5
                              if last["decay"] > 0 else 0)
                    clamped += last["delta_norm"] >= 0.999 * hp.clamp_norm_factor * m_norm > 0
            s = summarize(results)
            row = {"layer": layer, "config": name, "overrides": overrides, "cond_C": (eig[-1] / eig[0]).item(),
                   "min_eig_C": eig[0].item(), "v_nll_mean": sum(nll) / len(nll),
                   "v_nll_below_0.5": sum(x < 0.5 for x in nll) / len(nll), "clamped": clamped / len(nll),
                   "seconds_per_edit": (time.time() - started) / len(cases), "stats_seconds": stats_seconds,
                   **{k: s[k] for k in ("ES", "PS", "NS", "S", "EM", "PM", "NM")}}
            rows.append(row)
            _write(args.out, cases, args.seed, base, configs, model, rows)  # after every layer: a partial run keeps its rows
            print(f"layer {layer} {name:<12} cond {row['cond_C']:.1e}  v* NLL {row['v_nll_mean']:.2f} "
                  f"clamped {row['clamped']:.0%}  ES {s['ES']:5.1f} PS {s['PS']:5.1f} NS {s['NS']:5.1f} S {s['S']:5.1f} "
                  f"({row['seconds_per_edit']:.2f} s/edit)", flush=True)
    print(f"wrote {args.out}")
    return json.loads(Path(args.out).read_text())


def _write(out, cases, seed, base, configs, model, rows) -> None:
    result = {"n_cases": len(cases), "seed": seed, "base_hparams": asdict(base), "configs": configs,
              "device": str(next(model.parameters()).device), "rows": rows}
    write_json(out, result)


if __name__ == "__main__":
    main()

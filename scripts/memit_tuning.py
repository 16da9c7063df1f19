"""Choosing MEMIT's settings for Atlas (Meng et al., 2023) on a tuning sample, from a handful of edits to thousands.

The paper's MEMIT (one pass) for each candidate set of layers, with and without the paper's random
prefixes, at several batch sizes n and covariance weights λ. The n edited cases are the first n of a
seeded permutation of Atlas-CounterFact (seed 1 by default: the tuning order; chapter 7's curve is
scored on seed 0). For each (layers, prefixes, n) the targets z are optimised once, and every λ is
solved from them (λ does not enter z). Each row: ES/PS/NS/S on at most --eval-cases of the edited
cases, their neighbourhood prompts about edited facts left out (as in scripts/memit_scaling.py).

    OMP_NUM_THREADS=2 python scripts/memit_tuning.py --out kn_tutorial/book_data/memit_tuning.json
    python scripts/memit_tuning.py --layers 0,1,2,3 --sizes 10 --lambdas 300 --eval-cases 10 --out /tmp/t.json

Same command, same numbers (seeded). Writes the rows after every (layers, prefixes, n).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kn_tutorial import book_data, memit  # noqa: E402
from kn_tutorial.atlas.counterfact import load_counterfact  # noqa: E402
from kn_tutorial.evaluation import evaluate_cases, summarize, without_edited_neighbours  # noqa: E402
from kn_tutorial.files import write_json  # noqa: E402
from kn_tutorial.models import load_model  # noqa: E402
from kn_tutorial.stats import second_moment  # noqa: E402

PAPER_PREFIXES = memit.MemitHparams.__dataclass_fields__["prefixes"].default  # the MEMIT code's: five of 10 tokens


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", nargs="+", default=["0,1,2,3", "1,2,3,4", "0,1,2,3,4"],
                        help="candidate layer sets, each comma-separated")
    parser.add_argument("--prefixes", nargs="+", default=["none", "paper"], choices=["none", "paper"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[10, 100, 1000])
    parser.add_argument("--lambdas", nargs="+", type=float, default=[100, 300, 1000, 3000, 10000])
    parser.add_argument("--eval-cases", type=int, default=100)
    parser.add_argument("--seed", type=int, default=1, help="the case order (1: tuning; the book reports seed 0)")
    parser.add_argument("--out", default=str(book_data.path("memit_tuning")))
    args = parser.parse_args(argv)
    started = time.time()
    model, tokenizer = load_model("atlas")
    base = replace(memit.MemitHparams.for_model("atlas"), passes=1)
    cases = load_counterfact()
    order = random.Random(args.seed).sample(cases, len(cases))
    rows = []

    def write(final: bool = False) -> dict:
        out = {"paper": "Meng et al. (2023), Mass-Editing Memory in a Transformer",
               "purpose": "tuning sample for hparams/memit/atlas.json", "seed": args.seed,
               "eval_cases": args.eval_cases, "base_hparams": asdict(base), "rows": rows,
               "seconds": time.time() - started, "complete": final,
               "command": "python scripts/memit_tuning.py " + " ".join(argv if argv is not None else sys.argv[1:])}
        write_json(args.out, out)  # atomic, with a unique temporary name
        return out

    mom2: dict = {}
    for layer_text in args.layers:
        layers = tuple(int(x) for x in layer_text.split(","))
        for layer in layers:
            if layer not in mom2:
                mom2[layer] = second_moment(model, tokenizer, layer, corpus=base.mom2_corpus,
                                            n_samples=base.mom2_n_samples)
        for prefix_name in args.prefixes:
            hp = replace(base, layers=layers, prefixes=PAPER_PREFIXES if prefix_name == "paper" else ())
            for n in args.sizes:
                edited = order[:n]
                scored = edited if n <= args.eval_cases else random.Random(args.seed + n).sample(edited, args.eval_cases)
                scored, _ = without_edited_neighbours(scored, edited)
                t = time.time()
                reqs, groups, hp_checked, prefixes = memit.prepare(model, tokenizer, edited, hp)
                targets = memit.compute_targets(model, tokenizer, reqs, groups, hp_checked.layers[-1], prefixes, hp_checked)
                target_seconds = time.time() - t
                for lam in args.lambdas:
                    with memit.edit(model, tokenizer, edited, replace(hp, mom2_update_weight=lam, mom2_update_weight_per_key=None), mom2=mom2,
                                    targets=targets):
                        s = summarize(evaluate_cases(model, tokenizer, scored))
                    row = {"layers": list(layers), "prefixes": prefix_name, "n_edits": n, "lambda": lam,
                           "z_nll": targets.final_nll.mean().item(), "target_seconds": target_seconds,
                           **{k: s[k] for k in ("ES", "PS", "NS", "S", "EM", "PM", "NM", "n")}}
                    rows.append(row)
                    print(f"layers {layer_text:<10} prefixes {prefix_name:<5} n={n:<5} λ={lam:<7g} ES {s['ES']:5.1f} "
                          f"PS {s['PS']:5.1f} NS {s['NS']:5.1f} S {s['S']:5.1f}", flush=True)
                write()
    return write(final=True)


if __name__ == "__main__":
    main()

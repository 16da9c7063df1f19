"""Choosing FT and FT+L's Atlas settings (kn_tutorial.finetune.TUNED) on a tuning sample.

FT and FT+L fine-tune the MLP output projection of ROME's layer (Meng et al., 2022, the baselines of
table 4). For each learning rate (FT) and each ε of FT+L's L∞ clip, single edits of --n cases of the
tuning sample (seed 1; the comparison table reports seed 0), each undone before the next; ES/PS/NS.

    OMP_NUM_THREADS=1 python scripts/ft_tuning.py --n 20 --lrs 5e-4 5e-3 --epsilons 1e-2 3e-2
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kn_tutorial.atlas_build.rome_check import sample_cases  # noqa: E402
from kn_tutorial.evaluation import evaluate_editor, summarize  # noqa: E402
from kn_tutorial.files import write_json  # noqa: E402
from kn_tutorial.finetune import FTHparams, fine_tune  # noqa: E402
from kn_tutorial.models import load_model  # noqa: E402


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--lrs", nargs="+", type=float, default=[5e-4, 5e-3])
    parser.add_argument("--epsilons", nargs="+", type=float, default=[1e-2, 3e-2])
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    model, tokenizer = load_model("atlas")
    cases = sample_cases(args.n, args.seed)
    base = FTHparams.for_model("atlas")
    rows = []
    configs = [(lr, None) for lr in args.lrs] + [(lr, eps) for lr in args.lrs for eps in args.epsilons]
    for lr, eps in configs:
        hp = replace(base, lr=lr, norm_constraint=eps)
        results = evaluate_editor(model, tokenizer, cases, lambda m, t, r: fine_tune(m, t, r, hp), generation=False,
                                  desc=f"lr {lr:g} eps {eps}")
        s = summarize(results)
        rows.append({"layer": hp.layer, "lr": lr, "steps": hp.steps, "norm_constraint": eps,
                     **{k: s[k] for k in ("ES", "PS", "NS", "S")}})
        print(f"layer {hp.layer} lr {lr:<7g} ε {str(eps):<7} ES {s['ES']:5.1f} PS {s['PS']:5.1f} NS {s['NS']:5.1f} "
              f"S {s['S']:5.1f}", flush=True)
        if args.out:
            write_json(args.out, {"seed": args.seed, "n": args.n, "rows": rows})  # atomic: never half a file
    return rows


if __name__ == "__main__":
    main()

"""The editing comparison table of ROME's paper (Meng et al., 2022, table 4) on Atlas-CounterFact.

For a seeded sample of Atlas-CounterFact cases, each editor writes each case's new fact into the
unchanged model (independent single edits; the weights are restored exactly after every case), and
the case is scored: efficacy ES/EM, paraphrase PS/PM, neighbourhood NS/NM, S, fluency GE.

Editors: the unedited model; FT and FT+L (fine-tuning the MLP output projection of ROME's layer,
`kn_tutorial.finetune`); KN (the knowledge-neuron update of chapter 4, `kn_tutorial.neurons.kn_edit`,
when it exists); ROME (`kn_tutorial.rome.edit`).

    OMP_NUM_THREADS=1 nice -n 19 python scripts/rome_table.py            # 200 cases, seed 0
    python scripts/rome_table.py --n 50 --methods ROME --out /tmp/t.json

Writes kn_tutorial/book_data/rome_table.json (summaries, every case's row, settings, timings); chapter 6 loads it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from kn_tutorial import book_data
from kn_tutorial.atlas_build.rome_check import sample_cases
from kn_tutorial.evaluation import comparison_table, evaluate_editor, standard_editors, summarize
from kn_tutorial.files import write_json
from kn_tutorial.models import load_model
from kn_tutorial.rome import RomeHparams
from kn_tutorial.stats import model_fingerprint

OUT = book_data.path("rome_table")
METHODS = ("unedited", "FT", "FT+L", "KN", "ROME")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="number of cases (a seeded sample)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--gen-tokens", type=int, default=20, help="tokens sampled per generation prompt (GE)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--update", action="store_true",
                        help="keep the other methods' rows of an existing --out (same cases and model) and rerun only --methods")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    model, tokenizer = load_model("atlas")
    editors, settings, notes = standard_editors(model, tokenizer)
    cases = sample_cases(args.n, args.seed)
    wanted = [m for m in args.methods.split(",") if m in editors]
    result = {"model": "atlas", "fingerprint": model_fingerprint(model, RomeHparams.for_model("atlas").layer),
              "n_cases": len(cases), "seed": args.seed, "gen_tokens": args.gen_tokens,
              "case_ids": [c["case_id"] for c in cases], "command": "python scripts/rome_table.py " + " ".join(argv or sys.argv[1:]),
              "device": str(next(model.parameters()).device), "settings": settings, "notes": notes,
              "summary": {}, "seconds_per_case": {}, "cases": {}}
    if args.update and Path(args.out).exists():
        old = json.loads(Path(args.out).read_text())
        if (old["case_ids"], old["fingerprint"]) != (result["case_ids"], result["fingerprint"]):
            raise SystemExit(f"--update: {args.out} was made from other cases or another model; rerun every method")
        for key in ("settings", "summary", "seconds_per_case", "cases"):
            result[key] = {**{m: v for m, v in old[key].items() if m not in wanted}, **{m: result[key][m] for m in result[key] if m in wanted}}
        result["command"] = old["command"] + " ; then " + result["command"]
    for method in wanted:
        started = time.time()
        rows = evaluate_editor(model, tokenizer, cases, editors[method], max_new_tokens=args.gen_tokens, desc=method)
        result["seconds_per_case"][method] = (time.time() - started) / len(cases)
        result["cases"][method] = rows
        result["summary"][method] = summarize(rows)
        s = result["summary"][method]
        print(f"{method:<9} ES {s['ES']:5.1f} PS {s['PS']:5.1f} NS {s['NS']:5.1f} S {s['S']:5.1f} GE {s.get('GE', float('nan')):.2f} "
              f"({result['seconds_per_case'][method]:.2f} s/case)", flush=True)
    for note in notes:
        print(note)
    print(comparison_table(result["summary"]).to_string())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

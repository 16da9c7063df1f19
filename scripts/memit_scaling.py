"""The scaling curve of Meng et al. (2023), figure 5, on Atlas-CounterFact: edit n facts at once
with MEMIT, one after another with ROME, or by fine-tuning, and score ES/PS/NS/S and fluency.

    OMP_NUM_THREADS=1 python scripts/memit_scaling.py                 # writes kn_tutorial/book_data/memit_scaling.json
    python scripts/memit_scaling.py --sizes 1 10 100 --eval-cases 100  # a quick look

The n edited cases are the first n of one seeded permutation of all cases (so the sets are nested,
and sequential ROME reaches every size in one pass, scored at each size on the way). Scores are
means over a seeded sample of at most --eval-cases of the edited cases (all of them when n is
smaller), without the neighbourhood prompts about facts that are among the n edited ones
(`evaluation.without_edited_neighbours`; the JSON gives the fraction dropped at each size);
fluency is the n-gram entropy (evaluation.ngram_entropy) of sampled continuations of the
generation prompts of at most --fluency-cases of them. The JSON says which sizes were subsampled.

Methods (every edit is undone exactly before the next method runs):
- MEMIT: memit.edit with MemitHparams.for_model(model) (all n requests at once; for Atlas in two
  passes, see memit.py); at the largest size <= 1000 also with one pass, the paper's MEMIT
  (`passes_ablation`), and there with each pass's target z written in by hand (`diagnosis`);
- ROME: rome.edit applied n times in a row (RomeHparams.for_model(model)); stops when it has
  used --rome-seconds, and the JSON lists the sizes it reached;
- FT-L: fine-tuning the MLP output projection of ROME's layer (one layer, as in the ROME paper's FT+L baseline)
  on the n rewrite prompts at once
  (Adam; each step a seeded minibatch of at most 256 requests; every entry of ΔW clipped to
  [−ε, ε] after each step), with finetune.TUNED's learning rate, steps and ε for Atlas;
- unedited: the same prompts without any edit (the reference for NS and fluency).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kn_tutorial import book_data, memit, rome  # noqa: E402
from kn_tutorial.atlas.counterfact import load_counterfact  # noqa: E402
from kn_tutorial.evaluation import (  # noqa: E402
    evaluate_cases, ngram_entropy, summarize, without_edited_neighbours)
from kn_tutorial.files import write_json  # noqa: E402
from kn_tutorial.models import get_device, get_module, load_model, module_name  # noqa: E402
from kn_tutorial.progress import progress  # noqa: E402
from kn_tutorial.scoring import pad_rows, target_ids  # noqa: E402
from kn_tutorial.stats import second_moment  # noqa: E402
from kn_tutorial.weights import WeightSnapshot, frozen  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def fluency(model, tokenizer, cases: list[dict], new_tokens: int = 40, seed: int = 0) -> float:
    """Mean n-gram entropy of top-5 sampled continuations of each case's first two generation prompts."""
    if not cases:
        return float("nan")
    prompts = [p for c in cases for p in c["generation_prompts"][:2]]
    torch.manual_seed(seed)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(get_device(model))
        out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=new_tokens,
                             pad_token_id=tokenizer.eos_token_id)
    finally:
        tokenizer.padding_side = side
    texts = tokenizer.batch_decode(out, skip_special_tokens=True)
    return sum(ngram_entropy(t) for t in texts) / len(texts)


def score(model, tokenizer, eval_cases: list[dict], flu_cases: list[dict]) -> dict:
    out = summarize(evaluate_cases(model, tokenizer, eval_cases))
    out["fluency"] = fluency(model, tokenizer, flu_cases)
    return out


def fine_tune_many(model, tokenizer, cases: list[dict], layers, lr: float, steps: int, eps: float,
                   batch: int = 256, seed: int = 0) -> WeightSnapshot:
    """FT-L on the MLP output projections of `layers`, all rewrites at once; returns the snapshot."""
    device = get_device(model)
    rows, answers = [], []  # answers: (row, position, token)
    for i, case in enumerate(cases):
        prompt, subject, target = rome.prepare_request(case["requested_rewrite"])
        ids = tokenizer(prompt.replace("{}", subject), add_special_tokens=False)["input_ids"]
        new = target_ids(tokenizer, target)
        rows.append(ids + new[:-1])
        answers.append([(len(ids) - 1 + j, t, 1 / len(new)) for j, t in enumerate(new)])
    weights = [get_module(model, layer, "mlp_out").weight for layer in layers]
    snapshot = WeightSnapshot([(module_name(model, layer, "mlp_out") + ".weight", w)
                               for layer, w in zip(layers, weights)])
    with frozen(model):  # gradients reach only the trained matrices; every flag is restored on exit
        for w in weights:
            w.requires_grad_(True)
        optimizer = torch.optim.Adam(weights, lr=lr)
        rng = random.Random(seed)
        try:
            for _ in range(steps):
                chosen = rng.sample(range(len(rows)), min(batch, len(rows)))
                input_ids, mask = pad_rows([rows[i] for i in chosen], tokenizer.eos_token_id, device)
                r, c, t, w = zip(*[(k, pos, tok, wt) for k, i in enumerate(chosen) for pos, tok, wt in answers[i]])
                logits = model(input_ids=input_ids, attention_mask=mask).logits[list(r), list(c)].float()
                nll = -(torch.log_softmax(logits, -1)[torch.arange(len(t)), list(t)] * torch.tensor(w, device=device)).sum()
                nll = nll / len(chosen)
                optimizer.zero_grad()
                nll.backward()
                optimizer.step()
                with torch.no_grad():
                    for w_, original in zip(weights, snapshot.originals):
                        w_.copy_(original + (w_ - original).clamp(-eps, eps))
        finally:
            for w in weights:
                w.grad = None
    return snapshot


ABLATIONS = ("diagnosis", "passes_ablation", "prefix_ablation", "lambda_sweep", "layer_ranges")


def merge(paths: list[str], out: str, notes: list[str]) -> dict:
    """Combine runs of this script made with the same seed and scoring settings into one file:
    the first run is the base; from each later one, the rows of methods the base lacks and the
    ablations it lacks are added, and `merged_from` records which run produced what."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    base = runs[0]
    same = ("model", "seed", "n_cases", "eval_cases", "fluency_cases")
    base["merged_from"] = [{"file": Path(paths[0]).name, "command": base["command"], "seconds": base["seconds"],
                            "device": base["device"], "took": "everything else"}]
    for path, run in zip(paths[1:], runs[1:]):
        differ = [k for k in same if run.get(k) != base.get(k)]
        if differ:
            raise ValueError(f"{path} was run with other settings ({', '.join(differ)}): its rows are not comparable")
        took = []
        for method, rows in run["results"].items():
            if rows and not base["results"].get(method):
                base["results"][method] = rows
                took.append(f"{method} rows")
                if method == "ROME":
                    base["rome_reached"], base["hparams"]["ROME"] = run["rome_reached"], run["hparams"]["ROME"]
                    base["rome_seconds_limit"] = run["rome_seconds_limit"]
        for key in ABLATIONS:
            if key in run and key not in base:
                base[key] = run[key]
                took.append(key)
        for n, f in run.get("neighbours_dropped", {}).items():
            base["neighbours_dropped"].setdefault(n, f)
        base["merged_from"].append({"file": Path(path).name, "command": run["command"], "seconds": run["seconds"],
                                    "device": run["device"], "took": ", ".join(took) or "nothing"})
    base["notes"] = notes
    base["complete"] = all(run.get("complete") for run in runs)
    write_json(out, base)
    return base


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="atlas")
    parser.add_argument("--sizes", nargs="+", default=["1", "10", "100", "1000", "all"])
    parser.add_argument("--eval-cases", type=int, default=300)
    parser.add_argument("--fluency-cases", type=int, default=50)
    parser.add_argument("--rome-seconds", type=float, default=1200.0)
    parser.add_argument("--methods", nargs="+", default=["unedited", "MEMIT", "FT-L", "ROME"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None, help="MEMIT key groups per batch (GPU: 256)")
    parser.add_argument("--lambdas", nargs="*", type=float, default=[],
                        help="also edit the largest size <= 1000 with these λ (an ablation, same first-pass targets)")
    parser.add_argument("--ranges", nargs="*", default=[],
                        help='also edit --ranges-n cases with MEMIT on these layer ranges, e.g. "0,1,2" "2,3,4"')
    parser.add_argument("--ranges-n", type=int, default=200)
    parser.add_argument("--prefix-ablation", nargs="*", default=[],
                        help='also edit the largest size <= 1000 with keys and targets averaged over these random '
                             'prefixes ("length,count"), e.g. "10,5" (the paper\'s recipe; new targets)')
    parser.add_argument("--out", default=str(book_data.path("memit_scaling")))
    parser.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                        help="combine these runs of the script (the first is the base) into --out, and stop")
    parser.add_argument("--note", action="append", default=[], help="with --merge: a note to keep in the file")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in --out (same settings) and compute only the missing ones")
    args = parser.parse_args(argv)
    if args.merge:
        out = merge(args.merge, args.out, args.note)
        print(f"merged {len(args.merge)} runs into {args.out}: " + "; ".join(m["took"] for m in out["merged_from"]))
        return out
    started = time.time()

    model, tokenizer = load_model(args.model)
    cases = load_counterfact()
    order = random.Random(args.seed).sample(cases, len(cases))
    sizes = sorted({len(cases) if s == "all" else min(int(s), len(cases)) for s in args.sizes})
    mh = memit.MemitHparams.for_model(args.model)
    if args.batch_size:
        mh = replace(mh, batch_size=args.batch_size)
    rh = rome.RomeHparams.for_model(args.model)
    from kn_tutorial.finetune import TUNED
    ft = TUNED.get(args.model, {"lr": 5e-4, "steps": 25, "norm_constraint": 5e-4})

    dropped: dict[int, float] = {}

    def subsets(n):
        """(edited cases, scored cases, fluency cases); the scored cases lose the neighbourhood prompts
        about facts that are edited themselves (they no longer measure spill-over)."""
        edited, scored = sampled(n)
        scored, dropped[n] = without_edited_neighbours(scored, edited)
        return edited, scored, scored[:args.fluency_cases]

    def sampled(n):
        """(edited cases, the seeded sample of them that is scored, neighbourhood prompts untouched)"""
        edited = order[:n]
        rng = random.Random(args.seed + n)
        return edited, (edited if n <= args.eval_cases else rng.sample(edited, args.eval_cases))

    results: dict[str, list[dict]] = {m: [] for m in args.methods}
    if args.resume and Path(args.out).exists():
        previous = json.loads(Path(args.out).read_text())
        for m in results:
            results[m] = [r for r in previous["results"].get(m, []) if r["n_edits"] in sizes]
    done = {m: {r["n_edits"] for r in rows} for m, rows in results.items()}
    extra: dict = {}
    state = {"rome_reached": 0}

    def write(final: bool = False) -> dict:
        out = {
            "paper": "Meng et al. (2023), Mass-Editing Memory in a Transformer, figure 5",
            "model": args.model, "device": str(get_device(model)),
            "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "n_cases": len(cases), "sizes": sizes, "eval_cases": args.eval_cases, "fluency_cases": args.fluency_cases,
            "subsampled_sizes": [n for n in sizes if n > args.eval_cases],
            "neighbours_dropped": {str(n): f for n, f in sorted(dropped.items())},
            "rome_reached": state["rome_reached"] if "ROME" in results else None,
            "rome_seconds_limit": args.rome_seconds,
            "hparams": {"MEMIT": asdict(mh), "ROME": asdict(rh),
                        "FT-L": {**ft, "layers": [rh.layer], "minibatch": 256}},
            "results": results, **extra, "seed": args.seed, "seconds": time.time() - started, "complete": final,
            "command": "python scripts/memit_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        write_json(args.out, out)  # atomic, with a unique temporary name
        return out

    mom2 = {layer: second_moment(model, tokenizer, layer, corpus=mh.mom2_corpus, n_samples=mh.mom2_n_samples)
            for layer in mh.layers}
    sweep_n = max([n for n in sizes if n <= 1000], default=0)
    sweep_targets = None
    for n in sizes:
        edited, scored, flu = subsets(n)
        if "unedited" in results and n not in done["unedited"]:
            results["unedited"].append({"n_edits": n, **score(model, tokenizer, scored, flu)})
        if "MEMIT" in results and (n not in done["MEMIT"] or n == sweep_n):
            t = time.time()
            reqs, groups, hp, prefixes = memit.prepare(model, tokenizer, edited, mh)
            targets = memit.compute_targets(model, tokenizer, reqs, groups, hp.layers[-1], prefixes, hp)
            if n == sweep_n:
                sweep_targets = targets
        if "MEMIT" in results and n not in done["MEMIT"]:
            with memit.edit(model, tokenizer, edited, mh, mom2=mom2, targets=targets):
                seconds = time.time() - t
                results["MEMIT"].append({"n_edits": n, "edit_seconds": seconds, **score(model, tokenizer, scored, flu)})
        if "FT-L" in results and n not in done["FT-L"]:
            t = time.time()
            with fine_tune_many(model, tokenizer, edited, [rh.layer], ft["lr"], ft["steps"], ft["norm_constraint"]):
                seconds = time.time() - t
                results["FT-L"].append({"n_edits": n, "edit_seconds": seconds, **score(model, tokenizer, scored, flu)})
        write()
        print(f"n={n}: " + "; ".join(f"{m} ES {r[-1]['ES']:.1f} PS {r[-1]['PS']:.1f} NS {r[-1].get('NS', math.nan):.1f}"
                                     for m, r in results.items() if r), flush=True)

    if "MEMIT" in results and sweep_targets is not None:
        # Where do the misses at sweep_n come from? Write each target z in by hand, then score the rewrites.
        # First for the paper's MEMIT (one pass), then for every pass count up to the hparams' (same
        # first-pass targets; each later pass optimises its own on the model edited so far).
        edited, scored, flu = subsets(sweep_n)
        reqs, groups, hp, _ = memit.prepare(model, tokenizer, edited, mh)
        diagnosis = {"n_edits": sweep_n, "passes": 1, "unedited_with_z": memit.success_with_targets(
            model, tokenizer, scored, reqs, groups, sweep_targets), "z_nll": sweep_targets.final_nll.mean().item()}
        extra["passes_ablation"] = {"n_edits": sweep_n, "rows": []}
        for passes in range(1, max(mh.passes, 2) + 1):
            t = time.time()
            with memit.edit(model, tokenizer, edited, replace(mh, passes=passes), mom2=mom2,
                            targets=sweep_targets) as result:
                seconds = time.time() - t
                last_z = result.pass_targets[-1]
                row = {"passes": passes, "edit_seconds_after_first_targets": seconds,
                       "z_nll": [x.final_nll.mean().item() for x in result.pass_targets],
                       "edited_with_last_z": memit.success_with_targets(model, tokenizer, scored, reqs, groups, last_z),
                       "NS_with_edited_neighbours": summarize(evaluate_cases(model, tokenizer, sampled(sweep_n)[1]))["NS"],
                       **score(model, tokenizer, scored, flu)}
            extra["passes_ablation"]["rows"].append(row)
            if passes == 1:
                diagnosis.update(edited=row["ES"], edited_with_z=row["edited_with_last_z"],
                                 NS_with_edited_neighbours=row["NS_with_edited_neighbours"])
                extra["diagnosis"] = diagnosis
            print(f"passes={passes} at n={sweep_n}: ES {row['ES']:.1f} PS {row['PS']:.1f} NS {row['NS']:.1f} "
                  f"S {row['S']:.1f}, ES with the last z written in {row['edited_with_last_z']:.1f}", flush=True)
            write()
        print(f"diagnosis at n={sweep_n}: {diagnosis}", flush=True)

    if args.prefix_ablation and sweep_n:
        edited, scored, flu = subsets(sweep_n)
        extra["prefix_ablation"] = {"n_edits": sweep_n, "rows": []}
        for text in args.prefix_ablation:
            prefixes = tuple(tuple(int(x) for x in part.split(",")) for part in text.split(";") if part)
            hp = replace(mh, prefixes=prefixes)
            t = time.time()
            with memit.edit(model, tokenizer, edited, hp, mom2=mom2) as result:
                row = {"prefixes": [list(p) for p in prefixes], "edit_seconds": time.time() - t,
                       "z_nll": [x.final_nll.mean().item() for x in result.pass_targets], **score(model, tokenizer, scored, flu)}
            extra["prefix_ablation"]["rows"].append(row)
            print(f"prefixes {prefixes}: ES {row['ES']:.1f} PS {row['PS']:.1f} NS {row['NS']:.1f}", flush=True)
            write()

    if args.lambdas and sweep_targets is not None:
        edited, scored, flu = subsets(sweep_n)
        extra["lambda_sweep"] = {"n_edits": sweep_n, "rows": []}
        for lam in args.lambdas:
            with memit.edit(model, tokenizer, edited, replace(mh, mom2_update_weight=lam, mom2_update_weight_per_key=None), mom2=mom2, targets=sweep_targets):
                extra["lambda_sweep"]["rows"].append({"lambda": lam, **score(model, tokenizer, scored, flu)})
            print(f"λ={lam:g}: {extra['lambda_sweep']['rows'][-1]}", flush=True)
        write()

    if args.ranges:
        edited, scored, flu = subsets(args.ranges_n)
        extra["layer_ranges"] = {"n_edits": args.ranges_n, "rows": []}
        for text in args.ranges:
            layers = tuple(int(x) for x in text.split(","))
            hp = replace(mh, layers=layers)
            t = time.time()
            with memit.edit(model, tokenizer, edited, hp) as result:
                row = {"layers": list(layers), "edit_seconds": time.time() - t,
                       "z_nll": [x.final_nll.mean().item() for x in result.pass_targets], **score(model, tokenizer, scored, flu)}
            extra["layer_ranges"]["rows"].append(row)
            print(f"layers {layers}: ES {row['ES']:.1f} PS {row['PS']:.1f} NS {row['NS']:.1f}", flush=True)
            write()

    if "ROME" in results:
        rome_mom2 = second_moment(model, tokenizer, rh.layer, corpus=rh.mom2_corpus, n_samples=rh.mom2_n_samples)
        snapshot = WeightSnapshot([(module_name(model, rh.layer, "mlp_out") + ".weight",
                                    get_module(model, rh.layer, "mlp_out").weight)])
        t, spent = time.time(), 0.0
        try:
            for i, case in enumerate(progress(order[:sizes[-1]], desc="sequential ROME")):
                rome.edit(model, tokenizer, case["requested_rewrite"], rh, mom2=rome_mom2)
                if i + 1 in sizes:
                    spent = time.time() - t
                    edited, scored, flu = subsets(i + 1)
                    results["ROME"].append({"n_edits": i + 1, "edit_seconds": spent, **score(model, tokenizer, scored, flu)})
                    state["rome_reached"] = i + 1
                    write()
                    print(f"ROME n={i + 1}: ES {results['ROME'][-1]['ES']:.1f} NS {results['ROME'][-1]['NS']:.1f}", flush=True)
                    t = time.time() - spent  # scoring time does not count
                if time.time() - t > args.rome_seconds:
                    break
        finally:
            snapshot.restore()

    out = write(final=True)
    print(f"wrote {args.out} in {out['seconds']:.0f} s")
    return out


if __name__ == "__main__":
    main()

"""The recorded sweep of Atlas variants (issue 16): which data and shapes move the MLP site
of causal tracing (Meng et al., 2022) above the first layer?

Every variant is trained with the SAME short budget (`BUDGET`: steps, batch, warm-up, learning
rate, and half the shipped width; seed 0, one CPU thread), then scored by `kn_tutorial.atlas_build.probe.probe` with the same settings
(`PROBE`). The subject-first corpus at that budget is the control. Results are appended variant by
variant to kn_tutorial/book_data/atlas_sweep.json (config, probe measures, seconds), so a run can be
stopped and resumed; scripts/atlas_sweep.md is the table made from that file.

    python scripts/atlas_sweep.py                 # every variant not yet in the JSON, in order
    python scripts/atlas_sweep.py subject-first contexts     # only these
    python scripts/atlas_sweep.py --table         # rewrite the markdown table only
    while python scripts/atlas_sweep.py --next; do :; done   # one process per variant
    python scripts/atlas_sweep.py --full all-options-12x192 --model DIR --what "..."
        # a full-size model (trained by `python -m kn_tutorial.atlas train ... --out DIR`) under the
        # probe's own defaults (FULL_PROBE: 200 traced facts, 3 samples), recorded under "full_runs";
        # --probe-json FILE reuses the output of `python -m kn_tutorial.atlas probe --model DIR --json FILE`

Short budgets undertrain: the table compares variants with each other, not with the
shipped model (2,000 steps of 48 rows).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_tutorial import book_data  # noqa: E402  (after the path insert, like the other imports)
from kn_tutorial.files import write_json  # noqa: E402

RESULTS = book_data.path("atlas_sweep")
TABLE = ROOT / "scripts" / "atlas_sweep.md"

# Half the shipped width (8 x 128, d_ff 512: a quarter of the parameters) and a quarter of the
# world (60 of its 188 countries with their cities: 753 facts, about the shipped facts per
# parameter), so that a short run on a shared CPU memorises facts. Tried first and dropped:
# 8 x 256 on the whole world, 300 steps of 32 rows (10.5 min here): 15% recall, nothing to
# trace; 8 x 128 on the whole world, 450 steps, lr 3e-3 (6.5 min): 20% recall, nothing to trace;
# this budget with 450 steps: 74% recall (subject-first corpus) but a hidden-state AIE of at most 0.024 at
# the last subject token (ATE 0.45): the fact was not yet gathered at the subject.
# The corpus options start from the subject-first corpus (every fact sentence opens with its subject),
# whatever TrainConfig's defaults (the shipped recipe) are; each variant switches some on.
SUBJECT_FIRST = dict(context=0.0, context_style="compositional", preceding=0.0, lists=0.0, multi=0.0, compose=0.0)
BUDGET = dict(steps=800, batch_size=32, warmup=30, lr=3e-3, n_layer=8, n_embd=128, n_head=4, n_inner=512,
              world_countries=60, seed=0, threads=1, device="cpu", **SUBJECT_FIRST)
PROBE = dict(n_trace=30, n_recall=100, samples=2, window=3, geva=True, kn_per_relation=1, seed=0)
# full-size runs: the defaults of `python -m kn_tutorial.atlas probe`
FULL_PROBE = dict(n_trace=200, n_recall=400, samples=3, window=3, geva=True, kn_per_relation=2)

DEEP = dict(n_layer=12, n_embd=96, n_head=4, n_inner=384)  # about the same parameters as 8 x 128
TEN = dict(n_layer=10, n_embd=112, n_head=4, n_inner=448)
CONTEXTS = dict(context=0.5)
MORE_FACTS = dict(world_cities=3000, world_max_per_country=30)
SENTENCES = dict(multi=0.3, lists=0.2, preceding=0.3)

# name -> (what changed, TrainConfig overrides); run in this order
VARIANTS = {
    "subject-first": ("the subject-first corpus (control)", {}),
    "contexts": ("many compositional contexts before the subject (half the fact sentences)", CONTEXTS),
    "contexts-deep": ("contexts, 12 x 96, d_ff 384", {**CONTEXTS, **DEEP}),
    "contexts-compose": ("contexts, half the further facts about the previous object (city -> country -> ...)",
                         {**CONTEXTS, "compose": 0.5}),
    "contexts-morefacts": ("contexts, more cities of the same 60 countries (GeoNames' 3,000 largest, up to 30 per country): 2.7x the facts", {**CONTEXTS, **MORE_FACTS}),
    "all-deep": ("contexts, compose, sentences, 12 x 96", {**CONTEXTS, "compose": 0.5, **SENTENCES, **DEEP}),
    "fixed-contexts": ("twelve fixed contexts before the subject (half the fact sentences)",
                       {"context": 0.5, "context_style": "fixed"}),
    "contexts-sentences": ("contexts, several facts per sentence, lists, a preceding unrelated sentence",
                           {**CONTEXTS, **SENTENCES}),
    "deep": ("12 x 96, d_ff 384, subject-first corpus", DEEP),
    "contexts-10layers": ("contexts, 10 x 112, d_ff 448", {**CONTEXTS, **TEN}),
    "morefacts": ("more cities (2.7x the facts), subject-first corpus", MORE_FACTS),
    "all-morefacts-deep": ("contexts, compose, sentences, 2.7x the facts, 12 x 96",
                           {**CONTEXTS, "compose": 0.5, **SENTENCES, **MORE_FACTS, **DEEP}),
    # not trained: the shipped model under the same probe, for scale
    "shipped": ("the shipped model, probed only (not trained at the sweep's budget)", None),
}


def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"budget": BUDGET, "probe": PROBE, "variants": []}


def run_variant(name: str, models_dir: Path | None) -> dict:
    import torch

    from kn_tutorial.atlas_build.probe import format_probe, probe
    from kn_tutorial.atlas_build.train import TrainConfig, config_world, save, train

    what, overrides = VARIANTS[name]
    torch.set_num_threads(1)
    if overrides is None:  # the shipped model, as it is
        from kn_tutorial.atlas_build.probe import model_world
        from kn_tutorial.atlas_build.train import MODEL_DIR
        from kn_tutorial.models import load_model

        model, tokenizer = load_model(str(MODEL_DIR), device="cpu")
        log = json.loads((MODEL_DIR / "training_report.json").read_text())
        cfg, world, train_seconds = TrainConfig(**log["config"]), model_world(MODEL_DIR), log["seconds"]
    else:
        cfg = TrainConfig(**{**BUDGET, **overrides})
        world = config_world(cfg)
        started = time.time()
        model, tokenizer, log = train(cfg, world=world, log_every=100)
        train_seconds = time.time() - started
        if models_dir is not None:
            save(model, tokenizer, log, models_dir / name)
    started = time.time()
    result = probe(model, tokenizer, world, **PROBE)
    print(format_probe(result), flush=True)
    return {"name": name, "what": what, "overrides": overrides or {}, "config": asdict(cfg), "n_facts": len(world),
            "n_params": sum(p.numel() for p in model.parameters()), "loss": log["log"][-1]["loss"],
            "train_seconds": round(train_seconds, 1), "probe_seconds": round(time.time() - started, 1),
            "probe": result}


def run_full(name: str, what: str, model_dir: Path, probe_json: Path | None) -> dict:
    """A full-size model as trained (its config and training time from its training_report.json),
    probed with FULL_PROBE (or the JSON that `python -m kn_tutorial.atlas probe` wrote with them)."""
    import torch

    from kn_tutorial.atlas_build.probe import format_probe, model_world, probe
    from kn_tutorial.models import load_model

    log = json.loads((model_dir / "training_report.json").read_text())
    model, tokenizer = load_model(str(model_dir), device="cpu")
    world = model_world(model_dir)
    started = time.time()
    if probe_json is not None:
        result = json.loads(probe_json.read_text())
        probe_seconds = sum(result.get("seconds", {}).values())
    else:
        torch.set_num_threads(1)
        result = probe(model, tokenizer, world, **FULL_PROBE)
        probe_seconds = time.time() - started
    print(format_probe(result), flush=True)
    return {"name": name, "what": what, "overrides": {}, "config": log["config"], "n_facts": len(world),
            "n_params": sum(p.numel() for p in model.parameters()), "loss": log["log"][-1]["loss"],
            "train_seconds": log["seconds"], "probe_seconds": round(probe_seconds, 1), "probe": result}


HEADER = ("| variant | what changed | loss | MLP AIE L0 | best MLP AIE >= 1 (layer) | ratio | window 3: L0 / best (layer) "
          "| hidden peak layer (AIE) | severed drop MLP / attn | recall train / frames / contexts / novel "
          "| remove last token L0 / top half | semantic keys (relation) L0 / top half | KN in L0 | train + probe s |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def table(results: dict) -> str:
    b, p = results["budget"], results["probe"]
    lines = [
        "# Atlas v3 sweep (issue 16)", "",
        f"Every variant: {b['n_layer']} x {b['n_embd']} (d_ff {b['n_inner']}) unless it says otherwise, on "
        f"{b['world_countries']} of the world's countries and their cities (753 facts) unless it says otherwise, "
        f"{b['steps']} steps of {b['batch_size']} rows x 64 tokens, lr {b['lr']}, warm-up {b['warmup']}, "
        f"seed {b['seed']}, one CPU thread (the full-size subject-first model: 8 x 256, 2,000 steps of 48 rows, lr 0.0015). "
        f"Probe (`kn_tutorial.atlas_build.probe`): recall on {p['n_recall']} facts (first token); causal tracing on "
        f"{p['n_trace']} known facts, {p['samples']} noise samples; MLP AIE at the last subject token with window 1 "
        f"and window {p['window']} (best window leaving layer 0 out); Geva on 1,000 corpus sentences; knowledge "
        f"neurons of {p['kn_per_relation']} fact per relation. Written by `scripts/atlas_sweep.py` from "
        "`kn_tutorial/book_data/atlas_sweep.json`.", "",
        *HEADER,
    ]
    lines += [_row(v) for v in results["variants"]]
    if results.get("full_runs"):
        lines += ["", "Full-size runs (the whole world; probe defaults: 200 traced facts, 3 noise samples, recall on "
                  "400 facts, knowledge neurons of 2 facts per relation):", "", *HEADER]
        lines += [_row(v) for v in results["full_runs"]]
    return "\n".join(lines) + "\n"


def _row(v: dict) -> str:
    r, t = v["probe"]["recall"], v["probe"]["trace"]
    g, k = v["probe"].get("geva"), v["probe"].get("knowledge_neurons")
    recall = " / ".join(_pct(r[x]) for x in ("train", "heldout_frames", "heldout_contexts", "novel"))
    if t.get("n_facts"):
        m, w, h, s = t["mlp"], t["mlp_window"], t["hidden"], t["severed"]
        trace = (f"{m['layer0']:.3f} | {m['best_after_first_aie']:.3f} ({m['best_after_first']}) | {m['ratio']} | "
                 f"{w['layer0']:.3f} / {w['best_after_first_aie']:.3f} ({w['best_after_first']}) | "
                 f"{h['peak_layer']} ({h['peak_aie']:.3f}) | {s['drop_mlp']:.3f} / {s['drop_attn']:.3f}")
    else:
        trace = "– | – | – | – | – | –"
    if g:
        half = len(g["remove_last"]) // 2
        top = lambda xs: sum(xs[half:]) / len(xs[half:])  # noqa: E731
        geva = (f"{_pct(g['remove_last'][0])} / {_pct(top(g['remove_last']))} | "
                f"{_pct(g['semantic_relation'][0])} / {_pct(top(g['semantic_relation']))}")
    else:
        geva = "– | –"
    kn = _pct(k["share_layer0"]) if k else "–"
    return (f"| {v['name']} | {v['what']} | {v['loss']:.3f} | {trace} | {recall} | {geva} | {kn} | "
            f"{v['train_seconds']:.0f} + {v['probe_seconds']:.0f} |")


NOTES_MARK = "<!-- notes: kept when the table is rewritten -->"


def write_table(results: dict) -> None:
    """Rewrite the table, keeping the hand-written notes after NOTES_MARK."""
    old = TABLE.read_text() if TABLE.exists() else ""
    notes = old[old.index(NOTES_MARK):] if NOTES_MARK in old else NOTES_MARK + "\n"
    TABLE.write_text(table(results) + "\n" + notes)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"variants to run (default: all not yet done): {', '.join(VARIANTS)}")
    parser.add_argument("--table", action="store_true", help="only rewrite the markdown table")
    parser.add_argument("--next", action="store_true",
                        help="run only the first variant not yet done (exit code 3 when none is left), "
                             "so a shell loop picks up variants added while it runs")
    parser.add_argument("--models", default=None, help="also save each variant's model under this folder")
    parser.add_argument("--full", default=None, help="record a full-size model under this name (with --model, --what)")
    parser.add_argument("--model", default=None, help="the full-size model's folder")
    parser.add_argument("--what", default="", help="what the full-size model is")
    parser.add_argument("--probe-json", default=None, help="its probe output, made with the probe's defaults")
    args = parser.parse_args(argv)
    results = load_results()
    if args.full:
        if not args.model:
            raise SystemExit("--full needs --model DIR (a folder written by `python -m kn_tutorial.atlas train --out DIR`)")
        entry = run_full(args.full, args.what, Path(args.model), Path(args.probe_json) if args.probe_json else None)
        results = load_results()
        results["full_runs"] = [v for v in results.get("full_runs", []) if v["name"] != args.full] + [entry]
        write_json(RESULTS, results)
        write_table(results)
        return
    if results["budget"] != BUDGET or results["probe"] != PROBE:
        raise SystemExit(f"{RESULTS} was made with another budget or probe; move it away to start a new sweep")
    if not args.table:
        unknown = [n for n in args.names if n not in VARIANTS]
        if unknown:
            raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
        done = {v["name"] for v in results["variants"]}
        todo = args.names or [n for n in VARIANTS if n not in done]
        if args.next:
            if not todo:
                raise SystemExit(3)
            todo = todo[:1]
        for name in todo:
            print(f"=== {name}: {VARIANTS[name][0]}", flush=True)
            entry = run_variant(name, Path(args.models) if args.models else None)
            results = load_results()  # the file may have grown meanwhile
            results["variants"] = [v for v in results["variants"] if v["name"] != name] + [entry]
            write_json(RESULTS, results)
            write_table(results)
            print(f"=== {name} done: {entry['train_seconds']:.0f} s training, {entry['probe_seconds']:.0f} s probe",
                  flush=True)
    write_table(results)


if __name__ == "__main__":
    main()

"""Every method against the package's own literal implementation of its definition (`*_naive`),
interleaved in one process on one thread, on the shipped Atlas model (or --model).

    method    item          fast                                  naive (one full forward per ...)
    tracing   fact          tracing.trace, hidden + mlp + attn    tracing.trace_naive (token, layer, sample)
    rome      edit request  rome.compute_v_star                   rome.compute_v_star_naive (optimisation step)
    memit     batch         memit.compute_targets                 memit.compute_targets_naive (optimisation step)
    ig        fact          attribution.integrated_gradients      attribution.integrated_gradients_naive (layer, step)

The two take turns item by item (fast, naive, fast, naive, ...), so a change of load on a shared
machine slows both alike; the ratio is naive time / fast time summed over the items. Times are
process CPU seconds (time.process_time) on one thread; "rome" also times a whole edit (k* + v* +
solve and update, C and the prefixes given, as scripts/rome_table.py runs it) with the fast v*.
Peak memory: the most memory in use above what was in use before the call, per call: on CPU the
process's peak resident set (VmHWM, reset before each call through /proc/self/clear_refs, Linux),
on CUDA torch.cuda.max_memory_allocated. Each pair is also compared: the largest difference
relative to the naive result's largest entry.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/speed.py                    # all four methods
    python benchmarks/speed.py --methods tracing rome --items 5
    python benchmarks/speed.py --model path/to/model --hparams atlas   # a local model, Atlas's ROME/MEMIT settings
Results are printed and written to benchmarks/results/speed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from proc_status import status_kib  # benchmarks/ is on sys.path when a benchmark runs

RESULTS = Path(__file__).parent / "results" / "speed.json"


def measured(fn, device: torch.device) -> tuple:
    """(fn(), CPU seconds (wall seconds on CUDA), peak MiB above the memory in use before)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        start = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device)
        return out, time.perf_counter() - start, (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    except OSError:
        pass
    before = status_kib("VmRSS")
    start = time.process_time()
    out = fn()
    seconds = time.process_time() - start
    peak = status_kib("VmHWM")
    return out, seconds, float("nan") if before is None or peak is None else (peak - before) / 1024


def relative_difference(fast, naive) -> float:
    fast, naive = torch.as_tensor(fast).double(), torch.as_tensor(naive).double()
    return ((fast - naive).abs().max() / naive.abs().max().clamp(min=1e-30)).item()


def interleave(items, fast, naive, device, extra: dict | None = None) -> dict:
    """Run fast(item) and naive(item) in turns; each returns a tensor to compare."""
    runs = {"fast": fast, "naive": naive, **(extra or {})}
    seconds = {name: [] for name in runs}
    peak = {name: 0.0 for name in runs}
    worst = 0.0
    for item in items:
        results = {}
        for name, run in runs.items():
            results[name], sec, mib = measured(lambda: run(item), device)
            seconds[name].append(sec)
            peak[name] = max(peak[name], mib)
        worst = max(worst, relative_difference(results["fast"], results["naive"]))
    return {"items": len(items),
            "seconds_per_item": {k: sum(v) / len(v) for k, v in seconds.items()},
            "median_seconds_per_item": {k: statistics.median(v) for k, v in seconds.items()},
            "ratio_naive_over_fast": sum(seconds["naive"]) / sum(seconds["fast"]),
            "peak_mib_above_baseline": peak, "max_relative_difference": worst}


def atlas_facts(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    from kn_tutorial.atlas.templates import TEMPLATES, fill
    from kn_tutorial.atlas.world import load_world
    return [(fill(TEMPLATES[f.relation].train[0], f.subject, f.subject_kind), f.subject, f.object)
            for f in load_world().sample(n, seed=seed)]


def bench_tracing(model, tokenizer, args, device) -> dict:
    from kn_tutorial import tracing

    def fast(fact):
        p, s, _ = fact
        return torch.stack([tracing.trace(model, tokenizer, p, s, kind=k, samples=args.samples).by_sample
                            for k in tracing.KINDS])

    def naive(fact):
        p, s, _ = fact
        return torch.stack([tracing.trace_naive(model, tokenizer, p, s, kind=k, samples=args.samples)
                            for k in tracing.KINDS])
    out = interleave(atlas_facts(args.items, args.seed), fast, naive, device)
    out["settings"] = {"kinds": list(tracing.KINDS), "samples": args.samples, "window": 1, "target": "top prediction"}
    return out


def bench_rome(model, tokenizer, args, device) -> dict:
    from kn_tutorial import rome
    from kn_tutorial.atlas_build.rome_check import sample_cases
    from kn_tutorial.stats import second_moment

    hp = rome.RomeHparams.for_model(args.hparams or args.model)
    prefixes = rome.sample_prefixes(model, tokenizer, hp.prefixes, seed=hp.seed)
    mom2 = second_moment(model, tokenizer, hp.layer, corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples)
    requests = [rome.prepare_request(c["requested_rewrite"]) for c in sample_cases(args.items, seed=args.seed + 1)]
    steps = {"fast": [], "naive": []}

    def v_star(fn, name):
        def run(req):
            result = fn(model, tokenizer, *req, hp.layer, prefixes, hp)
            steps[name].append(len(result.losses))
            return result.delta
        return run

    def whole_edit(req):
        prompt, subject, target = req
        handle = rome.edit(model, tokenizer, {"prompt": prompt, "subject": subject, "target_new": {"str": target}},
                           hp, mom2=mom2, prefixes=prefixes)
        handle.restore()
        return handle.v_star

    out = interleave(requests, v_star(rome.compute_v_star, "fast"), v_star(rome.compute_v_star_naive, "naive"),
                     device, extra={"edit_with_fast_v_star": whole_edit})
    out["optimisation_steps"] = steps
    out["settings"] = {"layer": hp.layer, "v_steps": hp.v_steps, "prefixes": len(prefixes), "C": "given"}
    return out


def bench_memit(model, tokenizer, args, device) -> dict:
    import random

    from kn_tutorial import memit
    from kn_tutorial.atlas.counterfact import load_counterfact

    hp = memit.MemitHparams.for_model(args.hparams or args.model)
    cases = load_counterfact()
    batches = [random.Random(args.seed + i).sample(cases, args.memit_requests) for i in range(max(1, args.items // 5))]

    def run(fn):
        def go(batch):
            reqs, groups, hp_, prefixes = memit.prepare(model, tokenizer, batch, hp)
            return fn(model, tokenizer, reqs, groups, hp_.layers[-1], prefixes, hp_).z
        return go
    out = interleave(batches, run(memit.compute_targets), run(memit.compute_targets_naive), device)
    out["settings"] = {"requests_per_batch": args.memit_requests, "layer": hp.layers[-1], "batch_size": hp.batch_size}
    return out


def bench_ig(model, tokenizer, args, device) -> dict:
    from kn_tutorial import attribution as A

    facts = atlas_facts(args.items, args.seed)
    A.integrated_gradients(model, tokenizer, facts[0][0], facts[0][2], steps=2)  # warm-up
    out = interleave(facts, lambda f: A.integrated_gradients(model, tokenizer, f[0], f[2], steps=args.steps),
                     lambda f: A.integrated_gradients_naive(model, tokenizer, f[0], f[2], steps=args.steps), device)
    out["settings"] = {"layers": "all", "steps": args.steps, "rule": "right"}
    return out


METHODS = {"tracing": bench_tracing, "rome": bench_rome, "memit": bench_memit, "ig": bench_ig}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="atlas")
    parser.add_argument("--device", default=None)
    parser.add_argument("--hparams", default=None, help="ROME/MEMIT hyper-parameters by name (default: --model's); "
                        "e.g. --model /work/runs/v3model --hparams atlas")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--items", type=int, default=10, help="facts or edit requests per method")
    parser.add_argument("--samples", type=int, default=10, help="tracing: noise samples")
    parser.add_argument("--steps", type=int, default=20, help="IG: Riemann steps m")
    parser.add_argument("--memit-requests", type=int, default=100, help="MEMIT: requests per batch (items/5 batches)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    from kn_tutorial.models import load_model

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    print(f"{args.model} on {device}, {torch.get_num_threads()} thread(s), torch {torch.__version__}", flush=True)
    results = {}
    for name in args.methods:
        r = results[name] = METHODS[name](model, tokenizer, args, device)
        s, peak = r["seconds_per_item"], r["peak_mib_above_baseline"]
        extra = "".join(f", {k} {v:.3f} s" for k, v in s.items() if k not in ("fast", "naive"))
        print(f"{name:<8} {r['items']:>3} items: fast {s['fast']:.3f} s/item, naive {s['naive']:.3f} s/item, "
              f"naive/fast {r['ratio_naive_over_fast']:.2f}x{extra}; peak above baseline fast {peak['fast']:.0f} MiB, "
              f"naive {peak['naive']:.0f} MiB; max relative difference {r['max_relative_difference']:.1e}", flush=True)
    summary = {"model": args.model, "device": str(device), "threads": torch.get_num_threads(),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
                          f"torch {torch.__version__}", "settings": vars(args), "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("KN_PROGRESS", "0")
    main()

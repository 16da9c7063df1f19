"""ROME (Meng et al., 2022): time per edit with the statistics cached, time to compute the
statistics C = E[k kᵀ], and peak memory, each part in a fresh subprocess so its peak is its own.

    stats   second_moment(...) of ROME's layer from scratch (use_cache=False), hparams' corpus and size
    edit    `--edits` ROME edits of Atlas-CounterFact cases with C given (as when it is cached), each
            undone before the next; split into prefixes + k*, v* optimisation, and the solve + update

Peak memory: ru_maxrss of the subprocess (includes Python, torch and the model; "RSS after load" is
printed too) and torch.cuda.max_memory_allocated on a GPU.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/rome.py                # Atlas, CPU (or the GPU if any)
    python benchmarks/rome.py --device cuda --edits 50
Results are printed and written to benchmarks/results/rome.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "rome.json"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_part(args) -> dict:
    from kn_tutorial.atlas_build.rome_check import sample_cases
    from kn_tutorial.models import get_device, load_model, mlp_out_weight
    from kn_tutorial.rome import (RomeHparams, apply_rank_one, compute_k_star, compute_v_star, prepare_request,
                                  sample_prefixes, solve_c_inverse_k)
    from kn_tutorial.stats import second_moment
    from kn_tutorial.weights import snapshot_layers

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    device = get_device(model)
    hp = RomeHparams.for_model(args.model)
    out = {"device": str(device), "threads": torch.get_num_threads(), "rss_after_load_mb": rss_mb()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if args.part == "stats":
        _sync(device)
        started = time.perf_counter()
        second_moment(model, tokenizer, hp.layer, corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples, use_cache=False)
        _sync(device)
        out["seconds"] = time.perf_counter() - started
    else:
        mom2 = second_moment(model, tokenizer, hp.layer, corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples)
        parts = {"prefixes_and_k_star": [], "v_star": [], "solve_and_update": [], "total": []}
        for case in sample_cases(args.edits + 1, seed=args.seed):
            prompt, subject, target = prepare_request(case["requested_rewrite"])
            with snapshot_layers(model, hp.layer):
                _sync(device)
                t0 = time.perf_counter()
                prefixes = sample_prefixes(model, tokenizer, hp.prefixes, seed=hp.seed)
                k_star = compute_k_star(model, tokenizer, prompt, subject, hp.layer, prefixes)
                _sync(device)
                t1 = time.perf_counter()
                v = compute_v_star(model, tokenizer, prompt, subject, target, hp.layer, prefixes, hp)
                _sync(device)
                t2 = time.perf_counter()
                u = solve_c_inverse_k(mom2, k_star, hp.ridge)
                apply_rank_one(mlp_out_weight(model, hp.layer), u, k_star, v.delta)
                _sync(device)
                t3 = time.perf_counter()
            for key, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                parts[key].append(seconds)
        parts = {k: v[1:] for k, v in parts.items()}  # the first edit warms up
        out["seconds_per_edit"] = {k: {"median": statistics.median(v), "mean": statistics.mean(v),
                                       "min": min(v), "max": max(v)} for k, v in parts.items()}
        out["edits"] = len(parts["total"])
    out["rss_peak_mb"] = rss_mb()
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="atlas")
    parser.add_argument("--device", default=None)
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.part:
        print(json.dumps(run_part(args)))
        return
    results = {}
    for part in ("stats", "edit"):
        cmd = [sys.executable, __file__, "--part", part] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("part", "out") and v is not None]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KN_PROGRESS": "0"})
        if done.returncode:
            sys.exit(f"{part} failed:\n{done.stderr[-3000:]}")
        results[part] = r = json.loads(done.stdout.strip().splitlines()[-1])
        cuda = f", CUDA peak {r['cuda_peak_mb']:.0f} MiB" if "cuda_peak_mb" in r else ""
        if part == "stats":
            print(f"statistics: {r['seconds']:.1f} s; RSS after load {r['rss_after_load_mb']:.0f} MiB, "
                  f"peak {r['rss_peak_mb']:.0f} MiB{cuda}", flush=True)
        else:
            s = r["seconds_per_edit"]
            print(f"per edit ({r['edits']} edits, C cached): median {s['total']['median']:.2f} s "
                  f"(prefixes + k* {s['prefixes_and_k_star']['median']:.2f}, v* {s['v_star']['median']:.2f}, "
                  f"solve + update {s['solve_and_update']['median']:.3f}); RSS after load "
                  f"{r['rss_after_load_mb']:.0f} MiB, peak {r['rss_peak_mb']:.0f} MiB{cuda}", flush=True)
    summary = {"model": args.model, "device": results["edit"]["device"], "threads": results["edit"]["threads"],
               "python": platform.python_version(), "torch": torch.__version__, **results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Causal tracing (Meng et al., 2022): the batched implementation vs a naive loop.

One full trace (hidden, MLP and attention; 10 noise samples) of each of 20 Atlas facts, done
three ways, each in a fresh subprocess so that its peak memory is its own:

    ours-per-fact  kn_tutorial.tracing.trace, one call per (fact, kind)
    ours-batched   kn_tutorial.tracing.average_effects over all facts (prompts of one length share batches)
    ours-modules   the same, with GPT-2's written-out path off (gpt2_written): every block through
                   the Hugging Face modules and hooks, as for the other families
    naive          one forward pass per (sample, token, layer), hooks installed around each pass

Peak memory: resource.getrusage's ru_maxrss of the subprocess (it includes the Python, torch and
model baseline, printed separately as "RSS after load"), and torch.cuda.max_memory_allocated on a
GPU. The naive loop also checks that it reproduces our grid.

    nice -n 19 python benchmarks/tracing.py                   # Atlas, CPU or the GPU if there is one
    python benchmarks/tracing.py --facts 20 --samples 10 --naive-facts 5 --device cuda
Results are printed and written to benchmarks/results/tracing.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from kn_tutorial import tracing
from kn_tutorial.hooks import patch, record
from kn_tutorial.models import load_model, n_layers

RESULTS = Path(__file__).parent / "results" / "tracing.json"


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def facts_for(tokenizer, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    from kn_tutorial.atlas.templates import TEMPLATES, fill
    from kn_tutorial.atlas.world import load_world

    return [(fill(TEMPLATES[f.relation].train[0], f.subject, f.subject_kind), f.subject, f.object)
            for f in load_world().sample(n, seed=seed)]


@torch.no_grad()
def naive_trace(model, tokenizer, prompt, subject, target, kind, samples, noise=3.0, seed=0) -> torch.Tensor:
    """[T, L] mean restored P(o): one forward pass of one row per (sample, token, layer)."""
    device = next(model.parameters()).device
    ids, span = tracing._encode(tokenizer, prompt, subject, None)
    target_id = tracing._target_id(tokenizer, target)
    input_ids = torch.tensor([ids], device=device)
    L, T, site = n_layers(model), len(ids), tracing.SITE_OF_KIND[kind]
    eps = tracing.subject_noise(torch.tensor(ids), span, model.config.hidden_size, samples,
                                tracing.noise_level(model, noise), seed).to(device)
    clean = record(model, [(site, l) for l in range(L)], input_ids=input_ids)
    out = torch.zeros(T, L)
    for t in range(T):
        for l in range(L):
            for j in range(samples):
                def restore(x, t=t, l=l):
                    x = x.clone()
                    x[:, t] = clean[(site, l)][:, t]
                    return x
                with patch(model, "resid_pre", 0, lambda x, j=j: x + eps[j]), patch(model, site, l, restore):
                    logits = model(input_ids=input_ids, use_cache=False).logits[0, -1]
                out[t, l] += torch.softmax(logits.float(), -1)[target_id].item() / samples
    return out


def run_part(args) -> dict:
    """One measured part, in this (fresh) process."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    cuda = next(model.parameters()).device.type == "cuda"
    facts = facts_for(tokenizer, args.facts)
    load_rss = rss_mb()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result: dict = {"part": args.part}
    if args.part == "ours-per-fact":
        grids = {f"{i}/{kind}": tracing.trace(model, tokenizer, p, s, o, kind=kind, samples=args.samples,
                                             batch_size=args.batch_size).scores.tolist()
                 for i, (p, s, o) in enumerate(facts) for kind in tracing.KINDS}
        result["grids"] = grids
    elif args.part in ("ours-batched", "ours-modules"):
        if args.part == "ours-modules":
            from kn_tutorial import tracing_engine
            tracing_engine.is_plain_gpt2 = lambda model: False  # this subprocess only
        summary = tracing.average_effects(model, tokenizer, facts, samples=args.samples, batch_size=args.batch_size)
        result["aie_mlp_last_subject"] = summary["effects"]["mlp"][2].tolist()
    elif args.part == "naive":
        grids = {f"{i}/{kind}": naive_trace(model, tokenizer, p, s, o, kind, args.samples).tolist()
                 for i, (p, s, o) in enumerate(facts[:args.naive_facts]) for kind in tracing.KINDS}
        result["grids"] = grids
    if cuda:
        torch.cuda.synchronize()
        result["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result["seconds"] = time.perf_counter() - started
    result["rss_after_load_mb"] = load_rss
    result["rss_peak_mb"] = rss_mb()
    result["device"] = str(next(model.parameters()).device)
    result["threads"] = torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="atlas")
    parser.add_argument("--device", default=None)
    parser.add_argument("--facts", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--naive-facts", type=int, default=None, help="facts for the naive loop (default: all)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.naive_facts = args.naive_facts or args.facts
    if args.part:
        print(json.dumps(run_part(args)))
        return

    results = {}
    for part in ("ours-per-fact", "ours-batched", "ours-modules", "naive"):
        cmd = [sys.executable, __file__, "--part", part] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "part" and v is not None]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "KN_PROGRESS": "0"})
        if done.returncode:
            sys.exit(f"{part} failed:\n{done.stderr[-3000:]}")
        results[part] = json.loads(done.stdout.strip().splitlines()[-1])
        r = results[part]
        print(f"{part:>14}: {r['seconds']:8.2f} s   RSS after load {r['rss_after_load_mb']:6.0f} MiB, "
              f"peak {r['rss_peak_mb']:6.0f} MiB" + (f", CUDA peak {r['cuda_peak_mb']:.0f} MiB" if "cuda_peak_mb" in r else ""),
              flush=True)

    ours, naive = results["ours-per-fact"], results["naive"]
    worst = max(abs(a - b) for key, grid in naive["grids"].items()
                for row_a, row_b in zip(grid, ours["grids"][key]) for a, b in zip(row_a, row_b))
    share = args.naive_facts / args.facts
    naive_full = naive["seconds"] / share  # the naive loop's time for all facts (measured when share = 1)
    summary = {
        "model": args.model, "device": ours["device"], "threads": ours["threads"], "facts": args.facts,
        "samples": args.samples, "kinds": list(tracing.KINDS), "naive_facts_measured": args.naive_facts,
        "seconds": {"ours_per_fact": ours["seconds"], "ours_batched": results["ours-batched"]["seconds"],
                    "ours_modules": results["ours-modules"]["seconds"], "naive": naive_full},
        "speedup_per_fact": naive_full / ours["seconds"],
        "speedup_batched": naive_full / results["ours-batched"]["seconds"],
        "written_out_vs_modules": results["ours-modules"]["seconds"] / results["ours-batched"]["seconds"],
        "max_abs_difference_modules_vs_written": max(
            abs(a - b) for a, b in zip(results["ours-modules"]["aie_mlp_last_subject"],
                                       results["ours-batched"]["aie_mlp_last_subject"])),
        "max_abs_difference_naive_vs_ours": worst,
        "peak_memory_mb": {p: {k: v for k, v in r.items() if k.endswith("_mb")} for p, r in results.items()},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    scaled = "" if share == 1 else f" (measured on {args.naive_facts} facts, scaled to {args.facts})"
    print(f"naive loop for {args.facts} facts{scaled}: {naive_full:.1f} s")
    print(f"speed-up: {summary['speedup_per_fact']:.1f}x (trace per fact), {summary['speedup_batched']:.1f}x "
          f"(average_effects, facts batched); largest |P_naive - P_ours| = {worst:.2e}")
    print(f"GPT-2 written out vs through the modules (average_effects): {summary['written_out_vs_modules']:.2f}x; "
          f"largest AIE difference {summary['max_abs_difference_modules_vs_written']:.1e}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

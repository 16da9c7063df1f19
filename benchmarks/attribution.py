"""Benchmark: integrated gradients over every layer (Dai et al., 2022) for Atlas facts.

Measures, in one run on the same machine, facts per second of
  - `integrated_gradients` (engine "grow": rows enter the batch at their own layer, the
    prompt before the scaled token comes from a KV cache), and the "flat" engine;
  - the naive reference loop `integrated_gradients_naive` (one layer, one step, one full
    forward + backward at a time),
their ratio, peak memory, the largest difference between them, and the completeness error
|Σ_i Attr(w_i^(l)) − (P(w̄^(l)) − P(0))| / max_l |P(w̄^(l)) − P(0)| at m = 20 and as m grows
(the first step count of the ladder at which every measured fact is within 1%).

    nice -n 19 python benchmarks/attribution.py                 # 50 facts, m = 20, Atlas, 2 threads
    nice -n 19 python benchmarks/attribution.py --naive-facts 10   # the slow loop on 10 of them
    python benchmarks/attribution.py --model gpt2-xl --device cuda --facts 20

Peak memory: on CUDA torch.cuda.max_memory_allocated; on CPU the process's peak resident set
(VmHWM, reset before each method through /proc/self/clear_refs), minus the resident set before it.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from kn_tutorial import attribution as A
from kn_tutorial.atlas.templates import TEMPLATES, fill
from kn_tutorial.atlas.world import load_world
from kn_tutorial.models import default_model_name, load_model
from proc_status import status_kib  # noqa: E402  (benchmarks/ is on sys.path when a benchmark runs)


class PeakMemory:
    """Peak memory (MiB) used while the block runs, above what was in use when it started."""

    def __init__(self, device: torch.device):
        self.device, self.mib = device, float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS (Linux)
            except OSError:
                pass
            self.start = status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mib = (torch.cuda.max_memory_allocated(self.device) - self.start) / 2**20
        elif self.start is not None:
            self.mib = (status_kib("VmHWM") - self.start) / 1024


def _timed(fn, device) -> tuple:
    """(fn(), seconds, peak MiB above the memory in use before)."""
    with PeakMemory(device) as peak:
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    return out, seconds, peak.mib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=default_model_name())
    parser.add_argument("--device", default=None)
    parser.add_argument("--facts", type=int, default=50)
    parser.add_argument("--naive-facts", type=int, default=None, help="facts for the naive loop (default: all)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--completeness-facts", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    facts = load_world().sample(args.facts, seed=args.seed)
    prompts = [fill(TEMPLATES[f.relation].train[0], f.subject, f.subject_kind) for f in facts]
    targets = [f.object for f in facts]
    n_naive = args.naive_facts or args.facts
    print(f"{args.model} on {device} ({torch.get_num_threads()} threads), {len(prompts)} facts, "
          f"m = {args.steps}, every layer; torch {torch.__version__}")

    A.integrated_gradients(model, tokenizer, prompts[0], targets[0], steps=2)  # warm-up
    # The methods take turns fact by fact, so that a machine whose load changes during the run
    # slows all of them alike; each method's time is the sum over its facts.
    runs = {
        "grow": lambda p, t: A.integrated_gradients(model, tokenizer, p, t, steps=args.steps, engine="grow"),
        "flat": lambda p, t: A.integrated_gradients(model, tokenizer, p, t, steps=args.steps, engine="flat"),
        "naive": lambda p, t: A.integrated_gradients_naive(model, tokenizer, p, t, steps=args.steps),
    }
    seconds = {name: 0.0 for name in runs}
    peak = {name: 0.0 for name in runs}
    attrs = {name: [] for name in runs}
    counts = {name: 0 for name in runs}
    for i, (p, t) in enumerate(zip(prompts, targets)):
        for name, run in runs.items():
            if name == "naive" and i >= n_naive:
                continue
            attr, sec, mib = _timed(lambda: run(p, t), device)
            seconds[name] += sec
            peak[name] = max(peak[name], mib)
            attrs[name].append(attr)
            counts[name] += 1

    rate = {name: counts[name] / seconds[name] for name in runs}
    print(f"{'method':<36}{'facts':>7}{'facts/s':>10}{'x naive':>10}{'peak MiB':>10}")
    names = {"grow": "batched, rows from their layer on", "flat": "batched, every row every layer",
             "naive": "naive loop (layer x step)"}
    for name in runs:
        print(f"{names[name]:<36}{counts[name]:>7}{rate[name]:>10.3f}{rate[name] / rate['naive']:>10.1f}"
              f"{max(peak[name], 0.0):>10.0f}")
    naive = torch.stack(attrs["naive"])
    fast = torch.stack(attrs["grow"][:n_naive])
    scale = naive.flatten(1).abs().max(1).values[:, None, None]
    print(f"largest |batched - naive| / max|Attr| over {n_naive} facts: {((fast - naive) / scale).abs().max():.2e}")

    # Completeness: Σ_i Attr(w_i^(l)) against P(w̄^(l)) − P(0), per layer, from one set of gradients
    # per fact for every rule and step count (integrated_gradients_ladder).
    n_c = min(args.completeness_facts, len(prompts))
    ladder = sorted({5, 10, args.steps, 2 * args.steps, 4 * args.steps, 8 * args.steps})
    errors = {key: [] for key in ((rule, m) for rule in A.RULES for m in ladder)}
    for p, t in zip(prompts[:n_c], targets[:n_c]):
        gap = A.probability_gap(model, tokenizer, p, t)
        for key, attr in A.integrated_gradients_ladder(model, tokenizer, p, t, steps=ladder).items():
            errors[key].append(A.completeness_error(attr, gap).max().item())
    print(f"completeness error |sum_i Attr - (P(w) - P(0))| / max_l |P(w) - P(0)|, worst layer, "
          f"{n_c} facts: mean / max")
    for rule in A.RULES:
        cells = [f"m={m}: {100 * torch.tensor(errors[rule, m]).mean():.2f}% / {100 * max(errors[rule, m]):.2f}%"
                 for m in ladder]
        within = next((m for m in ladder if max(errors[rule, m]) <= 0.01), None)
        print(f"  {rule:<9} " + "  ".join(cells) + f"  | every fact within 1% from m = {within}")

if __name__ == "__main__":
    os.environ.setdefault("KN_PROGRESS", "0")
    main()

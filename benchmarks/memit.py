"""MEMIT (Meng et al., 2023): time and peak memory of editing 100 and 1,000 Atlas-CounterFact facts at once.

Each size runs in a fresh subprocess, so its peak memory is its own. Reported per size:

    targets_s   step 1: z for every key group (batched Adam on the residual stream)
    update_s    step 2: per layer, keys and residuals recomputed, λC + KKᵀ solved, W updated
                (with hparams.passes > 1, also every later pass: its targets on the edited model
                and its updates; Atlas uses 2 passes)
    peak_rss    resource.getrusage's ru_maxrss (MiB; includes Python, torch and the model: see rss_after_load)
    cuda_peak   torch.cuda.max_memory_allocated (MiB), on a GPU
    state       what grows with n: keys [n, d_ff] and targets [n, d_model] (MiB); the solve is
                [d_ff, d_ff] float64 whatever n is, and forward passes run in batches of
                MemitHparams.batch_size key groups, so memory stays bounded as edits grow.

The second moments C are loaded (or computed and cached) before the clock starts.

    nice -n 19 python benchmarks/memit.py                          # CPU, or the GPU if there is one
    python benchmarks/memit.py --sizes 100 1000 --batch-size 256   # GPU
Results are printed and written to benchmarks/results/memit.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kn_tutorial import memit  # noqa: E402
from kn_tutorial.atlas.counterfact import load_counterfact  # noqa: E402
from kn_tutorial.models import d_ff, d_model, load_model  # noqa: E402
from kn_tutorial.stats import second_moment  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "memit.json"


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_size(n: int, batch_size: int | None, threads: int | None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_model("atlas")
    hp = memit.MemitHparams.for_model("atlas")
    if batch_size:
        hp = replace(hp, batch_size=batch_size)
    mom2 = {layer: second_moment(model, tokenizer, layer, corpus=hp.mom2_corpus, n_samples=hp.mom2_n_samples)
            for layer in hp.layers}
    cases = random.Random(0).sample(load_counterfact(), n)
    rss_load = rss_mb()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.time()
    reqs, groups, hp, prefixes = memit.prepare(model, tokenizer, cases, hp)
    targets = memit.compute_targets(model, tokenizer, reqs, groups, hp.layers[-1], prefixes, hp)
    if cuda:
        torch.cuda.synchronize()
    targets_s = time.time() - start
    start = time.time()
    result = memit.edit(model, tokenizer, cases, hp, mom2=mom2, targets=targets)
    if cuda:
        torch.cuda.synchronize()
    update_s = time.time() - start
    result.restore()
    state = len(groups) * (d_ff(model) + 2 * d_model(model)) * 4 / 2**20
    return {"n_edits": n, "key_groups": len(groups), "layers": list(hp.layers), "passes": hp.passes, "batch_size": hp.batch_size,
            "targets_s": targets_s, "update_s": update_s, "total_s": targets_s + update_s,
            "rss_after_load_mb": rss_load, "peak_rss_mb": rss_mb(),
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            "state_mb": state, "solve_mb": d_ff(model) ** 2 * 8 / 2**20,
            "device": "cuda" if cuda else "cpu", "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[100, 1000])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--part", type=int, default=None, help=argparse.SUPPRESS)  # run one size here
    args = parser.parse_args()
    if args.part is not None:
        print(json.dumps(run_size(args.part, args.batch_size, args.threads)))
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--part", str(n)]
        cmd += ["--batch-size", str(args.batch_size)] if args.batch_size else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        r = rows[-1]
        print(f"{n:>5} edits ({r['key_groups']} key groups): targets {r['targets_s']:.1f} s, update {r['update_s']:.1f} s, "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB (after load {r['rss_after_load_mb']:.0f}), "
              f"CUDA peak {r['cuda_peak_mb'] or 0:.0f} MiB, keys+targets {r['state_mb']:.1f} MiB, solve {r['solve_mb']:.0f} MiB",
              flush=True)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"device": device, "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

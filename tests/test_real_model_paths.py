"""The chapters run on a model that is not Atlas (issue: "real-model paths").

A tiny *random* GPT-2 with the Atlas tokenizer, saved to a temporary folder, stands in
for a hub model: ``KN_MODEL`` is set to that folder and each chapter runs end to end with
nbclient (``scripts/run_notebooks.py``'s runner). Its sizes (6 layers, d_model 64, d_ff
256) differ from Atlas's (8, 256, 1024), so a chapter that hard-codes Atlas's shape or
compares with Atlas's tables without ``claim(...)`` fails here. A random model knows no
fact: every claim about Atlas must be skipped with its visible note, and every cell that
picks facts the model knows must cope with none.
"""
import json
import os
from pathlib import Path

import pytest

from tests.conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb"))
#: Chapters not (yet) run on the tiny model, and why. Each is a known gap, reported as a skip.
NOT_YET = {
    "00_atlas_model.ipynb": "describes Atlas itself and always loads it by name (setup(offer=False))",
}


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    """A seeded random 6-layer GPT-2 with the Atlas tokenizer, saved like a downloaded model."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from kn_tutorial.models import atlas_model_dir

    atlas = json.loads((atlas_model_dir() / "config.json").read_text())
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=atlas["vocab_size"], n_positions=atlas["n_positions"], n_embd=64, n_layer=6,
                        n_head=4, n_inner=256, bos_token_id=atlas.get("bos_token_id"),
                        eos_token_id=atlas.get("eos_token_id"))
    assert (config.n_layer, config.n_inner) != (atlas["n_layer"], atlas.get("n_inner") or 4 * atlas["n_embd"])
    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    GPT2LMHeadModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(atlas_model_dir())).save_pretrained(folder)
    write_own_hparams(folder)
    return folder


def write_own_hparams(folder: Path) -> None:
    """ROME and MEMIT settings for the tiny model, in its folder (as a user would for a local model):
    Atlas's, at other layers (ROME layer 1, MEMIT layers 1-2), so no chapter can rely on Atlas's."""
    from kn_tutorial.memit import HPARAMS_DIR as MEMIT_DIR
    from kn_tutorial.rome import HPARAMS_DIR as ROME_DIR

    rome = {**json.loads((ROME_DIR / "atlas.json").read_text()), "layer": 1, "mom2_n_samples": 500}
    memit = {**json.loads((MEMIT_DIR / "atlas.json").read_text()), "layers": [1, 2], "mom2_n_samples": 500}
    (folder / "rome_hparams.json").write_text(json.dumps(rome))
    (folder / "memit_hparams.json").write_text(json.dumps(memit))


def test_a_local_model_folder_carries_its_own_hparams(tmp_path):
    from kn_tutorial.memit import MemitHparams
    from kn_tutorial.rome import RomeHparams

    with pytest.raises(ValueError, match="rome_hparams.json"):
        RomeHparams.for_model(str(tmp_path))
    write_own_hparams(tmp_path)
    assert RomeHparams.for_model(str(tmp_path)).layer == 1
    assert MemitHparams.for_model(str(tmp_path)).layers == (1, 2)
    assert RomeHparams.for_model("atlas").layer == 0  # the shipped ones are untouched


@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_runs_on_a_tiny_random_gpt2(path, tiny_gpt2, tmp_path, monkeypatch):
    if path.name in NOT_YET:
        pytest.skip(f"{path.name} on a tiny random GPT-2: not run, {NOT_YET[path.name]}")
    runner = load_script("run_notebooks")
    monkeypatch.setenv("KN_MODEL", str(tiny_gpt2))  # the kernel inherits the environment
    monkeypatch.setenv("KN_PROGRESS", "0")
    monkeypatch.setenv("KN_CACHE", str(tmp_path / "cache"))  # statistics of this model only
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    row = runner.run_one(path, tmp_path, timeout=1800, run_skipped=False)
    assert row["status"] == "ok", f"{path.name} on a tiny random GPT-2: {row['error']}"
    assert row["model"] == str(tiny_gpt2), f"the chapter ran on {row['model']!r}, not on KN_MODEL"
    executed = json.loads((tmp_path / "executed" / path.name).read_text())
    text = "".join("".join(o.get("text", "")) for c in executed["cells"] for o in c.get("outputs", []))
    if "claim(" in "".join("".join(c["source"]) for c in executed["cells"]):
        assert f"skipped on {tiny_gpt2}: this claim is about Atlas" in text, "claims about Atlas must say they are skipped"

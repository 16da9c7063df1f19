"""The paths a chapter takes on Colab with a real model, tested offline.

On Colab the chapters load a hub model (gpt2-xl, GPT-J, ...), estimate ROME's key
statistics on a text dataset (wikitext through `datasets`) and read the real CounterFact
file. Here the same code runs on stand-ins: tiny random GPT-2 / GPT-J / GPT-NeoX / Llama
checkpoints saved to a temporary folder and loaded by path, a monkeypatched `datasets`
module and a local text file, and a CounterFact record in the paper's own schema. A hub
name that cannot be fetched must fail fast with a message that says what to do.
"""
import json
import random
import re
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from kn_tutorial import stats
from kn_tutorial.evaluation import evaluate_cases, summarize
from kn_tutorial.models import get_arch, load_model, n_layers
from tests.tiny import FAMILIES, tiny_lm

WIKITEXT = ["", " = Kuwait = \n", " Kuwait is a country in Western Asia , on the Persian Gulf . \n",
            " Osaka is a large city in Japan and the capital of its prefecture . \n", " \n",
            " Lima , the capital of Peru , lies on the Pacific coast of South America . \n",
            " Its currency is the sol . \n", " The Nile flows north through Egypt to the Mediterranean . \n"]


def _fake_datasets(monkeypatch, rows=WIKITEXT):
    """A `datasets` module whose load_dataset streams `rows`; returns the list of calls."""
    calls = []

    def load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return iter([{"text": text} for text in rows])

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    """(family, folder, original model): a tiny random model saved like a hub download."""
    model, tokenizer = tiny_lm(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return request.param, path, model


def test_load_model_from_a_local_folder(checkpoint):
    family, path, original = checkpoint
    model, tokenizer = load_model(str(path), device="cpu")
    assert get_arch(model) == get_arch(original) and not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tokenizer.pad_token == tokenizer.eos_token
    ids = torch.tensor([tokenizer("Kuwait lies in Asia", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, original(ids).logits)


def test_second_moment_on_a_streamed_text_dataset(checkpoint, monkeypatch, tmp_path):
    family, path, _ = checkpoint
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path))
    calls = _fake_datasets(monkeypatch)
    model, tokenizer = load_model(str(path), device="cpu")
    layer = n_layers(model) - 1
    mom2 = stats.second_moment(model, tokenizer, layer, corpus="wikitext", n_samples=3)
    assert calls == [("wikitext", "wikitext-103-raw-v1", "train", True)]
    # the first 3 texts of at least 20 characters, in order; headings and blanks skipped
    kept = [t for t in WIKITEXT if len(t.strip()) >= 20][:3]
    expected, _ = stats.compute_second_moment(model, tokenizer, layer, kept)
    torch.testing.assert_close(mom2, expected)
    assert torch.equal(stats.second_moment(model, tokenizer, layer, corpus="wikitext", n_samples=3), mom2)
    assert len(calls) == 1  # the second call read the cache, not the dataset


def test_dataset_corpus_filters_and_stops(monkeypatch):
    _fake_datasets(monkeypatch)
    texts = stats.dataset_corpus(2, name="wikitext", config="wikitext-2-raw-v1")
    assert texts == [WIKITEXT[2], WIKITEXT[3]]
    assert stats.dataset_corpus(100) == [t for t in WIKITEXT if len(t.strip()) >= 20]  # a short split ends early


def test_dataset_corpus_without_datasets_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` raises ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        stats.dataset_corpus(3)


def test_texts_from_dataset_reads_the_same_loader_strips_skips_headings_and_samples(monkeypatch):
    from kn_tutorial.memories import texts_from_dataset

    rows = [*WIKITEXT, " = = Geography of Kuwait and its islands = = \n"]  # a heading long enough to pass min_chars
    calls = _fake_datasets(monkeypatch, rows)
    lines = [t.strip() for t in rows if len(t.strip()) >= 25 and not t.strip().startswith("=")]
    assert sorted(texts_from_dataset(n=100, min_chars=25)) == sorted(lines)  # every long line, headings out
    assert calls == [("wikitext", "wikitext-103-raw-v1", "validation", False)]
    assert texts_from_dataset(n=2, min_chars=25, seed=3) == random.Random(3).sample(lines, 2)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="texts_from_dataset needs `pip install datasets`"):
        texts_from_dataset(n=2)


def test_second_moment_on_a_local_text_file(tmp_path, monkeypatch):
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path / "cache"))
    corpus = tmp_path / "my_corpus.txt"
    corpus.write_text("\n".join(t.strip() for t in WIKITEXT if t.strip()), encoding="utf-8")
    model, tokenizer = tiny_lm("gpt2")

    def read_lines(n):
        return corpus.read_text(encoding="utf-8").splitlines()[:n]

    mom2 = stats.second_moment(model, tokenizer, 0, corpus="my_corpus", n_samples=4, texts=read_lines)
    expected, _ = stats.compute_second_moment(model, tokenizer, 0, read_lines(4))
    torch.testing.assert_close(mom2, expected)


def test_a_counterfact_record_in_the_papers_schema(tmp_path):
    """The real CounterFact file (ids, Wikidata relation ids, extra fields) goes through the same evaluation."""
    record = {
        "case_id": 0, "pararel_idx": 2796,
        "requested_rewrite": {"prompt": "{} lies on the continent of", "relation_id": "P30",
                              "target_new": {"str": "Europe", "id": "Q46"},
                              "target_true": {"str": "Asia", "id": "Q48"}, "subject": "Kuwait"},
        "paraphrase_prompts": ["Kuwait's continent is", "Kuwait belongs to the continent of"],
        "neighborhood_prompts": ["Osaka lies on the continent of"],
        "attribute_prompts": ["Lima lies on the continent of"],
        "generation_prompts": ["Kuwait is known for"],
    }
    path = tmp_path / "counterfact.json"
    path.write_text(json.dumps([record]), encoding="utf-8")
    counterfact = pytest.importorskip("kn_tutorial.counterfact")  # the reader of a downloaded file
    cases = counterfact.load_counterfact_json(path)
    assert cases == [record]
    model, tokenizer = tiny_lm("gpt2")
    (row,) = evaluate_cases(model, tokenizer, cases)
    assert row["case_id"] == 0 and set(row) >= {"ES", "PS", "NS", "EM", "PM", "NM"}
    assert summarize([row])["n"] == 1


def test_a_missing_counterfact_download_says_where_to_get_it(tmp_path):
    counterfact = pytest.importorskip("kn_tutorial.counterfact")
    with pytest.raises(FileNotFoundError, match="wget"):
        counterfact.load_counterfact_json(tmp_path / "counterfact.json")
    partial = tmp_path / "partial.json"
    partial.write_text('[{"case_id": 0, "requested_rewrite": {', encoding="utf-8")  # a cut-off download
    with pytest.raises(ValueError, match="not valid JSON"):
        counterfact.load_counterfact_json(partial)


def test_gpt2_xl_offline_is_a_clear_fast_error(hub_unreachable):
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache("gpt2-xl", "config.json"), str):
            pytest.skip("gpt2-xl is in this machine's Hugging Face cache")
    except ImportError:
        pass
    start = time.perf_counter()
    with pytest.raises(OSError) as err:
        load_model("gpt2-xl", device="cpu")
    assert time.perf_counter() - start < 15
    message = str(err.value)
    assert "'gpt2-xl'" in message and "hf download gpt2-xl" in message and "load_model('atlas')" in message


CHAPTERS = sorted((Path(__file__).resolve().parents[1] / "book").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_chapter_opens_on_colab(path):
    """A badge to the chapter's own notebook at the top, the pinned install only on Colab, and
    setup() (which offers the real models on a GPU runtime) before the model is loaded."""
    from kn_tutorial.notebook import COLAB_SPEC, colab_url

    cells = ["".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]]
    assert colab_url(f"book/{path.name}") in "".join(cells[:2]), f"{path.name}: no Colab badge to itself at the top"
    setup_cells = [c for c in cells if COLAB_SPEC in c]
    assert setup_cells and '"google.colab" in sys.modules' in setup_cells[0], f"{path.name}: no Colab-only install"
    assert re.search(r"=\s*setup\(", setup_cells[0]), f"{path.name}: the setup cell should call setup()"
    if path.name.startswith("00_"):
        return  # chapter 0 describes Atlas itself and loads it by name
    assert any(re.search(r"load_model\(\s*MODEL_NAME", c) for c in cells), (
        f"{path.name}: the chapter should load its model with load_model(MODEL_NAME)")

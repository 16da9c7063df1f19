"""Device and dtype selection: every method runs where the model lives, in the model's dtype.

No GPU is needed: `torch.cuda.is_available` and the GPU's properties are monkeypatched,
the float16-on-CUDA rule of `load_model` is checked through the function that applies it,
and "follows the model" is checked on a bfloat16 model (a dtype no default would pick).
"""
import re
import types
from pathlib import Path

import pytest
import torch

from kn_tutorial import loading, models, notebook
from kn_tutorial.hooks import record
from kn_tutorial.models import get_device, load_model, pick_device
from kn_tutorial.scoring import encode, score
from tests.tiny import tiny_lm

PACKAGE = Path(models.__file__).resolve().parent


# ---- pick_device / get_device -----------------------------------------------------------------

@pytest.mark.parametrize("available", [True, False])
def test_pick_device_auto(monkeypatch, available):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    assert pick_device() == torch.device("cuda" if available else "cpu")
    assert pick_device(None) == pick_device()


def test_pick_device_explicit(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("cpu") == torch.device("cpu")  # an explicit CPU wins over a present GPU
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    assert pick_device(torch.device("cuda", 0)) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for asked in ("cuda", "cuda:0", torch.device("cuda")):
        with pytest.raises(RuntimeError, match=r"CUDA is not available.*device='cpu'"):
            pick_device(asked)
    with pytest.raises(RuntimeError):  # not a device at all: torch's own error
        pick_device("gpu")


def test_get_device_follows_the_parameters():
    model, _ = tiny_lm("gpt2")
    assert get_device(model) == torch.device("cpu")
    model.to("meta")  # a device with no data: where the parameters are, not where CUDA is
    assert get_device(model) == torch.device("meta")


def test_load_model_puts_the_model_on_the_picked_device(tmp_path, monkeypatch):
    model, tokenizer = tiny_lm("gpt2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    loaded, _ = load_model(str(tmp_path))  # device=None -> cpu here
    assert get_device(loaded) == torch.device("cpu")
    loaded, _ = load_model(str(tmp_path), device="meta")
    assert {p.device.type for p in loaded.parameters()} == {"meta"}


# ---- dtype: float16 only for big models on CUDA ---------------------------------------------

@pytest.mark.parametrize("device, big, expected", [
    ("cuda", True, torch.float16),   # GPT-J 6B on a 24 GB card
    ("cuda", False, torch.float32),  # gpt2-xl, Atlas
    ("cpu", True, torch.float32),    # never float16 on a CPU
    ("cpu", False, torch.float32),
])
def test_default_dtype_rule(tmp_path, monkeypatch, device, big, expected):
    model, tokenizer = tiny_lm("gpt2")
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setattr(loading, "_BIG_MODEL_PARAMS", 0 if big else 1e12)
    loaded, _ = loading._load_from(str(tmp_path), torch.device(device), None, local_only=True)
    assert next(loaded.parameters()).dtype == expected
    loaded, _ = loading._load_from(str(tmp_path), torch.device(device), torch.bfloat16, local_only=True)
    assert next(loaded.parameters()).dtype == torch.bfloat16  # an explicit dtype always wins


def test_estimated_size_separates_gptj_from_gpt2_xl():
    gpt2_xl = types.SimpleNamespace(hidden_size=1600, num_hidden_layers=48, vocab_size=50257)
    gpt_j = types.SimpleNamespace(hidden_size=4096, num_hidden_layers=28, vocab_size=50400)
    assert loading._estimate_n_params(gpt2_xl) < loading._BIG_MODEL_PARAMS < loading._estimate_n_params(gpt_j)


# ---- computations follow the model's dtype and device -----------------------------------------

def test_record_and_score_follow_a_bfloat16_model():
    model, tokenizer = tiny_lm("gpt2")
    model.to(torch.bfloat16)
    batch = encode(tokenizer, ["Kuwait lies in"], device=get_device(model))
    acts = record(model, [("key", 0), ("hidden", 1)], input_ids=batch.input_ids)
    assert all(a.dtype == torch.bfloat16 and a.device == get_device(model) for a in acts.values())
    out = score(model, tokenizer, ["Kuwait lies in", "Osaka is in"], [" Asia", " Japan"])
    assert torch.isfinite(out["logprob"]).all() and (out["first_prob"] <= 1).all()


def test_no_hard_coded_cuda_in_the_package():
    """Tensors are moved with .to(get_device(model)), never .cuda(); "cuda" is named only where
    a device is picked or a CUDA-only setting is chosen."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"\.cuda\(\)|device\s*=\s*['\"]cuda", code):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not offenders, "hard-coded CUDA device:\n" + "\n".join(offenders)


# ---- the GPU offer the chapters print ------------------------------------------------------

def _fake_gpu(monkeypatch, gigabytes, name="Tesla T4"):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i=0: types.SimpleNamespace(total_memory=int(gigabytes * 1e9)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: name)


def test_gpu_offer_silent_on_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("KN_MODEL", raising=False)
    assert notebook.gpu_offer() is None
    import matplotlib as mpl

    with mpl.rc_context():
        assert notebook.setup() == "atlas"
    assert capsys.readouterr().out == ""  # CPU runs (CI, nbval) print nothing new


def test_gpu_offer_on_a_t4(monkeypatch, capsys):
    _fake_gpu(monkeypatch, 15.8)
    monkeypatch.delenv("KN_MODEL", raising=False)
    import matplotlib as mpl

    with mpl.rc_context():
        assert notebook.setup() == "atlas"
    text = capsys.readouterr().out
    assert "Tesla T4, 16 GB" in text
    assert "%env KN_MODEL=gpt2-medium" in text and "%env KN_MODEL=gpt2-xl" in text
    assert "needs a GPU with 24 GB or more: this GPU has too little" in text
    with mpl.rc_context():
        notebook.setup(offer=False)  # a chapter that always uses Atlas
    assert capsys.readouterr().out == ""


def test_gpu_offer_reads_the_choice(monkeypatch):
    _fake_gpu(monkeypatch, 80, "NVIDIA H100")
    monkeypatch.setenv("KN_MODEL", "gpt2-xl")
    text = notebook.gpu_offer()
    assert "runs on 'gpt2-xl'" in text and "%env" not in text and "GPT-J" not in text
    monkeypatch.setenv("KN_MODEL", "EleutherAI/gpt-j-6b")
    assert "this GPU has enough" in notebook.gpu_offer()
    _fake_gpu(monkeypatch, 16)
    assert "this GPU has too little" in notebook.gpu_offer()

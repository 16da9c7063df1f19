"""Tiny random-initialised models of every supported family, and other plain test helpers.

`tiny_model(family)` builds a seeded 2-layer model (d_model 32, 4 heads, vocab 128) locally, no
download; `tiny_lm(family)` the same with the vocabulary of `tiny_tokenizer()` (a small BPE trained
on Atlas sentences); `load_script(name)` imports scripts/<name>.py. Test files import these from
here (`from tests.tiny import ...`); tests/conftest.py turns them into fixtures.
"""

import importlib.util
import sys
from pathlib import Path

import torch
import transformers

FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama")
VOCAB = 128


def load_script(name: str):
    """scripts/<name>.py as a module (registered in sys.modules: dataclasses look their module up there)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def tiny_config(family: str):
    """A 2-layer config of `family` (a models.ARCHS key); d_ff is 128 (Llama 64)."""
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, **common)
    if family == "gptj":
        return transformers.GPTJConfig(n_layer=2, n_embd=32, n_head=4, n_positions=64, rotary_dim=4, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64, **common,
        )
    if family == "llama":
        return transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, max_position_embeddings=64, **common,
        )
    raise ValueError(f"no tiny config for family {family!r}; choose one of {FAMILIES}")


def tiny_model(family: str, seed: int = 0):
    """A fresh seeded tiny *ForCausalLM of `family`, float32, eval mode, on CPU.

    Weights are drawn with std 0.2 (not HF's 0.02) so activations are O(1) and
    patching visibly changes the logits.
    """
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.1)
    return model.eval()


_TOKENIZER = None


def tiny_tokenizer():
    """A byte-level BPE (GPT-2 conventions, about 400 tokens) trained on 300 Atlas sentences, cached."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from kn_tutorial.atlas.corpus import all_training_sentences
        from kn_tutorial.atlas.tokenizer import train_tokenizer
        from kn_tutorial.atlas.world import load_world

        _TOKENIZER = train_tokenizer(all_training_sentences(load_world())[::50], vocab_size=400)
    return _TOKENIZER


def tiny_lm(family: str = "gpt2", seed: int = 0):
    """(model, tokenizer): a tiny random model of `family` whose vocabulary is tiny_tokenizer()'s."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(family)
    config.vocab_size = len(tokenizer)
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config, attr, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    return model.eval(), tokenizer

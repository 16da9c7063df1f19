"""Text generation as chapter 0 shows it: `evaluation.sample_text` with top_k=1 is greedy decoding,
and top-k sampling is reproducible from its seed."""

import torch

from kn_tutorial.evaluation import sample_text
from tests.tiny import tiny_lm

PROMPTS = ["Kuwait lies on the continent of", "Chad"]


def _greedy_by_hand(model, tokenizer, prompt, steps):
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    for _ in range(steps):
        with torch.no_grad():
            next_id = model(input_ids=ids).logits[0, -1].argmax()
        ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, -steps:])


def test_top_1_is_greedy_decoding():
    model, tokenizer = tiny_lm("gpt2")
    greedy = sample_text(model, tokenizer, PROMPTS, max_new_tokens=8, top_k=1, seed=123)
    assert greedy == [_greedy_by_hand(model, tokenizer, p, 8) for p in PROMPTS]
    assert greedy == sample_text(model, tokenizer, PROMPTS, max_new_tokens=8, top_k=1, seed=7)  # no randomness


def test_sampling_is_seeded():
    model, tokenizer = tiny_lm("gpt2")
    first = sample_text(model, tokenizer, PROMPTS, max_new_tokens=12, top_k=5, seed=0)
    assert first == sample_text(model, tokenizer, PROMPTS, max_new_tokens=12, top_k=5, seed=0)
    others = [sample_text(model, tokenizer, PROMPTS, max_new_tokens=12, top_k=5, seed=s) for s in (1, 2, 3)]
    assert any(o != first for o in others)


def test_prefix_sampling_prints_no_attention_mask_warning():
    """ROME and MEMIT sample their prefixes from <|endoftext|>, which is also the padding token; the
    chapters must not print transformers' "pass an attention_mask" warning for those unpadded rows."""
    import logging

    from transformers.utils import logging as hf_logging

    from kn_tutorial.rome import sample_prefixes

    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    library = logging.getLogger("transformers")
    handler = Keep(level=logging.WARNING)
    library.addHandler(handler)
    try:
        model, tokenizer = tiny_lm("gpt2")
        hf_logging.warning_once.cache_clear()  # the warning is printed once per process: reset that
        sample_prefixes(model, tokenizer, ((3, 2),), seed=0)
        assert not [m for m in messages if "attention_mask" in m], messages
        hf_logging.warning_once.cache_clear()  # control: the same rows without the silencing do warn
        model(input_ids=torch.full((2, 3), tokenizer.eos_token_id))
        assert [m for m in messages if "attention_mask" in m]
    finally:
        library.removeHandler(handler)

"""A GPT-2-style byte-level BPE tokenizer for the Atlas model.

Same conventions as GPT-2's tokenizer: bytes mapped to printable characters, words carry
their leading space (" Asia" is one token, "Asia" another), and `<|endoftext|>` separates
documents. It is trained on the Atlas training sentences plus every place name GeoNames
knows (about 34,000): with a small vocabulary (1,024 by default) most place names then
split into generic sub-word pieces, the way rare names split in GPT-2, so the model has to
assemble a subject from several tokens before it can recall anything about it.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .corpus import EOT


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return wrap(tokenizer)


def wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    """The Hugging Face object the rest of the package (and `from_pretrained`) uses."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOT,
        eos_token=EOT,
        unk_token=EOT,
        pad_token=EOT,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )

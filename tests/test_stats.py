"""Second-moment statistics: the definition, and a cache that never gives a silently wrong answer."""
import pytest
import torch

from kn_tutorial import stats
from kn_tutorial.hooks import record
from tests.conftest import tiny_lm

TEXTS = ["Osaka lies in Japan.", "Kuwait's capital is Kuwait City.", "Lima is in Peru."] * 4


def test_second_moment_equals_a_direct_loop_over_tokens():
    model, tokenizer = tiny_lm("gpt2")
    mom2, n_tokens = stats.compute_second_moment(model, tokenizer, 1, TEXTS, batch_size=5)
    outer, count = 0, 0
    for text in TEXTS:  # one text at a time, no padding involved
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        keys = record(model, [("key", 1)], input_ids=ids)[("key", 1)][0].double()
        outer = outer + keys.T @ keys
        count += keys.shape[0]
    assert n_tokens == count
    expected = outer / count
    # float32 keys of a padded batch vs one text at a time: equal up to float32 rounding
    torch.testing.assert_close(mom2, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())


def test_cache_is_reused_and_mismatches_are_errors(tmp_path, monkeypatch):
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path))
    model, tokenizer = tiny_lm("gpt2")
    calls = []
    compute = stats.compute_second_moment

    def counted(*args, **kwargs):
        calls.append(len(args[3]))
        return compute(*args, **kwargs)

    monkeypatch.setattr(stats, "compute_second_moment", counted)

    def texts(n):  # called every time: its content is part of the cache key
        return TEXTS[:n]

    first = stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6, texts=texts)
    again = stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6, texts=texts)
    assert calls == [6] and torch.equal(first, again)  # computed once, then read from disk
    (path,) = (tmp_path / "stats").glob("*.pt")

    path.write_bytes(b"not a torch file")
    with pytest.raises(stats.StatsCacheError, match="unreadable"):
        stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6, texts=texts)

    saved = {"meta": {"layer": 5}, "mom2": first}
    torch.save(saved, path)
    with pytest.raises(stats.StatsCacheError, match="was made for"):
        stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6, texts=texts)


def test_a_retrained_model_gets_a_new_cache_key():
    model, _ = tiny_lm("gpt2", seed=0)
    other, _ = tiny_lm("gpt2", seed=1)
    assert stats.model_fingerprint(model, 1) != stats.model_fingerprint(other, 1)
    assert stats.model_fingerprint(model, 1) == stats.model_fingerprint(tiny_lm("gpt2", seed=0)[0], 1)


def test_unknown_corpus_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path))
    model, tokenizer = tiny_lm("gpt2")
    with pytest.raises(ValueError, match="unknown corpus"):
        stats.second_moment(model, tokenizer, 0, corpus="nowhere", n_samples=3)


def test_collected_keys_give_the_second_moment():
    model, tokenizer = tiny_lm("gpt2")
    keys = stats.collect_keys(model, tokenizer, 1, TEXTS, batch_size=5)  # [d_ff, n]
    mom2, n_tokens = stats.compute_second_moment(model, tokenizer, 1, TEXTS, batch_size=7)
    assert keys.shape == (mom2.shape[0], n_tokens)
    expected = keys.double() @ keys.double().T / n_tokens
    torch.testing.assert_close(mom2, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item())

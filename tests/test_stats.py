"""Second-moment statistics: the definition, and a cache that never gives a silently wrong answer."""
import pytest
import torch

from kn_tutorial import stats
from kn_tutorial.hooks import record
from tests.tiny import tiny_lm

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


# --------------------------------------------------------------------------------------
# A cache that is never stale (issue 17, item 3)
# --------------------------------------------------------------------------------------

def _counting(monkeypatch):
    calls = []
    compute = stats.compute_second_moment
    monkeypatch.setattr(stats, "compute_second_moment", lambda *a, **k: calls.append(1) or compute(*a, **k))
    return calls


def _change(name, index=5, data=False):
    def edit(model):
        param = model.get_parameter(name)
        target = param.data if data else param
        with torch.no_grad():
            target.view(-1)[index] += 0.5
    return edit


def _swap_rows(name, a=3, b=7):
    """Swap two rows through `.data`: no version bump, same storage, and the same sum."""
    def edit(model):
        data = model.get_parameter(name).data
        assert not torch.equal(data[a], data[b])
        data[[a, b]] = data[[b, a]].clone()
    return edit


@pytest.mark.parametrize("edit, recomputed", [
    (_change("transformer.h.0.attn.c_attn.weight"), True),  # attention before the keys
    (_change("transformer.wte.weight", 200), True),  # the embeddings
    (_change("transformer.wpe.weight"), True),
    (_change("transformer.h.1.mlp.c_fc.weight", 5 * 128 + 3), True),  # c_fc row 5
    (_change("transformer.h.1.mlp.c_fc.weight", -1), True),  # its last value
    (_change("transformer.h.1.ln_2.bias", 0), True),
    (_change("transformer.h.0.mlp.c_proj.weight", -1, data=True), True),  # through .data: no version bump
    (_swap_rows("transformer.wte.weight"), True),  # a sum-preserving edit through .data
    (_swap_rows("transformer.h.1.mlp.c_fc.weight"), True),
    (_change("transformer.h.1.mlp.c_proj.weight"), False),  # the layer's own output projection (ROME's write)
    (_change("transformer.ln_f.weight", 0), False),  # after the layer
], ids=["attention", "token embeddings", "position embeddings", "c_fc row 5", "c_fc last value", "ln_2",
        "earlier c_proj via .data", "token embeddings: rows swapped via .data", "c_fc: rows swapped via .data",
        "own c_proj (kept)", "final norm (kept)"])
def test_an_edit_that_reaches_the_keys_gets_a_fresh_matrix(edit, recomputed, tmp_path, monkeypatch):
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path))
    model, tokenizer = tiny_lm("gpt2")
    texts = lambda n: TEXTS[:n]  # noqa: E731
    stats.second_moment(model, tokenizer, 1, corpus="toy", n_samples=6, texts=texts)
    calls = _counting(monkeypatch)
    edit(model)
    mom2 = stats.second_moment(model, tokenizer, 1, corpus="toy", n_samples=6, texts=texts)
    assert calls == ([1] if recomputed else [])
    fresh, _ = stats.compute_second_moment(model, tokenizer, 1, TEXTS[:6])
    assert torch.equal(mom2, fresh)  # never the pre-edit matrix


def test_fingerprint_follows_the_bytes_both_ways():
    """Hashed afresh on every call: a swap through `.data` changes it, the swap back restores it."""
    model, _ = tiny_lm("gpt2")
    first = stats.model_fingerprint(model, 1)
    swap = _swap_rows("transformer.h.0.attn.c_attn.weight")
    swap(model)
    swapped = stats.model_fingerprint(model, 1)
    swap(model)
    assert swapped != first and stats.model_fingerprint(model, 1) == first


def test_other_texts_under_the_same_corpus_name_are_another_key(tmp_path, monkeypatch):
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path))
    model, tokenizer = tiny_lm("gpt2")
    atlas = stats.second_moment(model, tokenizer, 0, corpus="atlas", n_samples=6)
    calls = _counting(monkeypatch)
    other = stats.second_moment(model, tokenizer, 0, corpus="atlas", n_samples=6, texts=lambda n: TEXTS[:n])
    assert calls == [1] and not torch.equal(atlas, other)
    toy = stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6, texts=lambda n: TEXTS[:n])
    assert torch.equal(toy, other) and calls == [1, 1]  # another name is another key too (same numbers)
    reversed_texts = stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6,
                                         texts=lambda n: TEXTS[::-1][:n])
    assert calls == [1, 1, 1] and not torch.equal(reversed_texts, toy)
    assert torch.equal(stats.second_moment(model, tokenizer, 0, corpus="atlas", n_samples=6), atlas)
    assert calls == [1, 1, 1]  # the first one is still cached


def test_two_writers_of_one_statistic_do_not_collide(tmp_path, monkeypatch):
    # writer B saves and renames its file while writer A sits between its save and its rename
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path))
    model, tokenizer = tiny_lm("gpt2")
    real_save, other, started = torch.save, [], []

    def save_then_let_the_other_writer_run(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if not started:
            started.append(1)
            other.append(stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6,
                                             texts=lambda n: TEXTS[:n]))

    monkeypatch.setattr(torch, "save", save_then_let_the_other_writer_run)
    mine = stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6, texts=lambda n: TEXTS[:n])
    files = list((tmp_path / "stats").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt" and torch.equal(mine, other[0])
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6,
                                           texts=lambda n: TEXTS[:n]), mine)


def test_names_cannot_leave_the_cache_folder(tmp_path, monkeypatch):
    cache = tmp_path / "a" / "cache"
    monkeypatch.setenv(stats.CACHE_ENV, str(cache))
    model, tokenizer = tiny_lm("gpt2")
    model.config._name_or_path = "../../../model/.."
    for corpus in ("../../escape", "/..", "x/../../y", ".."):
        stats.second_moment(model, tokenizer, 0, corpus=corpus, n_samples=3, texts=lambda n: TEXTS[:n])
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 4 and all(p.parent == cache / "stats" for p in written)

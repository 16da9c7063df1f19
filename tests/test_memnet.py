"""Memory networks (kn_tutorial.memnet): data, model invariants, training, analysis."""

import math

import pytest
import torch

from kn_tutorial.memnet import (
    COEFFICIENTS, NONCE_TOWNS, PEOPLE, MemN2N, StoryConfig, TrainConfig, WordTokenizer, atlas_names,
    coefficient_stats, coefficients, default_tokenizer, duplicate_effect, duplicate_support,
    effective_number, make_examples, make_splits, make_task, memory_read, position_encoding,
    position_weights, read_or_recall, read_story, swap_facts, train,
)

SMALL_PAIRS = atlas_names()[:40]


@pytest.fixture(scope="module")
def tiny_task():
    """A small world (40 cities), no made-up towns: a 1-hop model learns it in seconds."""
    return make_task(1000, 200, pairs=SMALL_PAIRS, story_config=StoryConfig(nonce_share=0.0))


@pytest.fixture(scope="module")
def tiny_result(tiny_task):
    return train(tiny_task, TrainConfig(hops=1, epochs=15, batch_size=64, lr=0.03))


def _random_batch(vocab=50, n=4, m=5, j=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    stories = torch.randint(1, vocab, (n, m, j), generator=gen)
    stories[:, :, 4:] = 0            # sentences of 4 words
    stories[0, 3:] = 0               # story 0 has 3 memories
    stories[1, 1:] = 0               # story 1 has 1 memory
    queries = torch.randint(1, vocab, (n, j), generator=gen)
    queries[:, 3:] = 0
    return stories, queries


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------

def test_tokenizer_names_are_single_tokens():
    tok = WordTokenizer(["Ho Chi Minh City", "Mara", "Mbuji-Mayi", "Ho"])
    assert tok("Mara flew to Ho Chi Minh City.") == ["Mara", "flew", "to", "Ho Chi Minh City"]
    assert tok("WHERE is mara?") == ["where", "is", "Mara"]
    assert tok("Mbuji-Mayi is in Ho.") == ["Mbuji-Mayi", "is", "in", "Ho"]
    assert tok("") == []


def test_every_atlas_place_is_one_known_token():
    task = make_task(10, 4)
    tok = default_tokenizer()
    for city, country in atlas_names():
        assert tok(f"{city} is in {country}.") == [city, "is", "in", country]
        assert task.vocab[city] > 1 and task.vocab[country] > 1
    for name in PEOPLE + NONCE_TOWNS:
        assert task.vocab[name] > 1
    assert task.vocab["no-such-word"] == 1 and task.vocab.itos[0] == "<pad>"


def test_examples_are_deterministic_and_consistent():
    a = make_examples(50, seed=3, nonce_share=0.5)
    assert a == make_examples(50, seed=3, nonce_share=0.5)
    assert a != make_examples(50, seed=4, nonce_share=0.5)
    countries = {k for _, k in atlas_names()}
    for e in a:
        person = e.question.rstrip("?").split()[-1] if e.question.startswith("Where") else None
        travel = e.story[e.support[0]]
        if person:
            assert travel.startswith(person)
        if e.kind == "one":
            assert len(e.support) == 1 and travel.endswith(f"{e.answer}.")
        else:
            fact = e.story[e.support[1]]
            city = travel[:-1].split(" to ", 1)[1]
            assert fact.startswith(city) and fact.endswith(f"{e.answer}.") and e.answer in countries
            assert e.made_up == (city in NONCE_TOWNS)
            if not e.made_up:
                assert dict(atlas_names())[city] == e.answer  # real facts are the world's


def test_splits_share_no_story():
    train_ex, test_ex = make_splits(300, 100, seed=0)
    assert not {e.story for e in train_ex} & {e.story for e in test_ex}
    assert not {e.story_id for e in train_ex} & {e.story_id for e in test_ex}
    assert len(test_ex) == 200 and len(train_ex) == 600
    assert make_splits(300, 100, seed=0) == (train_ex, test_ex)
    two = [e for e in test_ex if e.kind == "two"]
    assert sum(e.made_up for e in two) == 50            # half the test two-hop questions
    assert all(not e.made_up for e in test_ex[:100])    # first half: real cities only


def test_encode_shapes_and_support(tiny_task):
    enc = tiny_task.test
    N, M, J = enc.stories.shape
    assert enc.queries.shape == (N, J) and enc.answers.shape == (N,) and enc.support.shape == (N, 2)
    assert M == StoryConfig().max_memories
    for n in (0, 1, 17):
        e = enc.examples[n]
        assert (enc.stories[n].ne(0).any(-1)).sum() == len(e.story)
        first = tiny_task.tokenizer(e.story[0])
        assert enc.stories[n, 0, :len(first)].tolist() == tiny_task.vocab.ids(first)
        assert enc.support[n, 0] == e.support[0]
        assert tiny_task.vocab.itos[enc.answers[n]] == e.answer


# --------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------

def test_position_encoding_formula():
    J, d = 5, 8
    l = position_encoding(J, d)
    for j in range(1, J + 1):
        for k in range(1, d + 1):
            assert l[j - 1, k - 1].item() == pytest.approx((1 - j / J) - (k / d) * (1 - 2 * j / J))
    tokens = torch.tensor([[3, 4, 5, 6, 7, 0, 0], [2, 2, 0, 0, 0, 0, 0]])
    w = position_weights(tokens, d)
    assert w.shape == (2, 7, d)
    assert torch.allclose(w[0, :5], l) and torch.allclose(w[1, :2], position_encoding(2, d))
    assert (w[0, 5:] == 0).all() and (w[1, 2:] == 0).all()


@pytest.mark.parametrize("coef", COEFFICIENTS)
@pytest.mark.parametrize("hops", [1, 3])
def test_shapes_and_masking(coef, hops):
    torch.manual_seed(0)
    model = MemN2N(50, d=16, hops=hops, coef=coef, max_memories=6)
    stories, queries = _random_batch()
    out = model(stories, queries)
    assert out.logits.shape == (4, 50)
    assert out.coefficients.shape == out.scores.shape == (4, hops, 5)
    assert out.queries.shape == (4, hops + 1, 16)
    mask = stories.ne(0).any(-1)
    assert (out.coefficients[~mask[:, None].expand_as(out.coefficients)] == 0).all()
    if coef == "softmax":
        sums = out.coefficients.sum(-1)
        assert torch.allclose(sums, torch.ones_like(sums))
        assert torch.allclose(out.coefficients[1, :, 0], torch.ones(hops))  # one memory takes it all
    else:
        assert out.coefficients.ge(0 if coef == "relu" else -0.2).all()
    # An extra empty slot changes nothing.
    padded = torch.cat([stories, torch.zeros(4, 1, 6, dtype=torch.long)], 1)
    out2 = model(padded, queries)
    assert torch.allclose(out.logits, out2.logits, atol=1e-5)
    assert (out2.coefficients[..., -1] == 0).all()


def test_coefficients_functions():
    scores = torch.tensor([[2.0, -1.0, 0.5, 9.0]])
    mask = torch.tensor([[True, True, True, False]])
    soft = coefficients(scores, mask, "softmax")
    assert soft[0, 3] == 0 and soft.sum().item() == pytest.approx(1.0)
    assert torch.allclose(soft[0, :3], scores[0, :3].softmax(-1))
    assert coefficients(scores, mask, "relu").tolist() == [[2.0, 0.0, 0.5, 0.0]]
    gelu = coefficients(scores, mask, "gelu")
    assert gelu[0, 1] < 0 and gelu[0, 3] == 0
    # softmax is blind to a shift of all scores; ReLU is not
    assert torch.allclose(coefficients(scores + 3, mask), soft)
    assert not torch.allclose(coefficients(scores + 3, mask, "relu"), coefficients(scores, mask, "relu"))
    empty = coefficients(scores, torch.zeros_like(mask), "softmax")
    assert (empty == 0).all() and not empty.isnan().any()
    with pytest.raises(ValueError, match="softmax"):
        coefficients(scores, mask, "sigmoid")


def test_memory_read_is_weighted_sum():
    gen = torch.Generator().manual_seed(0)
    u, keys, values = torch.randn(2, 4, generator=gen), torch.randn(2, 3, 4, generator=gen), torch.randn(2, 3, 4, generator=gen)
    p, o = memory_read(u, keys, values, coef="relu")
    assert torch.allclose(p, torch.relu(torch.einsum("nd,nmd->nm", u, keys)))
    assert torch.allclose(o[1], (p[1, :, None] * values[1]).sum(0))


def test_adjacent_weight_tying():
    model = MemN2N(30, d=8, hops=3)
    assert len(model.embeddings) == 4
    assert model.B is model.A(1)
    for k in (1, 2):
        assert model.A(k + 1) is model.C(k)
    assert model.W is model.C(3).weight
    assert (model.embeddings[0].weight[0] == 0).all()  # padding embeds to zero
    with pytest.raises(ValueError):
        MemN2N(30, hops=0)
    with pytest.raises(ValueError):
        MemN2N(30, coef="tanh")


def test_word_order_matters_through_position_encoding():
    torch.manual_seed(0)
    model = MemN2N(20, d=8, hops=1)
    a = model.bag(model.B, torch.tensor([[3, 4, 5, 0]]))
    b = model.bag(model.B, torch.tensor([[5, 4, 3, 0]]))
    assert not torch.allclose(a, b)


def test_temporal_encoding():
    torch.manual_seed(0)
    model = MemN2N(50, d=8, hops=2, max_memories=5, temporal=True)
    stories, queries = _random_batch()
    out = model(stories, queries)
    assert out.logits.shape == (4, 50)
    assert model.time.shape == (3, 5, 8)
    out.logits.sum().backward()
    assert model.time.grad is not None
    with pytest.raises(ValueError, match="temporal"):
        model(torch.cat([stories, stories], 1), queries)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

def test_tiny_training_run_is_deterministic_and_learns(tiny_task, tiny_result):
    # The stated accuracy: a 1-hop softmax MemN2N on a 40-city world, 15 epochs, >= 95% one-hop.
    assert tiny_result.accuracy["one_hop"] >= 0.95, tiny_result
    assert tiny_result.accuracy["hop1_support"] >= 0.95
    assert tiny_result.losses[-1] < tiny_result.losses[0] / 10
    again = train(tiny_task, TrainConfig(hops=1, epochs=15, batch_size=64, lr=0.03))
    assert again.losses == tiny_result.losses and again.accuracy == tiny_result.accuracy
    for a, b in zip(again.model.parameters(), tiny_result.model.parameters()):
        assert torch.equal(a, b)
    assert torch.get_num_threads() >= 1


# --------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------

def test_read_story(tiny_task, tiny_result):
    city, country = SMALL_PAIRS[0]
    other, other_country = SMALL_PAIRS[1]
    story = f"Mara flew to {city}. Tomas went to {other}. {city} is in {country}. {other} is in {other_country}."
    r = read_story(tiny_result.model, tiny_task, story, "Where is Mara?")
    assert r.sentences[0] == f"Mara flew to {city}."
    assert r.coefficients.shape == (1, 4)
    assert r.coefficients.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert r.answer == city and r.coefficients[0].argmax() == 0
    assert r.unknown == []
    assert "hop 1" in r.table()
    assert read_story(tiny_result.model, tiny_task, story, "Where is Zorblax?").unknown == ["zorblax"]
    with pytest.raises(ValueError):
        read_story(tiny_result.model, tiny_task, "  ", "Where is Mara?")


def test_coefficient_stats(tiny_task, tiny_result):
    stats = coefficient_stats(tiny_result.model, tiny_task.test)
    assert len(stats) == 1
    s = stats[0]
    assert s["sum"] == pytest.approx(1.0, abs=1e-5)
    assert s["nonzero"] >= 0.95 * s["memories"]   # softmax: every memory gets some weight (bar underflow)
    assert 1.0 <= s["active"] <= s["nonzero"]
    assert 1.0 <= s["effective"] <= s["memories"]


def test_effective_number():
    p = torch.tensor([[0.0, 3.0, 0.0], [2.0, 2.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert effective_number(p).tolist() == pytest.approx([1.0, 2.0, 3.0, 0.0], abs=1e-5)


def test_duplicate_and_swap(tiny_task, tiny_result):
    examples = [e for e in tiny_task.test.examples if e.kind == "one"][:40]
    dup = duplicate_support(examples, copies=2)
    for e, d in zip(examples, dup):
        assert len(d.story) == len(e.story) + 2
        assert d.story[d.support[0]] == d.story[d.support[0] + 2] == e.story[e.support[0]]
    effect = duplicate_effect(tiny_result.model, tiny_task, examples)
    # softmax: the copies share the weight the single sentence had; the others lose some
    assert effect["total_after"] >= effect["weight_before"] - 1e-4
    assert effect["weight_after"] < effect["weight_before"]
    assert effect["other_after"] <= effect["other_before"] + 1e-4
    two = [e for e in tiny_task.test.examples if e.kind == "two" and not e.made_up][:30]
    swapped = swap_facts(two)
    assert len(swapped) == len(two)
    for (new, true), old in zip(swapped, two):
        assert new.answer != true == old.answer
        assert new.story[new.support[1]].endswith(f"{new.answer}.")
        assert new.story[:new.support[1]] == old.story[:old.support[1]]
    shares = read_or_recall(tiny_result.model, tiny_task, two)
    assert shares["read"] + shares["recall"] + shares["neither"] == pytest.approx(1.0)
    assert shares["n"] == len(two)


def test_relu_coefficients_do_not_sum_to_one(tiny_task):
    result = train(tiny_task, TrainConfig(hops=1, coef="relu", epochs=8, batch_size=64))
    s = coefficient_stats(result.model, tiny_task.test)[0]
    assert s["sum"] != pytest.approx(1.0, abs=1e-3)
    assert s["nonzero"] < s["memories"]  # ReLU: some memories get exactly 0


def test_ffn_coefficients_on_a_tiny_gpt2(make_tiny_model):
    from kn_tutorial.memnet import ffn_coefficients

    model = make_tiny_model("gpt2")

    class Tok:  # the smallest tokenizer ffn_coefficients needs
        def __call__(self, text, return_tensors=None):
            return {"input_ids": torch.tensor([[(ord(ch) % 120) + 1 for ch in text]])}

        def convert_ids_to_tokens(self, ids):
            return [str(i) for i in ids]

    r = ffn_coefficients(model, Tok(), "Osaka is in", layer=1)
    assert r["d_ff"] == 128 and r["coefficients"].shape == (128,)
    assert torch.allclose(r["output"], r["mlp_output"], atol=1e-4)
    assert r["softmax"].sum().item() == pytest.approx(1.0, abs=1e-5)
    assert 0 < r["positive"] <= r["nonzero"] <= 128   # GELU: small negatives are non-zero too
    assert torch.allclose(r["coefficients"], torch.nn.functional.gelu(r["scores"], approximate="tanh"), atol=1e-5)
    assert 1 <= r["effective"] <= r["positive"]


# --------------------------------------------------------------------------------------
# Exercises and widget
# --------------------------------------------------------------------------------------

def test_exercise_checks_accept_the_reference_and_reject_mistakes(capsys):
    from kn_tutorial.exercises import memnet as X

    def encoding(J, d, shift=0):
        j = torch.arange(1, J + 1.0)[:, None] - shift
        k = torch.arange(1, d + 1.0)[None, :]
        return (1 - j / J) - (k / d) * (1 - 2 * j / J)

    def hop(u, m, c, mask, coef, read=None):
        scores = torch.einsum("nd,nmd->nm", u, m)
        if coef == "softmax":
            p = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        else:
            p = (torch.relu(scores) if coef == "relu" else torch.nn.functional.gelu(scores)) * mask
        return p, torch.einsum("nm,nmd->nd", p, c if read is None else read)

    def entropy_number(p):
        total = p.sum(-1, keepdim=True)
        pi = p / total.clamp(min=1e-12)
        h = -(pi * torch.log(pi.clamp(min=1e-12))).sum(-1)
        return torch.where(total.squeeze(-1) > 0, h.exp(), torch.zeros_like(h))

    assert X.check_position_encoding(encoding)
    assert X.check_memory_hop(hop)
    assert X.check_effective_number(entropy_number)
    with pytest.raises(AssertionError, match="Off by one"):
        X.check_position_encoding(lambda J, d: encoding(J, d, shift=1))
    with pytest.raises(AssertionError, match="output memories"):
        X.check_memory_hop(lambda u, m, c, mask, coef: hop(u, m, c, mask, coef, read=m))
    with pytest.raises(AssertionError, match="package's own implementation"):  # the reference is not an answer
        X.check_memory_hop(lambda u, m, c, mask, coef: memory_read(u, m, c, mask, coef))
    with pytest.raises(AssertionError, match="package's own implementation"):
        X.check_effective_number(effective_number)

    def stub(*args):
        raise NotImplementedError

    assert X.check_effective_number(stub) is None
    assert "Not implemented yet" in capsys.readouterr().out


def test_explorer_builds_headless(tiny_task, tiny_result):
    pytest.importorskip("ipywidgets")
    import matplotlib

    matplotlib.use("Agg")
    from kn_tutorial.memnet.plots import explorer

    box = explorer({"1 hop": tiny_result.model}, tiny_task)
    story, row, out = box.children
    row.children[0].value = "Where is Tomas?"    # redraws without blocking
    story.value = ""                             # an empty story prints a message, no exception
    assert math.isfinite(len(out.outputs))

"""Tests for kn_tutorial.memories (Geva et al. 2021), each against an independent derivation:
the identity against the MLP's own output, triggers against a brute-force loop over texts,
value projections against a direct product of the raw parameters."""

import json
import re
from pathlib import Path

import pytest
import torch

from kn_tutorial import memories as M
from kn_tutorial.exercises import memories as X
from kn_tutorial.hooks import record
from kn_tutorial.models import (
    atlas_model_dir, final_norm, get_module, load_model, n_layers, unembedding_matrix,
)

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["kuwait is in asia.", "osaka is in japan!", "a b c", "lima, peru", "xyz", "q", "kuwait is in africa"]


class CharTokenizer:
    """One token per character (ids 1..127), pad 0: enough tokenizer for the tiny models."""

    pad_token_id = eos_token_id = 0

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 127 + 1 for c in text]}

    def decode(self, ids):
        return "".join(chr((i - 1) % 127) if i > 0 else "<pad>" for i in ids)


@pytest.fixture
def tok():
    return CharTokenizer()


# ---- 1. the identity -------------------------------------------------------------------

def _check_identity(model, input_ids, attention_mask=None):
    for layer in range(n_layers(model)):
        acts = record(model, [(s, layer) for s in ("mlp_in", "key", "mlp_out")],
                      input_ids=input_ids, attention_mask=attention_mask)
        mem = M.ffn_as_memories(model, layer, acts[("mlp_in", layer)])
        torch.testing.assert_close(mem.coefficients, acts[("key", layer)])
        torch.testing.assert_close(mem.output, acts[("mlp_out", layer)], atol=1e-5, rtol=1e-4)
        # the sum over memories, written out: sum_i m_i v_i + b_V at one position
        x0 = mem.weighted()[0, -1].sum(0) + mem.bias
        torch.testing.assert_close(x0, acts[("mlp_out", layer)][0, -1], atol=1e-5, rtol=1e-4)


def test_identity_tiny(model, input_ids):
    """GPT-2 (Conv1D), GPT-J, GPT-NeoX, Llama (gated): K, V read in the right orientation."""
    _check_identity(model, input_ids)


def test_identity_atlas():
    if not (atlas_model_dir() / "config.json").is_file():
        pytest.skip("the Atlas model is not built (python -m kn_tutorial.atlas train)")
    model, tokenizer = load_model("atlas", device="cpu")
    ids = tokenizer("Kuwait lies on the continent of", return_tensors="pt")["input_ids"]
    _check_identity(model, ids)


# ---- 2. trigger examples -----------------------------------------------------------------

def _brute_force_triggers(model, tok, texts, layer, top_k, require_next=True):
    """Every (coefficient, flat position) of every key, one text at a time, sorted;
    a prefix seen before is skipped."""
    rows, offset, seen = [], 0, set()
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        key = record(model, [("key", layer)], input_ids=ids)[("key", layer)][0]   # [s, d_ff]
        last = ids.shape[1] - 1 if require_next else ids.shape[1]
        for p in range(ids.shape[1]):
            prefix = tuple(ids[0, : p + 1].tolist())
            if p < last and prefix not in seen:
                rows.append((key[p], offset + p))
            seen.add(prefix)
        offset += ids.shape[1]
    values = torch.stack([r[0] for r in rows], 1)                                  # [d_ff, P]
    positions = torch.tensor([r[1] for r in rows])
    order = values.argsort(dim=1, descending=True)[:, :top_k]
    return values.gather(1, order), positions[order]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("require_next", [True, False])
def test_triggers_match_brute_force(make_tiny_model, tok, family, require_next):
    model = make_tiny_model(family)
    triggers = M.find_triggers(model, tok, TEXTS, top_k=5, batch_size=4, require_next=require_next)
    assert triggers.layers == [0, 1]
    for layer in (0, 1):
        values, positions = _brute_force_triggers(model, tok, TEXTS, layer, 5, require_next)
        torch.testing.assert_close(triggers.values[layer], values, atol=1e-5, rtol=1e-5)
        assert torch.equal(triggers.positions[layer], positions)
    other = M.find_triggers(model, tok, TEXTS, top_k=5, batch_size=1, require_next=require_next)
    assert torch.equal(other.positions, triggers.positions)  # batching changes nothing


def test_trigger_examples_and_display(make_tiny_model, tok):
    model = make_tiny_model("gpt2")
    triggers = M.find_triggers(model, tok, TEXTS, layers=[-1], top_k=4)
    assert triggers.layers == [1]
    corpus = triggers.corpus
    for ex in triggers.examples(1, 7):
        text = corpus.texts[ex.text_index]
        assert tok.decode(ex.prefix_ids) == text[: ex.position + 1]      # a prefix of its text
        assert ex.next_id == tok(text)["input_ids"][ex.position + 1]
    assert [e.activation for e in triggers.examples(1, 7)] == triggers.values[0, 7].tolist()
    nxt = triggers.next_tokens(1, 4)
    assert nxt.shape == (128, 4) and (nxt >= 0).all()                     # require_next
    text = M.show_triggers(triggers, tok, 1, 7, n=2, as_html=False)
    assert text.count("[[") == 2
    assert "<mark>" in M.show_triggers(triggers, tok, 1, 7, n=2)
    with pytest.raises(KeyError, match="cover layers"):
        triggers.examples(0, 1)


def test_corpus_next_token(tok):
    corpus = M.tokenize_corpus(tok, ["ab", "cde"])
    assert corpus.offsets.tolist() == [0, 2, 5]
    assert corpus.next_token(torch.arange(5)).tolist() == [tok("b")["input_ids"][0], -1,
                                                           tok("d")["input_ids"][0], tok("e")["input_ids"][0], -1]
    assert corpus.locate(3) == (1, 1)
    assert M.tokenize_corpus(tok, ["ab", "abc", "b"]).first.tolist() == [True, True, False, False, True, True]
    with pytest.raises(ValueError, match="empty"):
        M.tokenize_corpus(tok, ["a", ""])


# ---- 3. values -----------------------------------------------------------------------------

def _raw_values(model, family, layer):
    """V straight from the parameters, [d_ff, d_model], written out per family."""
    if family == "gpt2":
        return model.transformer.h[layer].mlp.c_proj.weight            # Conv1D: [in=d_ff, out]
    if family == "gptj":
        return model.transformer.h[layer].mlp.fc_out.weight.T          # Linear: [out, in]
    if family == "gpt_neox":
        return model.gpt_neox.layers[layer].mlp.dense_4h_to_h.weight.T
    return model.model.layers[layer].mlp.down_proj.weight.T


def test_value_projection_is_a_matrix_product(model, family):
    with torch.no_grad():
        V = _raw_values(model, family, 1)
        direct = V @ model.lm_head.weight.T                             # v_i E, [d_ff, vocab]
        torch.testing.assert_close(M.value_logits(model, 1), direct)
        torch.testing.assert_close(M.value_logits(model, 1, [3, 0]), direct[[3, 0]])
        probs = M.value_distribution(model, 1)
        torch.testing.assert_close(probs.sum(-1), torch.ones(len(V)))
        ids, p = M.value_top_tokens(model, 1, k=4, chunk=7)             # chunking changes nothing
        assert torch.equal(ids, direct.argsort(-1, descending=True)[:, :4])
        torch.testing.assert_close(p, direct.softmax(-1).gather(1, ids))
        normed = M.value_logits(model, 1, apply_final_norm=True)
        torch.testing.assert_close(normed, final_norm(model)(V) @ unembedding_matrix(model).T)


def _handmade_triggers(next_ids, n_keys, k):
    """A corpus of two-token texts "x y"; key i's j-th trigger is text i*k+j, next token y."""
    token_ids, offsets = [], [0]
    for y in next_ids:
        token_ids += [1, y]
        offsets.append(len(token_ids))
    corpus = M.Corpus([""] * len(next_ids), torch.tensor(token_ids), torch.tensor(offsets))
    positions = torch.tensor([2 * t for t in range(n_keys * k)]).reshape(1, n_keys, k)
    return M.Triggers([0], torch.zeros(1, n_keys, k), positions, corpus)


def test_key_value_agreement_against_loop():
    gen = torch.Generator().manual_seed(0)
    n_keys, k = 40, 3
    nxt = torch.randint(2, 9, (n_keys * k,), generator=gen).tolist()
    triggers = _handmade_triggers(nxt, n_keys, k)
    value_ids = {0: torch.randint(2, 9, (n_keys, 4), generator=gen)}
    for n_examples, top in [(1, 1), (3, 2), (2, 4)]:
        got = M.key_value_agreement(triggers, value_ids, n_examples=n_examples, k=top)
        hits = sum(any(nxt[i * k + j] in value_ids[0][i, :top].tolist() for j in range(n_examples))
                   for i in range(n_keys))
        assert got["agreement"] == [pytest.approx(hits / n_keys)]
        assert 0 <= got["baseline"][0] <= 1
    assert X.reference_agreement_rate(triggers.next_tokens(0, 1)[:, 0], value_ids[0][:, :2]) == \
        pytest.approx(M.key_value_agreement(triggers, value_ids, 1, 2)["agreement"][0])


def test_next_token_ranks_against_sort(make_tiny_model, tok):
    model = make_tiny_model("gpt2")
    triggers = M.find_triggers(model, tok, TEXTS, top_k=2)
    ranks = M.next_token_ranks(triggers, model, 1)
    logits = M.value_logits(model, 1)
    nxt = triggers.next_tokens(1, 1)[:, 0]
    for i in range(0, 128, 17):
        order = logits[i].argsort(descending=True).tolist()
        assert ranks[i].item() == order.index(nxt[i].item())


# ---- 4. shallow or semantic ------------------------------------------------------------------

def _pair_share_loop(ids):
    pairs = [(a, b) for i, a in enumerate(ids) for j, b in enumerate(ids) if i != j and a is not None and b is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")


def test_trigger_sharing_against_loop():
    # 6 texts of 3 tokens; key 0's triggers all end in token 5; key 1's in three different tokens
    tokens = [[1, 5, 9], [2, 5, 9], [3, 5, 9], [1, 6, 9], [1, 7, 9], [1, 8, 9]]
    flat = torch.tensor([t for row in tokens for t in row])
    corpus = M.Corpus([""] * 6, flat, torch.arange(0, 19, 3))
    positions = torch.tensor([[[1, 4, 7], [10, 13, 16]]])               # [1 layer, 2 keys, 3]
    triggers = M.Triggers([0], torch.zeros(1, 2, 3), positions, corpus)
    continent = ["Asia", "Europe", "Asia", "Africa", "Africa", None]
    per_key = M.key_sharing(triggers, 0, {"continent": continent}, n_examples=3)
    assert per_key["last token"].tolist() == [1.0, 0.0]
    assert per_key["continent"][0].item() == pytest.approx(_pair_share_loop(["Asia", "Europe", "Asia"]))
    assert per_key["continent"][1].item() == pytest.approx(1.0)           # Africa, Africa, (None)
    # tokens 6, 7, 8 occur once among the candidates: resampling cannot move them
    assert per_key["continent | tokens"][1].item() == pytest.approx(1.0)
    out = M.trigger_sharing(triggers, {"continent": continent}, n_examples=3, n_random=50)
    assert out["keys"]["last token"] == [pytest.approx(0.5)]
    assert set(out["chance"]) == {"layer", "last token", "continent"}


def test_same_token_resample_keeps_tokens_and_spreads():
    flat = torch.tensor([4, 4, 4, 4, 7, 9, 9])
    corpus = M.Corpus([""], flat, torch.tensor([0, 7]))
    pool = torch.arange(7)
    gen = torch.Generator().manual_seed(0)
    positions = torch.tensor([[0, 4, 5]] * 400)
    moved = M.same_token_resample(corpus, positions, pool, gen)
    assert torch.equal(flat[moved], flat[positions])                    # same tokens
    assert (moved[:, 1] == 4).all()                                     # token 7 occurs once
    assert set(moved[:, 0].tolist()) == {0, 1, 2, 3} and set(moved[:, 2].tolist()) == {5, 6}


def test_atlas_token_parts():
    from kn_tutorial.atlas.world import load_world

    class Words:  # a word-level tokenizer with character offsets, like a fast tokenizer
        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            import re as _re
            spans = [(m.start(), m.end()) for m in _re.finditer(r" ?[^ .]+|\.", text)]
            out = {"input_ids": [hash(text[a:b]) % 97 + 1 for a, b in spans]}
            if return_offsets_mapping:
                out["offset_mapping"] = spans
            return out

    rows = [r for r in M.atlas_sentences(load_world()) if r.text.startswith("Kuwait lies")][:1]
    rows += [r for r in M.atlas_sentences(load_world()) if r.followup][:1]
    corpus = M.tokenize_corpus(Words(), [r.text for r in rows])
    parts = M.atlas_token_parts(Words(), rows, corpus)
    # "Kuwait lies on the continent of Asia." / "It ... of <object>."
    assert parts[:8].tolist() == [0, 1, 1, 1, 1, 1, 2, 2]
    assert 0 not in parts[8:].tolist() and parts[-1].item() == 2
    triggers = M.Triggers([0], torch.zeros(1, 1, 2), torch.tensor([[[0, 3]]]), corpus)
    shares = M.trigger_parts(triggers, parts, n_examples=2)
    assert shares["keys"]["subject"] == [0.5] and shares["keys"]["relation"] == [0.5]
    # a subject in the middle, and named again in the object
    capital = type(rows[0].fact)("Kuwait", "capital", "Kuwait City", "country")
    middle = M.AtlasSentence("In the atlas, Kuwait has the capital Kuwait City.", capital, False, "Asia")
    corpus = M.tokenize_corpus(Words(), [middle.text])
    assert M.atlas_token_parts(Words(), [middle], corpus).tolist() == [1, 1, 1, 0, 1, 1, 1, 2, 2, 2]


def test_atlas_sentences_are_the_corpus():
    from kn_tutorial.atlas.corpus import all_training_sentences
    from kn_tutorial.atlas.world import load_world

    world = load_world()
    rows = M.atlas_sentences(world)
    assert [r.text for r in rows] == all_training_sentences(world)
    assert M.atlas_sentences(world, n=50, seed=1) == M.atlas_sentences(world, n=50, seed=1)
    kuwait = next(r for r in rows if r.text.startswith("Kuwait ") and not r.followup)
    assert kuwait.continent == "Asia"
    assert all(r.continent is None for r in rows if r.followup)


def test_token_removal_effect_against_loop(make_tiny_model, tok):
    model = make_tiny_model("gpt2")
    triggers = M.find_triggers(model, tok, TEXTS, top_k=3)
    got = M.token_removal_effect(model, triggers, n_keys=4, n_examples=2, seed=3, batch_size=5)
    # recompute "last" (deterministic: drop the trigger token) one prefix at a time
    import random
    gen = random.Random(3)
    for layer in (0, 1):
        rel = []
        for neuron in gen.sample(range(128), 4):
            for ex in triggers.examples(layer, neuron, 2):
                if len(ex.prefix_ids) < 3 or ex.activation <= 0:
                    continue
                gen.randrange(1, len(ex.prefix_ids) - 1)  # the same draws as the function
                ids = torch.tensor([ex.prefix_ids[:-1]])
                new = record(model, [("key", layer)], input_ids=ids)[("key", layer)][0, -1, neuron].item()
                rel.append((new - ex.activation) / ex.activation)
        assert got["last"][layer] == pytest.approx(sum(rel) / len(rel), rel=1e-4, abs=1e-5)
    assert set(got) == {"layer", "first", "last", "random"}


# ---- 5. composition and refinement -------------------------------------------------------------

def test_memory_composition_against_loop(make_tiny_model, tok):
    model = make_tiny_model("gpt2")
    prompts = TEXTS[:5]
    got = M.memory_composition(model, tok, prompts, top_n=3, batch_size=2)
    E = unembedding_matrix(model).T
    for layer in range(2):
        strongest = any_top = 0
        for prompt in prompts:
            ids = torch.tensor([tok(prompt)["input_ids"]])
            acts = record(model, [("key", layer), ("mlp_out", layer)], input_ids=ids)
            m, o = acts[("key", layer)][0, -1], acts[("mlp_out", layer)][0, -1]
            V = _raw_values(model, "gpt2", layer).detach()
            contrib = m[:, None] * V                                      # m_i v_i   [d_ff, d]
            top = contrib.norm(dim=-1).argsort(descending=True)[:3]
            tokens = [(contrib[i] @ E).argmax().item() for i in top]
            target = (o @ E).argmax().item()
            strongest += tokens[0] == target
            any_top += target in tokens
        assert got["strongest"][layer] == pytest.approx(strongest / 5)
        assert got["any of top_n"][layer] == pytest.approx(any_top / 5)
        assert got["composition"][layer] == pytest.approx(1 - any_top / 5)


def test_refinement_against_hidden_states(model, tok):
    prompts = TEXTS[:4]
    got = M.refinement(model, tok, prompts, batch_size=3)
    L = n_layers(model)
    assert got["matches final"][-1] == 1.0
    for layer in range(L):
        total = got["residual"][layer] + got["ffn"][layer] + got["composition"][layer]
        assert total == pytest.approx(1.0)
    for layer in range(L - 1):  # output_hidden_states[l + 1] is the block output of layer l
        same = 0
        for prompt in prompts:
            with torch.no_grad():
                out = model(torch.tensor([tok(prompt)["input_ids"]]), output_hidden_states=True)
                lens = model.lm_head(final_norm(model)(out.hidden_states[layer + 1][0, -1]))
            same += lens.argmax().item() == out.logits[0, -1].argmax().item()
        assert got["matches final"][layer] == pytest.approx(same / len(prompts))


# ---- 6. looking around ----------------------------------------------------------------------

def test_top_memories_and_explorer(make_tiny_model, tok):
    model = make_tiny_model("gpt2")
    rows = M.top_memories(model, tok, "osaka is in", k=4)
    strengths = [r["strength"] for r in rows]
    assert strengths == sorted(strengths, reverse=True)
    key = record(model, [("key", 0), ("key", 1)], input_ids=torch.tensor([tok("osaka is in")["input_ids"]]))
    best = max((key[("key", l)][0, -1].abs() * _raw_values(model, "gpt2", l).norm(dim=-1)).max().item()
               for l in range(2))
    assert strengths[0] == pytest.approx(best)
    assert len(rows[0]["tokens"]) == 5
    triggers = M.find_triggers(model, tok, TEXTS, top_k=3)
    widget = M.memory_explorer(model, tok, triggers, ["osaka is in", "lima is in"])
    html_panels = [w for w in widget.children if hasattr(w, "value") and isinstance(w.value, str)]
    assert any("<mark>" in w.value for w in html_panels)


# ---- exercises ---------------------------------------------------------------------------

def _notebook_solutions():
    """The solution code blocks of the chapter's <details> dropdowns."""
    path = ROOT / "book" / "01_ffn_memories.ipynb"
    if not path.exists():
        pytest.skip("the chapter notebook is not there yet")
    cells = json.loads(path.read_text())["cells"]
    text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return re.findall(r"<details>.*?```python\n(.*?)```.*?</details>", text, re.S)


def test_exercise_checks_and_notebook_solutions(make_tiny_model, capsys):
    model = make_tiny_model("gpt2")

    def stub(*args):
        raise NotImplementedError

    assert X.check_ffn_output(stub, model) is None
    assert "Not implemented yet" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="package's own implementation"):  # the module itself is not an answer
        X.check_ffn_output(lambda m, l, x: get_module(m, l, "mlp")(x), model)
    with pytest.raises(AssertionError, match="expected"):
        X.check_value_top_tokens(lambda m, l, i, k: list(range(k)), model)
    with pytest.raises(AssertionError, match="agreement_rate gave"):
        X.check_agreement_rate(lambda nxt, top: 0.5)

    solutions = _notebook_solutions()
    assert len(solutions) == 4, "expected four exercise solutions in the chapter"
    from kn_tutorial.hooks import record

    namespace = {"torch": torch, "record": record}
    for code in solutions:
        exec(code, namespace)  # noqa: S102  (our own notebook's solution code)
    assert X.check_ffn_output(namespace["my_ffn_output"], model)
    assert X.check_value_top_tokens(namespace["my_value_top_tokens"], model)
    assert X.check_agreement_rate(namespace["my_agreement_rate"])

"""Integrated gradients (Dai et al. 2022) checked against its definition on tiny models.

Independent derivations: the naive loop (one layer, one step, full forward and backward at a
time, no cache); completeness against P(x with the layer's neurons at w̄) − P(x with them at 0)
measured with hooks.set_neurons and scoring.score; the gradient against central finite
differences; the Riemann points against their formulas."""
import pytest
import torch

from kn_tutorial import attribution as A
from kn_tutorial.hooks import count_hooks, record, set_neurons
from kn_tutorial.models import d_ff, n_layers
from kn_tutorial.scoring import encode, score
from tests.tiny import FAMILIES, tiny_lm

PROMPT = "Kuwait lies on the continent of"
TARGET = " Kuwait City"  # several tokens in the tiny tokenizer: exercises teacher forcing


def _prob(model, tokenizer, prompt, target, first=False):
    out = score(model, tokenizer, [prompt], [target])
    return float(out["first_prob"][0] if first else out["logprob"][0].exp())


def _gap(model, tokenizer, prompt, target, layer, position=-1, first=False):
    """P(layer's keys at w̄) − P(layer's keys at 0) at the prompt position, via set_neurons."""
    n = encode(tokenizer, [prompt]).prompt_lengths[0]
    with set_neurons(model, layer, list(range(d_ff(model))), value=0.0, positions=[position % n]):
        p0 = _prob(model, tokenizer, prompt, target, first)
    return _prob(model, tokenizer, prompt, target, first) - p0


def test_riemann_alphas_follow_their_formulas():
    torch.testing.assert_close(A.riemann_alphas(4, "right"), torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64))
    torch.testing.assert_close(A.riemann_alphas(4, "left"), torch.tensor([0.0, 0.25, 0.5, 0.75], dtype=torch.float64))
    torch.testing.assert_close(A.riemann_alphas(2, "midpoint"), torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError, match="rule"):
        A.riemann_alphas(4, "trapezoid")
    with pytest.raises(ValueError, match="steps"):
        A.riemann_alphas(0)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_naive_loop(family):
    model, tok = tiny_lm(family)
    naive = A.integrated_gradients_naive(model, tok, PROMPT, TARGET, steps=3)
    scale = naive.abs().max()
    assert scale > 0
    for engine in A.ENGINES:
        fast = A.integrated_gradients(model, tok, PROMPT, TARGET, steps=3, engine=engine)
        assert fast.shape == (n_layers(model), d_ff(model)) and fast.dtype == torch.float32
        torch.testing.assert_close(fast / scale, naive / scale, rtol=0, atol=1e-5)
    # another position (multi-token suffix after the cache), another rule, small chunks
    naive = A.integrated_gradients_naive(model, tok, PROMPT, TARGET, steps=2, position=2, rule="left")
    fast = A.integrated_gradients(model, tok, PROMPT, TARGET, steps=2, position=2, rule="left", batch_size=3)
    torch.testing.assert_close(fast / naive.abs().max(), naive / naive.abs().max(), rtol=0, atol=1e-5)
    assert type(model) not in A._GROW_FAILED, "the grow engine fell back to flat"
    assert count_hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters())


def test_batched_equals_naive_loop_on_atlas():
    """The shipped model: a one-token answer (the rows run one token on the cache) and a scaled
    position inside the prompt (several tokens after the cache), against the naive loop, 1e-5."""
    from kn_tutorial.models import load_model
    model, tok = load_model("atlas")
    for position, target in ((-1, " Asia"), (2, " Asia")):
        naive = A.integrated_gradients_naive(model, tok, PROMPT, target, steps=3, position=position)
        fast = A.integrated_gradients(model, tok, PROMPT, target, steps=3, position=position)
        scale = naive.abs().max()
        assert scale > 0
        torch.testing.assert_close(fast / scale, naive / scale, rtol=0, atol=1e-5)
    assert type(model) not in A._GROW_FAILED, "the grow engine fell back to flat"


def test_written_out_gpt2_and_module_path_both_match_naive(monkeypatch):
    """GPT-2 takes the written-out forward (attribution_gpt2._gpt2_run_rows, or
    _gpt2_one_token_pass for a one-token suffix), unless a hook is installed; the module path stays right for it too. One-token and several-token suffixes."""
    from kn_tutorial import attribution_engine as E
    from kn_tutorial import attribution_gpt2 as G
    from kn_tutorial.models import load_model
    atlas = load_model("atlas")
    for (model, tok), target, position in ((tiny_lm("gpt2"), TARGET, -1), (tiny_lm("gpt2"), TARGET, 2),
                                            (atlas, " Asia", -1), (atlas, " Asia", 3)):
        assert E.is_plain_gpt2(model)
        naive = A.integrated_gradients_naive(model, tok, PROMPT, target, steps=3, position=position)
        scale = naive.abs().max()
        calls, run_rows, one_token = [], E._gpt2_run_rows, G._gpt2_one_token_pass
        with monkeypatch.context() as m:
            m.setattr(E, "_gpt2_run_rows", lambda *a, **k: calls.append(1) or run_rows(*a, **k))
            m.setattr(G, "_gpt2_one_token_pass", lambda *a, **k: calls.append(1) or one_token(*a, **k))
            written = A.integrated_gradients(model, tok, PROMPT, target, steps=3, position=position, layers=[0, 1])
        assert calls, "the written-out GPT-2 path did not run"
        with monkeypatch.context() as m:
            m.setattr(E, "is_plain_gpt2", lambda model: False)
            module = A.integrated_gradients(model, tok, PROMPT, target, steps=3, position=position)
        torch.testing.assert_close(written / scale, naive[[0, 1]] / scale, rtol=0, atol=1e-5)
        torch.testing.assert_close(module / scale, naive / scale, rtol=0, atol=1e-5)
    model, tok = tiny_lm("gpt2")
    handle = model.transformer.h[0].register_forward_hook(lambda module, args, out: None)
    assert not E.is_plain_gpt2(model)  # a hook would be bypassed: the module path runs
    handle.remove()
    assert E.is_plain_gpt2(model)
    model.train()
    assert not E.is_plain_gpt2(model)


def test_written_gelu_and_its_derivative_are_gpt2s():
    """gpt2_written.gelu_saving / gelu_derivative (x sigmoid(2u), the fast path's GELU) against torch's
    tanh GELU and its autograd derivative, in float64 over GPT-2's range and beyond, and finite in
    16-bit floats."""
    from kn_tutorial import gpt2_written as W
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64).requires_grad_(True)
    want = torch.nn.functional.gelu(x, approximate="tanh")
    grad = torch.randn(2001, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (want_grad,) = torch.autograd.grad(want, x, grad)
    out = torch.empty_like(want)
    gate = W.gelu_saving(x.detach(), out)
    torch.testing.assert_close(out, want.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(W.gelu_derivative(x.detach(), gate) * grad, want_grad, rtol=1e-12, atol=1e-14)
    # 16-bit inputs: computed in float32, so x^3 does not overflow (float16's range ends at 65504)
    for dtype in (torch.float16, torch.bfloat16):
        half = torch.linspace(-300, 300, 601).to(dtype)
        out = torch.empty_like(half)
        slope = W.gelu_derivative(half, W.gelu_saving(half, out))
        assert slope.dtype == dtype and torch.isfinite(slope).all() and torch.isfinite(out).all()
        wide = half.float().requires_grad_(True)
        (want_slope,) = torch.autograd.grad(torch.nn.functional.gelu(wide, approximate="tanh").sum(), wide)
        torch.testing.assert_close(slope.float(), want_slope, rtol=1e-2, atol=1e-2)


def test_one_token_backward_written_out_matches_naive(monkeypatch):
    """A one-token answer scaled at the last prompt token (the usual query) takes the GPT-2 path
    whose forward and backward passes are written out, the prompt in the same pass
    (attribution_gpt2._gpt2_one_token_pass), for every Riemann rule (α = 1, the clean row's, or
    0 among the steps, or neither), one step, in chunks that split a layer's rows, and with a
    subset of the layers: against the naive loop in float32 (1e-5), on the tiny GPT-2 and on
    Atlas (float64: test_every_path_equals_the_naive_loop_in_float64, 1e-9). Atlas's facts are
    learnt well (P near 1), so the gradients rest on 1 − P and are sensitive to rounding: on
    "Las Palmas" (P = 1 − 3e-6) float32, the naive loop's included, sits up to 2e-3 from float64
    (relative to the largest attribution), and a softmax rounded unlike the naive loop's moved
    the written-out path by 1e-4 from it (right rule: the regression the float32 check catches)."""
    from kn_tutorial import attribution_gpt2 as G
    from kn_tutorial.models import load_model
    calls, run = [], G._gpt2_one_token_pass
    monkeypatch.setattr(G, "_gpt2_one_token_pass", lambda *a, **k: calls.append(1) or run(*a, **k))
    tiny, atlas = tiny_lm("gpt2"), load_model("atlas")
    palmas = ("Las Palmas de Gran Canaria is located in the continent of", " Europe")
    for (model, tok), (prompt, target), rule, steps, batch_size, layers in (
            (tiny, (PROMPT, " Asia"), "right", 4, None, None),
            (tiny, (PROMPT, " Asia"), "left", 4, 3, None),
            (tiny, (PROMPT, " Asia"), "midpoint", 3, None, [1]),
            (tiny, (PROMPT, " Asia"), "right", 1, None, None),
            (tiny, (PROMPT, " Asia"), "right", 3, 2, [1, 0]),
            (atlas, (PROMPT, " Asia"), "right", 4, None, None),
            (atlas, palmas, "right", 4, None, None),
            (atlas, palmas, "midpoint", 3, 7, None)):
        naive = A.integrated_gradients_naive(model, tok, prompt, target, steps=steps, rule=rule, layers=layers)
        calls.clear()
        fast = A.integrated_gradients(model, tok, prompt, target, steps=steps, rule=rule, batch_size=batch_size,
                                      layers=layers)
        assert calls, "the written-out backward did not run"
        assert fast.dtype == naive.dtype == torch.float32
        scale = naive.abs().max()
        torch.testing.assert_close(fast / scale, naive / scale, rtol=0, atol=1e-5)


def test_every_path_equals_the_naive_loop_in_float64(monkeypatch):
    """With Atlas in float64, every path of integrated_gradients agrees with the definition run
    literally (integrated_gradients_naive) to 1e-9 of the largest attribution (issue 21: the
    agreement in float32 is float rounding, not an approximation): GPT-2 written out for a
    one-token suffix (one forward and one hand-written backward pass: every Riemann rule, one
    step, chunks that split a layer's rows, a subset of the layers), for several tokens after the
    cache (a scaled position inside the prompt, a two-token target), the module path ("grow"),
    and engine="flat". Probabilities, gradients and attributions stay in float64 in both: one
    rounding to float32 anywhere leaves ~1e-7 or more."""
    import copy

    from kn_tutorial import attribution_engine as E
    from kn_tutorial import attribution_gpt2 as G
    from kn_tutorial.models import load_model
    atlas, tok = load_model("atlas")
    model = copy.deepcopy(atlas).double()
    ran = []
    for owner, name in ((G, "_gpt2_one_token_pass"), (E, "_gpt2_run_rows"), (E, "_run_rows_grow")):
        monkeypatch.setattr(owner, name, lambda *a, _run=getattr(owner, name), _name=name, **k:
                            ran.append(_name) or _run(*a, **k))
    flat = E.ENGINES["flat"]
    monkeypatch.setitem(E.ENGINES, "flat", lambda *a, **k: ran.append("flat") or flat(*a, **k))
    kuwait, asia = PROMPT, " Asia"
    palmas, europe = "Las Palmas de Gran Canaria is located in the continent of", " Europe"
    brazil, south_america = "Brazil lies on the continent of", " South America"  # two tokens in Atlas
    assert len(tok(south_america)["input_ids"]) == 2
    cases = (  # path that must run, module path?, prompt, target, keyword arguments
        ("_gpt2_one_token_pass", False, kuwait, asia, dict(rule="right", steps=4)),
        ("_gpt2_one_token_pass", False, palmas, europe, dict(rule="right", steps=4)),
        ("_gpt2_one_token_pass", False, palmas, europe, dict(rule="left", steps=3, batch_size=7)),
        ("_gpt2_one_token_pass", False, kuwait, asia, dict(rule="midpoint", steps=3, batch_size=5, layers=[0, 6, 11])),
        ("_gpt2_one_token_pass", False, palmas, europe, dict(rule="right", steps=1, layers=[3, 8])),
        ("_gpt2_run_rows", False, kuwait, asia, dict(rule="right", steps=3, position=2, layers=[1, 5, 10])),
        ("_gpt2_run_rows", False, brazil, south_america,
         dict(rule="midpoint", steps=3, batch_size=4, layers=[0, 4, 11])),
        ("_run_rows_grow", True, palmas, europe, dict(rule="right", steps=3, batch_size=5, layers=[0, 7])),
        ("_run_rows_grow", True, kuwait, asia, dict(rule="left", steps=3, position=2, layers=[3, 11])),
        ("_run_rows_grow", True, brazil, south_america, dict(rule="right", steps=2, layers=[2, 10])),
        ("flat", False, palmas, europe, dict(rule="right", steps=3, engine="flat", layers=[2, 9])),
        ("flat", False, brazil, south_america, dict(rule="midpoint", steps=2, position=1, engine="flat",
                                                    batch_size=3, layers=[5, 6])),
    )
    for path, modules, prompt, target, kwargs in cases:
        definition = {k: v for k, v in kwargs.items() if k not in ("batch_size", "engine")}
        naive = A.integrated_gradients_naive(model, tok, prompt, target, **definition)
        ran.clear()
        with monkeypatch.context() as m:
            if modules:
                m.setattr(E, "is_plain_gpt2", lambda model: False)
            fast = A.integrated_gradients(model, tok, prompt, target, **kwargs)
        assert path in ran and set(ran) == {path}, (path, ran)
        assert fast.dtype == naive.dtype == torch.float64
        scale = naive.abs().max()
        assert scale > 0
        torch.testing.assert_close(fast / scale, naive / scale, rtol=0, atol=1e-9, msg=lambda m: f"{path}: {m}")
    assert type(model) not in A._GROW_FAILED, "the grow engine fell back to flat"


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_attention_also_matches(family):
    """Eager attention builds an explicit mask tensor: the "grow" engine must broadcast it."""
    model, tok = tiny_lm(family)
    model.set_attn_implementation("eager")
    naive = A.integrated_gradients_naive(model, tok, PROMPT, TARGET, steps=2, position=1)
    fast = A.integrated_gradients(model, tok, PROMPT, TARGET, steps=2, position=1)
    torch.testing.assert_close(fast / naive.abs().max(), naive / naive.abs().max(), rtol=0, atol=1e-5)
    assert type(model) not in A._GROW_FAILED


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_completeness_error_shrinks_with_steps(family):
    """Σ_i Attr(w_i) → P(w̄) − P(0) per layer: error O(1/m) for right sums, O(1/m²) for midpoints."""
    model, tok = tiny_lm(family)
    gaps = torch.tensor([_gap(model, tok, PROMPT, TARGET, layer) for layer in range(n_layers(model))])
    torch.testing.assert_close(A.probability_gap(model, tok, PROMPT, TARGET), gaps, rtol=1e-4, atol=1e-9)
    for rule, order in (("right", 1), ("midpoint", 2)):
        errors = []
        for m in (4, 16, 64):
            attr = A.integrated_gradients(model, tok, PROMPT, TARGET, steps=m, rule=rule)
            errors.append(((attr.sum(-1).double() - gaps).abs() / gaps.abs().max()).max().item())
        assert errors[0] > errors[1] > errors[2], (rule, errors)
        # the error falls like 1/m^order: 4x more steps divide it by at least 4^order / 1.5
        assert errors[2] <= 1.5 * errors[1] / 4**order, (rule, errors)
    assert errors[2] < 0.01  # midpoint, m = 64: within 1% of the largest layer gap


def test_first_token_mode_and_completeness():
    model, tok = tiny_lm("gpt2")
    gap = _gap(model, tok, PROMPT, TARGET, 1, first=True)
    attr = A.integrated_gradients(model, tok, PROMPT, TARGET, steps=32, layers=[1], rule="midpoint",
                                  target_tokens="first")
    assert abs(attr.sum().item() - gap) < 1e-3 * abs(gap)
    # a one-token target scores the same either way
    one = A.integrated_gradients(model, tok, PROMPT, " Asia", steps=2)
    torch.testing.assert_close(one, A.integrated_gradients(model, tok, PROMPT, " Asia", steps=2, target_tokens="first"))


def test_gradient_matches_finite_differences():
    """activation × gradient (m = 1) against central differences of P in float64."""
    model, tok = tiny_lm("gpt2")
    model.double()
    layer, eps = 1, 1e-5
    ids = encode(tok, [PROMPT]).input_ids
    w_bar = record(model, [("key", layer)], input_ids=ids)[("key", layer)][0, -1]
    axg = A.activation_times_gradient(model, tok, PROMPT, TARGET, layers=[layer])[0]
    for neuron in axg.abs().topk(3).indices.tolist() + [0]:
        probs = []
        for sign in (1, -1):
            value = float(w_bar[neuron]) + sign * eps
            with set_neurons(model, layer, [neuron], value=value, positions=[ids.shape[1] - 1]):
                probs.append(_prob(model, tok, PROMPT, TARGET))
        expected = float(w_bar[neuron]) * (probs[0] - probs[1]) / (2 * eps)
        assert abs(axg[neuron].item() - expected) < 1e-5 * axg.abs().max().item() + 1e-12


def test_path_probabilities_endpoints_and_suppression():
    model, tok = tiny_lm("gpt_neox")
    path = A.path_probabilities(model, tok, PROMPT, TARGET, [0.0, 0.5, 1.0])
    assert path.shape == (2, 3)
    clean = _prob(model, tok, PROMPT, TARGET)
    torch.testing.assert_close(path[:, 2], torch.full((2,), clean), rtol=1e-4, atol=0)
    every_neuron = [(0, i) for i in range(d_ff(model))]
    zeroed = A.suppressed_probability(model, tok, PROMPT, TARGET, every_neuron)
    assert abs(path[0, 0].item() - zeroed) < 1e-4 * clean
    assert A.suppressed_probability(model, tok, PROMPT, TARGET, []) == pytest.approx(clean, rel=1e-5)


def test_batch_of_facts_layers_subset_and_chunks():
    model, tok = tiny_lm("gptj")
    prompts = [PROMPT, "Osaka is a major city of", "Peru's capital is"]
    targets = [" Asia", " Japan", " Lima"]
    batch = A.integrated_gradients(model, tok, prompts, targets, steps=3)
    assert batch.shape == (3, 2, d_ff(model))
    for i in range(3):
        single = A.integrated_gradients(model, tok, prompts[i], targets[i], steps=3, batch_size=4)
        torch.testing.assert_close(batch[i], single, rtol=1e-4, atol=1e-9)
    flipped = A.integrated_gradients(model, tok, prompts[1], targets[1], steps=3, layers=[1, 0])
    torch.testing.assert_close(flipped, batch[1].flip(0), rtol=1e-4, atol=1e-9)


def test_baselines_and_top_neurons():
    model, tok = tiny_lm("llama")
    acts = A.key_activations(model, tok, PROMPT)
    ids = encode(tok, [PROMPT]).input_ids
    recorded = record(model, [("key", 0), ("key", 1)], input_ids=ids)
    torch.testing.assert_close(acts, torch.stack([recorded[("key", l)][0, -1] for l in (0, 1)]))
    scores = torch.tensor([[0.0, 5.0, -9.0], [3.0, 1.0, 4.0]])
    assert A.top_neurons(scores, 3) == [(0, 1), (1, 2), (1, 0)]


def test_clear_errors():
    model, tok = tiny_lm("gpt2")
    with pytest.raises(IndexError, match="position"):
        A.integrated_gradients(model, tok, PROMPT, TARGET, position=50)
    with pytest.raises(ValueError, match="target_tokens"):
        A.integrated_gradients(model, tok, PROMPT, TARGET, target_tokens="last")
    with pytest.raises(ValueError, match="engine"):
        A.integrated_gradients(model, tok, PROMPT, TARGET, engine="fast")
    with pytest.raises(ValueError, match="non-empty"):
        A.integrated_gradients(model, tok, PROMPT, "  ")
    with pytest.raises(ValueError, match="2 prompts but 3 targets"):
        A.integrated_gradients(model, tok, [PROMPT, PROMPT], ["a", "b", "c"])
    assert count_hooks(model) == 0


def test_grow_falls_back_to_flat_with_a_warning(monkeypatch):
    model, tok = tiny_lm("gpt2")
    want = A.integrated_gradients(model, tok, PROMPT, TARGET, steps=2, engine="flat")

    def broken(*args, **kwargs):
        raise RuntimeError("the mask does not broadcast")
    from kn_tutorial import attribution_engine  # the fallback lives in the engine

    monkeypatch.setattr(attribution_engine, "is_plain_gpt2", lambda model: False)  # the module path
    monkeypatch.setattr(attribution_engine, "_run_rows_grow", broken)
    monkeypatch.setattr(attribution_engine, "_GROW_FAILED", set())
    with pytest.warns(UserWarning, match="engine='flat'"):
        got = A.integrated_gradients(model, tok, PROMPT, TARGET, steps=2)
    torch.testing.assert_close(got, want)


def test_ladder_shares_gradients_but_not_results():
    model, tok = tiny_lm("gpt2")
    ladder = A.integrated_gradients_ladder(model, tok, PROMPT, TARGET, steps=(1, 2, 4), layers=[1])
    assert set(ladder) == {(rule, m) for rule in A.RULES for m in (1, 2, 4)}
    for (rule, m), attr in ladder.items():
        alone = A.integrated_gradients(model, tok, PROMPT, TARGET, steps=m, rule=rule, layers=[1])
        torch.testing.assert_close(attr, alone, rtol=1e-4, atol=1e-6 * alone.abs().max().item())


def test_batched_suppression_equals_one_set_at_a_time():
    model, tok = tiny_lm("gpt_neox")
    sets = [[], [(0, 3)], [(0, 3), (1, 7), (1, 100)], [(1, i) for i in range(50)]]
    batched = A.suppressed_probabilities(model, tok, PROMPT, TARGET, sets)
    single = torch.tensor([A.suppressed_probability(model, tok, PROMPT, TARGET, s) for s in sets])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=0)
    assert count_hooks(model) == 0


def test_explorer_draws_the_per_layer_summary_and_the_top_neurons():
    """Chapter 3's explorer draws what the chapter draws (plots.plot_attribution_summary), not the
    unreadable L x d_ff heatmap: bars per layer on the left, the top-k neurons of the fact's
    integrated gradients on the right, recomputed when another fact is picked."""
    pytest.importorskip("ipywidgets")
    import matplotlib.pyplot as plt

    model, tokenizer = tiny_lm("gpt2")
    facts = [("Kuwait lies on the continent of", " Asia"), ("Peru lies on the continent of", " America")]
    plt.close("all")
    box = A.attribution_explorer(model, tokenizer, facts, steps=1, k=5)  # steps: one of the menu's values
    for i, (prompt, target) in enumerate(facts):
        if i:
            box.children[0].children[0].value = i  # picking another fact draws it
        figure = plt.figure(plt.get_fignums()[-1])
        per_layer, top = figure.axes
        attr = A.integrated_gradients(model, tokenizer, prompt, target, steps=1)
        assert per_layer.get_title() == "per layer" and len(per_layer.patches) == 2 * n_layers(model)
        assert [t.get_text() for t in top.get_yticklabels()] == [f"L{l}.{n}" for l, n in A.top_neurons(attr, 5)]
        assert prompt in figure._suptitle.get_text()
    plt.close("all")

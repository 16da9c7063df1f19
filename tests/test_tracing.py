"""Causal tracing checked against its definition (Meng et al. 2022): restoring every state gives
P(o), restoring none gives P_*(o), the batched grid equals an independent loop of one forward
pass per (sample, token, layer) written with plain PyTorch hooks, and subject spans are right."""
import pytest
import torch

from kn_tutorial import tracing
from kn_tutorial.hooks import count_hooks
from kn_tutorial.models import embedding_matrix, get_block, get_module, n_layers
from kn_tutorial.scoring import target_ids
from tests.tiny import tiny_lm

PROMPT, SUBJECT = "Kuwait lies on the continent of", "Kuwait"


@pytest.fixture(scope="module", params=["gpt2", "gptj", "gpt_neox", "llama"])
def lm(request):
    return tiny_lm(request.param)


# --------------------------------------------------------------------------------------
# An independent reference: plain forward hooks, noise through inputs_embeds
# --------------------------------------------------------------------------------------

def _module(model, kind, layer):
    return get_block(model, layer) if kind == "hidden" else get_module(model, layer, kind)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_at(position, value_of_layer, layer):
    def hook(module, args, output):
        new = _first(output).clone()
        new[:, position] = value_of_layer(layer)
        return (new, *output[1:]) if isinstance(output, tuple) else new
    return hook


@torch.no_grad()
def _run(model, embeds, target, hooks=()):
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        return torch.softmax(model(inputs_embeds=embeds).logits[0, -1], -1)[target].item()
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _record(model, embeds, kind):
    states, L = {}, n_layers(model)

    def keep(layer):
        def hook(module, args, output):
            states[layer] = _first(output)[0].clone()
        return hook
    _run(model, embeds, 0, [(_module(model, kind, l), keep(l)) for l in range(L)])
    return states  # layer -> [T, d]


def naive_trace(model, ids, span, target, kind, noise, window=1, sever=None):
    """[T, L, S] restored probabilities, one forward pass per (sample, token, layer)."""
    L, T, S = n_layers(model), len(ids), noise.shape[0]
    clean_embeds = embedding_matrix(model)[torch.tensor(ids)][None]
    clean = _record(model, clean_embeds, kind)
    out = torch.zeros(T, L, S)
    for j in range(S):
        embeds = clean_embeds + noise[j][None]
        frozen = _record(model, embeds, sever) if sever else {}
        for t in range(T):
            for l in range(L):
                lo = l - (window // 2 if kind != "hidden" else 0)
                width = window if kind != "hidden" else 1
                hooks = [(_module(model, kind, k), _replace_at(t, lambda k: clean[k][t], k))
                         for k in range(max(0, lo), min(L, lo + width))]
                hooks += [(_module(model, sever, k), _replace_at(t, lambda k: frozen[k][t], k))
                          for k in range(l + 1, L)] if sever else []
                out[t, l, j] = _run(model, embeds, target, hooks)
    return out


def _setup(model, tokenizer, prompt=PROMPT, subject=SUBJECT, samples=2, seed=0):
    ids = tokenizer(prompt)["input_ids"]
    span = tracing._encode(tokenizer, prompt, subject, None)[1]
    scale = tracing.noise_level(model, 3.0)
    noise = tracing.subject_noise(torch.tensor(ids), span, embedding_matrix(model).shape[1], samples, scale, seed)
    return ids, span, noise


# --------------------------------------------------------------------------------------
# Definitions and identities
# --------------------------------------------------------------------------------------

def test_noise_scale_and_placement(lm):
    model, tokenizer = lm
    assert tracing.noise_level(model, 3.0) == pytest.approx(3 * embedding_matrix(model).std().item(), rel=1e-5)
    ids, span, noise = _setup(model, tokenizer, samples=200)
    a, b = span
    assert noise[:, :a].abs().sum() == 0 and noise[:, b:].abs().sum() == 0
    assert noise[:, a:b].std().item() == pytest.approx(tracing.noise_level(model, 3.0), rel=0.05)
    again = tracing.subject_noise(torch.tensor(ids), span, noise.shape[-1], 200, tracing.noise_level(model), 0)
    assert torch.equal(noise, again)  # seeded


def test_restoring_all_or_nothing(lm):
    model, tokenizer = lm
    ids, span, noise = _setup(model, tokenizer, samples=3)
    L, T = n_layers(model), len(ids)
    target = target_ids(tokenizer, "Asia")[0]
    # corrupted run, independently: noise added to the token embeddings through inputs_embeds
    embeds = embedding_matrix(model)[torch.tensor(ids)][None]
    want_corrupted = torch.tensor([_run(model, embeds + noise[j][None], target) for j in range(3)])
    want_clean = _run(model, embeds, target)

    masks = torch.zeros(1 + L, L, T, dtype=torch.bool)  # none, then all hidden states at layer l
    for l in range(L):
        masks[1 + l, l] = True
    got = tracing.restore_states(model, torch.tensor(ids), span, masks, target=target, samples=3)
    assert got["clean"] == pytest.approx(want_clean, abs=1e-6)
    torch.testing.assert_close(got["corrupted"], want_corrupted, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got["probs"][0], want_corrupted, atol=1e-6, rtol=1e-5)  # nothing restored
    torch.testing.assert_close(got["probs"][1:], torch.full((L, 3), want_clean), atol=1e-6, rtol=1e-5)
    everything = tracing.restore_states(model, torch.tensor(ids), span, torch.ones(L, T, dtype=torch.bool),
                                        target=target, samples=3)
    torch.testing.assert_close(everything["probs"][0], torch.full((3,), want_clean), atol=1e-6, rtol=1e-5)
    for kind in ("mlp", "attn"):
        none = tracing.restore_states(model, torch.tensor(ids), span, torch.zeros(L, T, dtype=torch.bool),
                                      target=target, kind=kind, samples=3)
        torch.testing.assert_close(none["probs"][0], want_corrupted, atol=1e-6, rtol=1e-5)

    # the grid: before the subject P_*, at the last token of the last layer P, and IE = P_r - P_*
    t = tracing.trace(model, tokenizer, "In short, " + PROMPT, SUBJECT, "Asia", samples=3)
    a = t.span[0]
    assert a > 0
    torch.testing.assert_close(t.scores[:a], torch.full((a, L), t.corrupted_prob))
    assert t.scores[-1, -1].item() == pytest.approx(t.clean_prob, abs=1e-6)
    torch.testing.assert_close(t.effects, t.scores - t.corrupted_prob)
    assert t.normalised[-1, -1].item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("kind,window,sever", [("hidden", 1, None), ("mlp", 1, None), ("attn", 1, None),
                                                ("mlp", 2, None), ("hidden", 1, "mlp"), ("hidden", 1, "attn")])
def test_batched_equals_naive_loop(lm, kind, window, sever):
    model, tokenizer = lm
    ids, span, noise = _setup(model, tokenizer, samples=2)
    target = target_ids(tokenizer, "Asia")[0]
    want = naive_trace(model, ids, span, target, kind, noise, window, sever)
    t = tracing.trace(model, tokenizer, PROMPT, SUBJECT, "Asia", kind=kind, samples=2, window=window,
                      sever=sever, batch_size=7)  # odd chunks on purpose
    torch.testing.assert_close(t.by_sample, want, atol=1e-6, rtol=1e-4)


def test_batch_of_prompts_equals_one_by_one(lm):
    model, tokenizer = lm
    from kn_tutorial.atlas.world import load_world
    n = len(tokenizer(SUBJECT)["input_ids"])
    same = [s for s in load_world().subjects if len(tokenizer(s)["input_ids"]) == n][:2]
    prompts = [(PROMPT, SUBJECT, "Asia"), (PROMPT.replace(SUBJECT, same[0]), same[0], None),
               (PROMPT.replace(SUBJECT, same[1]), same[1], "Europe")]
    encoded = [tracing._encode(tokenizer, p, s, None) for p, s, _ in prompts]
    assert len({len(ids) for ids, _ in encoded}) == 1, "test prompts must have one length"
    targets = [tracing._target_id(tokenizer, t) for _, _, t in prompts]
    grid = tracing.trace_batch(model, torch.tensor([ids for ids, _ in encoded]), [s for _, s in encoded],
                               targets, kind="mlp", samples=2, window=2, batch_size=5)
    for i, (p, s, t) in enumerate(prompts):
        single = tracing.trace(model, tokenizer, p, s, t, kind="mlp", samples=2, window=2)
        torch.testing.assert_close(grid.scores[i], single.scores, atol=1e-6, rtol=1e-5)
        assert grid.clean[i].item() == pytest.approx(single.clean_prob, abs=1e-6)
        assert int(grid.targets[i]) == single.target_id


def test_average_effects_by_role(lm):
    model, tokenizer = lm
    facts = [("Kuwait lies on the continent of", "Kuwait", "Asia"), ("Abu Dhabi is a major city of", "Abu Dhabi", None),
             {"prompt": "In 2020, Peru lies on the continent of", "subject": "Peru", "target": "South America"}]
    summary = tracing.average_effects(model, tokenizer, facts, samples=2, window=2)
    L = n_layers(model)
    # independently: trace each fact, average each role's positions, then over facts
    for kind in tracing.KINDS:
        want = torch.zeros(len(tracing.ROLES), L)
        counts = torch.zeros(len(tracing.ROLES))
        for fact in facts:
            p, s, t = fact if isinstance(fact, tuple) else (fact["prompt"], fact["subject"], fact["target"])
            tr = tracing.trace(model, tokenizer, p, s, t, kind=kind, samples=2, window=2)
            for r, positions in enumerate(tracing.token_roles(tr.span, len(tr.tokens))):
                if positions:
                    want[r] += tr.effects[positions].mean(0)
                    counts[r] += 1
        torch.testing.assert_close(torch.tensor(summary["effects"][kind], dtype=torch.float32),
                                   want / counts.clamp(min=1)[:, None], atol=1e-6, rtol=1e-5)
    # restoring the last token's last hidden state gives everything back: AIE = ATE there
    assert summary["effects"]["hidden"][-1, -1] == pytest.approx(summary["ate"], abs=1e-6)
    severed = tracing.severed_effects(model, tokenizer, facts, samples=2)
    assert severed["none"] == pytest.approx(summary["effects"]["hidden"][2], abs=1e-6)  # last subject token
    assert severed["mlp"][-1] == pytest.approx(severed["none"][-1], abs=1e-6)  # no later MLPs to freeze


# --------------------------------------------------------------------------------------
# Token roles, windows, subject spans and errors
# --------------------------------------------------------------------------------------

def test_token_roles_and_windows():
    assert tracing.token_roles((2, 5), 9) == [[2], [3], [4], [5], [6, 7], [8]]
    assert tracing.token_roles((0, 1), 4) == [[0], [], [0], [1], [2], [3]]
    assert tracing.token_roles((1, 3), 4) == [[1], [], [2], [3], [], [3]]
    assert list(tracing.window_layers(4, 3, 8)) == [3, 4, 5]
    assert list(tracing.window_layers(0, 3, 8)) == [0, 1]
    assert list(tracing.window_layers(7, 3, 8)) == [6, 7]
    assert list(tracing.window_layers(17, 10, 48)) == list(range(12, 22))  # the paper's l-5 .. l+4
    with pytest.raises(ValueError, match="window"):
        tracing.window_layers(0, 0, 8)


def _subject_of_length(tokenizer, n, leading):
    """A subject that takes n tokens after `leading` (none: at the start), found by search."""
    from kn_tutorial.atlas.world import load_world
    pool = ["is", "a", "Bern", "Aden", "Accra", "Abu Dhabi", "Addis Ababa"] + load_world().subjects
    for subject in pool:
        piece = (" " + subject) if leading else subject
        prompt = f"{leading} {subject} lies on the continent of".strip()
        if len(tokenizer(piece)["input_ids"]) == n and prompt.count(subject) == 1:
            return subject, prompt
    raise AssertionError(f"no {n}-token subject in the pool")


@pytest.mark.parametrize("leading", ["", "We know that"])
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_subject_span(lm, leading, n):
    model, tokenizer = lm
    subject, prompt = _subject_of_length(tokenizer, n, leading)
    # independent: byte-level BPE splits at spaces, so the prompt's tokens are those of its pieces
    start = len(tokenizer(leading)["input_ids"]) if leading else 0
    t = tracing.trace(model, tokenizer, prompt, subject, samples=1)
    assert t.span == (start, start + n)
    assert "".join(t.tokens[start:start + n]).strip() == subject


def test_clear_errors(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="does not occur"):
        tracing.trace(model, tokenizer, PROMPT, "Peru", samples=1)
    twice = "Kuwait is near Kuwait"
    with pytest.raises(ValueError, match="occurs 2 times"):
        tracing.trace(model, tokenizer, twice, "Kuwait", samples=1)
    last = tracing.trace(model, tokenizer, twice, "Kuwait", samples=1, occurrence=-1)
    assert last.span[0] > 0 and "".join(last.tokens[last.span[0]:last.span[1]]).strip() == "Kuwait"
    with pytest.raises(ValueError, match="unknown kind"):
        tracing.trace(model, tokenizer, PROMPT, SUBJECT, kind="neurons", samples=1)
    with pytest.raises(ValueError, match="kind='hidden'"):
        tracing.trace(model, tokenizer, PROMPT, SUBJECT, kind="mlp", sever="attn", samples=1)
    with pytest.raises(ValueError, match="non-empty"):
        tracing.trace(model, tokenizer, PROMPT, SUBJECT, target=" ", samples=1)


def test_explorer_builds_headless():
    pytest.importorskip("ipywidgets")
    import matplotlib
    matplotlib.use("Agg")
    model, tokenizer = tiny_lm("gpt2")
    box = tracing.trace_explorer(model, tokenizer, [(PROMPT, SUBJECT, "Asia"), ("Peru lies on the continent of", "Peru", None)],
                                 samples=1)
    box.children[0].value = 1  # picking a fact fills the text boxes
    assert box.children[1].children[1].value == "Peru"


def test_no_hooks_left_and_summary_table(lm):
    model, tokenizer = lm
    tracing.trace(model, tokenizer, PROMPT, SUBJECT, kind="hidden", sever="mlp", samples=1)
    assert count_hooks(model) == 0
    with pytest.raises(ValueError):
        tracing.trace(model, tokenizer, PROMPT, "Peru", samples=1)
    assert count_hooks(model) == 0
    from kn_tutorial.atlas_build.trace_check import format_trace_summary
    summary = tracing.average_effects(model, tokenizer, [(PROMPT, SUBJECT, "Asia")], samples=1)
    table = format_trace_summary(summary)
    assert table.count("last subject token") == 3 and "AIE of restoring mlp" in table


@pytest.mark.parametrize("kind,window,sever", [("hidden", 1, None), ("mlp", 3, None), ("attn", 1, None),
                                                ("hidden", 1, "mlp")])
def test_trace_equals_the_package_naive_trace_on_atlas(kind, window, sever):
    """On the shipped Atlas model: every cell of trace() (the shortcuts included: cells before the
    subject, last-layer cells) equals one full forward pass per restoration (trace_naive)."""
    from kn_tutorial.models import load_model
    model, tokenizer = load_model("atlas")
    prompt, subject = "The capital of Kuwait is", "Kuwait"
    fast = tracing.trace(model, tokenizer, prompt, subject, kind=kind, samples=2, window=window, sever=sever)
    naive = tracing.trace_naive(model, tokenizer, prompt, subject, kind=kind, samples=2, window=window, sever=sever)
    assert fast.span[0] > 0  # some tokens before the subject
    torch.testing.assert_close(fast.by_sample, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_name", ["tiny", "atlas"])
def test_written_out_gpt2_and_module_path_agree(model_name, monkeypatch):
    """On a plain GPT-2 the restored rows run written out (gpt2_written.rows_from_blocks; an
    attention restoration folded into its block's MLP, so the row starts one block later);
    with a hook on the model, or forced off, they run through the modules. Both give the same
    cells, for the grid of every kind and for restore_states masks restoring several tokens
    and layers at once (the fold then covers several tokens)."""
    from kn_tutorial import gpt2_written, tracing_engine
    if model_name == "atlas":
        from kn_tutorial.models import load_model
        model, tokenizer = load_model("atlas")
    else:
        model, tokenizer = tiny_lm("gpt2")
    assert gpt2_written.is_plain_gpt2(model)
    ids, span = tracing._encode(tokenizer, "In short, " + PROMPT, SUBJECT, None)
    L, T = n_layers(model), len(ids)
    masks = torch.zeros(3, L, T, dtype=torch.bool)
    masks[0, 1, span[0]:span[1]] = True                 # every subject token at one layer
    masks[1, 0:2, span[1] - 1] = True                    # one token at two layers
    masks[2, 1, [span[0], T - 1]] = True                 # the first subject token and the last token
    masks[2, L - 1, T - 1] = True

    def run():
        calls.clear()
        out = {kind: tracing.trace(model, tokenizer, "In short, " + PROMPT, SUBJECT, "Asia", kind=kind,
                                   samples=2, window=3 if kind == "attn" else 1).by_sample for kind in tracing.KINDS}
        out.update({f"restore {kind}": restore(kind) for kind in tracing.KINDS})
        return out

    def restore(kind):
        return tracing.restore_states(model, torch.tensor(ids), span, masks, kind=kind, samples=2, batch_size=4)["probs"]

    calls, rows_from_blocks = [], gpt2_written.rows_from_blocks
    monkeypatch.setattr(gpt2_written, "rows_from_blocks", lambda *a, **k: calls.append(1) or rows_from_blocks(*a, **k))
    written = run()
    assert calls, "the written-out path did not run on a plain GPT-2"
    with monkeypatch.context() as m:
        m.setattr(tracing_engine, "is_plain_gpt2", lambda model: False)
        module = run()
    assert not calls
    handle = get_block(model, 0).register_forward_hook(lambda *args: None)
    try:
        assert not gpt2_written.is_plain_gpt2(model)
        hooked = run()  # a hook would be bypassed by the written-out path: the modules run
        assert not calls
    finally:
        handle.remove()
    for key in written:
        torch.testing.assert_close(written[key], module[key], rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(hooked[key], module[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("kind,window,sever", [("hidden", 1, None), ("mlp", 3, None), ("attn", 1, None),
                                                ("hidden", 1, "attn")])
def test_trace_equals_the_naive_trace_in_float64(kind, window, sever):
    """With the model in float64 every shortcut of the engine (caches, first blocks, the last
    block on the last token, GPT-2 written out) agrees with the literal definition to 1e-9: the
    agreement in float32 is float rounding, not an approximation."""
    from kn_tutorial.models import load_model
    model, tokenizer = load_model("atlas")
    model = model.double()
    prompt, subject = "The capital of Kuwait is", "Kuwait"
    fast = tracing.trace(model, tokenizer, prompt, subject, kind=kind, samples=2, window=window, sever=sever)
    naive = tracing.trace_naive(model, tokenizer, prompt, subject, kind=kind, samples=2, window=window, sever=sever)
    assert fast.by_sample.dtype == naive.dtype == torch.float64
    torch.testing.assert_close(fast.by_sample, naive, rtol=1e-9, atol=1e-12)

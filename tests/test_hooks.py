"""Tests for kn_tutorial.hooks: sites, recording, patching, neuron edits, hook cleanup."""

import contextlib

import pytest
import torch

from kn_tutorial.hooks import (
    SITES, Recorder, count_hooks, patch, record, remove_hooks, set_neurons, site_module,
)
from kn_tutorial.models import d_ff, final_norm, mlp_out_weight, n_layers, value_bias


def _hook_state(model):
    """Ids of every forward (pre-)hook on every module, ours and transformers' alike."""
    return {
        name: (tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        for name, m in model.named_modules()
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def warm(model, input_ids):
    """The model after one forward with output_hidden_states (transformers installs its
    own output-capturing hooks lazily on the first forward), and its hook state then."""
    with torch.no_grad():
        model(input_ids, output_hidden_states=True)
    return model, _hook_state(model)


def test_site_shapes(model, family, input_ids):
    sites = [(site, layer) for site in SITES for layer in range(n_layers(model))]
    acts = record(model, sites, input_ids=input_ids)
    for (site, layer), act in acts.items():
        width = d_ff(model) if site == "key" else 32
        assert act.shape == (2, 5, width), (site, layer)
        assert not act.requires_grad


def test_hidden_matches_output_hidden_states(model, input_ids):
    L = n_layers(model)
    sites = [(s, l) for s in ("resid_pre", "hidden") for l in range(L)]
    acts = record(model, sites, input_ids=input_ids)
    with torch.no_grad():
        hs = model(input_ids, output_hidden_states=True).hidden_states  # L + 1 entries
        assert len(hs) == L + 1
        torch.testing.assert_close(acts[("resid_pre", 0)], hs[0])
        for layer in range(L - 1):
            torch.testing.assert_close(acts[("hidden", layer)], hs[layer + 1])
            torch.testing.assert_close(acts[("resid_pre", layer + 1)], acts[("hidden", layer)])
        # the last entry has the final norm applied (all four families in transformers 5.24)
        assert not torch.allclose(acts[("hidden", L - 1)], hs[L])
        torch.testing.assert_close(final_norm(model)(acts[("hidden", L - 1)]), hs[L])


def test_residual_decomposition(model, input_ids):
    """hidden = resid_pre + attn_out + mlp_out, sequential (GPT-2, Llama) or parallel (GPT-J, NeoX)."""
    sites = [(s, 1) for s in ("resid_pre", "attn_out", "mlp_out", "hidden")]
    a = record(model, sites, input_ids=input_ids)
    torch.testing.assert_close(
        a[("resid_pre", 1)] + a[("attn_out", 1)] + a[("mlp_out", 1)], a[("hidden", 1)]
    )


def test_recorder_keeps_graph_when_asked(model, input_ids):
    with Recorder(model, [("key", 0)], detach=False) as rec:
        logits = model(input_ids).logits
    key = rec[("key", 0)]
    assert key.requires_grad
    (grad,) = torch.autograd.grad(logits[:, -1].sum(), key)
    assert grad.shape == key.shape and grad.abs().sum() > 0


def test_single_site_and_negative_layer(model, input_ids):
    acts = record(model, ("hidden", -1), input_ids=input_ids)
    assert list(acts) == [("hidden", -1)]


def test_bad_sites_fail_before_running(model):
    with pytest.raises(ValueError, match="unknown site 'keys'"):
        Recorder(model, [("keys", 0)])
    with pytest.raises(IndexError, match="layer 7 is out of range"):
        record(model, [("key", 7)], input_ids=torch.zeros(1, 2, dtype=torch.long))
    assert count_hooks(model) == 0


@pytest.mark.parametrize("site", SITES)
def test_patch_changes_output_and_cleans_up(warm, input_ids, site):
    model, hooks_before = warm
    clean = _logits(model, input_ids)
    with patch(model, site, 0, lambda t: t * 0.0):
        assert count_hooks(model) == 1
        patched = _logits(model, input_ids)
    assert not torch.allclose(patched, clean)
    assert count_hooks(model) == 0
    assert _hook_state(model) == hooks_before
    torch.testing.assert_close(_logits(model, input_ids), clean, rtol=0, atol=0)


@pytest.mark.parametrize("site", ["key", "hidden", "attn_out"])
def test_hooks_removed_after_exception(warm, input_ids, site):
    model, hooks_before = warm
    clean = _logits(model, input_ids)
    with pytest.raises(KeyError):
        with patch(model, site, 1, torch.zeros_like), Recorder(model, [(site, 0)]):
            model(input_ids)
            raise KeyError("boom")
    assert count_hooks(model) == 0 and _hook_state(model) == hooks_before
    torch.testing.assert_close(_logits(model, input_ids), clean, rtol=0, atol=0)


def test_patch_resid_pre_transplants_the_residual_stream(model, input_ids):
    """Everything after block 1 reads only its input, so transplanting it transplants the output."""
    other = (input_ids + 7) % 128
    donor = record(model, [("hidden", 0)], input_ids=other)[("hidden", 0)]
    with patch(model, "resid_pre", 1, lambda t: donor):
        patched = _logits(model, input_ids)
    torch.testing.assert_close(patched, _logits(model, other))


def test_stacked_patches_apply_in_order_and_show_in_hidden_states(model, input_ids):
    clean = record(model, [("hidden", 0)], input_ids=input_ids)[("hidden", 0)]
    with patch(model, "hidden", 0, lambda t: t + 1.0), patch(model, "hidden", 0, lambda t: t * 2.0):
        with Recorder(model, [("hidden", 0)]) as rec, torch.no_grad():
            hs = model(input_ids, output_hidden_states=True).hidden_states
    expected = (clean + 1.0) * 2.0
    torch.testing.assert_close(rec[("hidden", 0)], expected)
    torch.testing.assert_close(hs[1], expected)  # transformers' capture sees the patched value


def test_exit_stack_of_patches(model, input_ids):
    with contextlib.ExitStack() as stack:
        for layer in range(n_layers(model)):
            stack.enter_context(patch(model, "mlp_out", layer, torch.zeros_like))
        acts = record(model, [("mlp_out", 0), ("mlp_out", 1)], input_ids=input_ids)
        assert count_hooks(model) == 2
    assert all(a.abs().max() == 0 for a in acts.values())
    assert count_hooks(model) == 0


def test_patch_rejects_wrong_shape(model, input_ids):
    with pytest.raises(ValueError, match="must return a tensor of shape"):
        with patch(model, "key", 0, lambda t: t[..., :3]):
            model(input_ids)
    assert count_hooks(model) == 0


def test_patch_attn_out_tuple_output(model, input_ids):
    with patch(model, "attn_out", 1, torch.zeros_like):
        a = record(model, [(s, 1) for s in ("resid_pre", "attn_out", "mlp_out", "hidden")], input_ids=input_ids)
    assert a[("attn_out", 1)].abs().max() == 0
    torch.testing.assert_close(a[("resid_pre", 1)] + a[("mlp_out", 1)], a[("hidden", 1)])


# ---- set_neurons ---------------------------------------------------------------------------

def _mlp_out_from_key(model, layer, key):
    b = value_bias(model, layer)
    out = key @ mlp_out_weight(model, layer).T
    return out if b is None else out + b


def test_set_neurons_zero_matches_hand_computation(model, input_ids):
    layer, neurons = 1, [0, 5, 17]
    key = record(model, [("key", layer)], input_ids=input_ids)[("key", layer)]
    with set_neurons(model, layer, neurons, value=0.0):
        acts = record(model, [("key", layer), ("mlp_out", layer)], input_ids=input_ids)
    hand = key.clone()
    hand[..., neurons] = 0.0
    torch.testing.assert_close(acts[("key", layer)], hand)
    with torch.no_grad():
        torch.testing.assert_close(acts[("mlp_out", layer)], _mlp_out_from_key(model, layer, hand))
    assert count_hooks(model) == 0


def test_set_neurons_scale_at_positions(model, input_ids):
    layer = 0
    key = record(model, [("key", layer)], input_ids=input_ids)[("key", layer)]
    with set_neurons(model, layer, torch.tensor([3, 4]), scale=2.0, positions=[-1, 1]):
        got = record(model, [("key", layer)], input_ids=input_ids)[("key", layer)]
    hand = key.clone()
    hand[:, [1, 4], 3:5] *= 2.0
    torch.testing.assert_close(got, hand)


def test_set_neurons_per_neuron_values(model, input_ids):
    with set_neurons(model, 0, [1, 2], value=torch.tensor([5.0, -3.0]), positions=0):
        key = record(model, [("key", 0)], input_ids=input_ids)[("key", 0)]
    assert torch.equal(key[:, 0, 1:3], torch.tensor([[5.0, -3.0]] * 2))


def test_set_neurons_errors(model, input_ids):
    with pytest.raises(ValueError, match="exactly one"):
        with set_neurons(model, 0, [1], value=0.0, scale=2.0):
            pass
    with pytest.raises(IndexError, match="neuron"):
        with set_neurons(model, 0, [d_ff(model)], value=0.0):
            model(input_ids)
    with pytest.raises(IndexError, match="layer 5 is out of range"):
        with set_neurons(model, 5, [0], value=0.0):
            pass
    assert count_hooks(model) == 0


def test_remove_hooks_only_removes_ours(warm, input_ids):
    model, hooks_before = warm
    Recorder(model, [("key", 0), ("hidden", 1)]).__enter__()  # never exited
    assert count_hooks(model) == 2
    assert remove_hooks(model) == 2
    assert count_hooks(model) == 0 and _hook_state(model) == hooks_before
    with torch.no_grad():
        model(input_ids, output_hidden_states=True)  # transformers' own hooks still work


def test_site_module_kinds(model):
    assert site_module(model, "key", 0)[1] is True
    assert site_module(model, "hidden", 0)[1] is False


def test_hooks_follow_the_model_dtype(make_tiny_model, input_ids):
    model = make_tiny_model("llama").to(torch.float64)
    with set_neurons(model, 0, [1], scale=3.0), patch(model, "mlp_out", 1, lambda t: t.float()):
        acts = record(model, [("key", 0), ("mlp_out", 1), ("hidden", 1)], input_ids=input_ids)
    assert all(a.dtype == torch.float64 for a in acts.values())


# --------------------------------------------------------------------------------------
# The vocabulary: every hook point (and alias) resolves to a tensor of its stated shape
# --------------------------------------------------------------------------------------

def _widths(config) -> dict[str, int]:
    """d_model and d_ff read from the config alone (independent of kn_tutorial.models)."""
    d_model = getattr(config, "n_embd", None) or config.hidden_size
    inner = getattr(config, "n_inner", None) if config.model_type == "gpt2" else config.intermediate_size
    return {"d_model": d_model, "d_ff": inner or 4 * d_model}


@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_every_hook_point_and_alias_has_its_stated_shape(family):
    from kn_tutorial.hooks import HOOK_POINTS, SITE_ALIASES, canonical_site
    from tests.tiny import tiny_model

    model = tiny_model(family)
    widths = _widths(model.config)
    L = model.config.num_hidden_layers
    ids = torch.randint(1, model.config.vocab_size, (3, 7), generator=torch.Generator().manual_seed(0))
    names = [*HOOK_POINTS, *SITE_ALIASES]
    acts = record(model, [(name, layer) for name in names for layer in range(L)], input_ids=ids)
    assert set(acts) == {(name, layer) for name in names for layer in range(L)}  # keys as given
    for (name, layer), act in acts.items():
        width = widths[HOOK_POINTS[canonical_site(name)].width]
        assert act.shape == (3, 7, width), (family, name, layer)
        assert torch.equal(act, acts[(canonical_site(name), layer)])  # an alias is the same place
    with torch.no_grad():
        states = model(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts[("resid_pre", 0)], states[0])
    for layer in range(L - 1):  # block output of l is the next block's input
        torch.testing.assert_close(acts[("hidden", layer)], states[layer + 1])
        torch.testing.assert_close(acts[("resid_post", layer)], acts[("resid_pre", layer + 1)])
    for layer in range(L):  # all three families add both outputs to the residual: h = x + a + m
        torch.testing.assert_close(acts[("mlp", layer)],
                                   acts[("hidden", layer)] - acts[("resid_pre", layer)] - acts[("attn", layer)],
                                   rtol=1e-4, atol=1e-5)


def test_the_vocabulary_table_is_the_one_in_the_docstring_and_in_tracing():
    import kn_tutorial.hooks as hooks
    from kn_tutorial import tracing

    table = hooks.__doc__.split("also called", 1)[1]
    for name, point in hooks.HOOK_POINTS.items():
        width = {"d_model": "[batch, pos, d_model]", "d_ff": "[batch, pos, d_ff]"}[point.width]
        row = next(line for line in table.splitlines() if line.split()[:1] == [name])
        assert width in row, name
    for alias, name in hooks.SITE_ALIASES.items():
        assert f'"{alias}"' in hooks.__doc__ and hooks.canonical_site(alias) == name
    for kind in tracing.KINDS:  # the row that names a tracing kind is where tracing restores it
        row = hooks.HOOK_POINTS[tracing.SITE_OF_KIND[kind]]
        assert f'tracing kind "{kind}"' in row.also_called, kind
    with pytest.raises(ValueError, match="unknown site 'resid_mid'.*alias"):
        hooks.canonical_site("resid_mid")


def test_describe_hook_points_fills_in_the_model_sizes(model, input_ids):
    from kn_tutorial.hooks import HOOK_POINTS, SITE_ALIASES, describe_hook_points

    rows = describe_hook_points(model)
    assert [row.name for row in rows] == list(HOOK_POINTS)
    acts = record(model, [(row.name, 0) for row in rows], input_ids=input_ids)
    for row in rows:  # the stated width is the width the hook point records
        width = acts[(row.name, 0)].shape[-1]
        assert row.shape == f"[batch, pos, {HOOK_POINTS[row.name].width}={width}]", row
        assert row.location == HOOK_POINTS[row.name].location
        assert set(row.aliases) == {a for a, name in SITE_ALIASES.items() if name == row.name}
    assert {alias for row in rows for alias in row.aliases} == set(SITE_ALIASES)


def test_the_notation_page_lists_every_hook_point_as_hooks_defines_it():
    from pathlib import Path

    from kn_tutorial.hooks import HOOK_POINTS, SITE_ALIASES

    page = (Path(__file__).resolve().parents[1] / "book" / "notation.md").read_text(encoding="utf-8")
    table = page.split("## Hook points", 1)[1].split("\n## ", 1)[0]
    rows = {cells[0].strip("` "): cells for line in table.splitlines() if line.startswith("| `")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    assert list(rows) == list(HOOK_POINTS)
    for name, (_, location, _symbol, shape, aliases) in rows.items():
        assert HOOK_POINTS[name].location.startswith(location), name
        assert shape.endswith(HOOK_POINTS[name].width.replace("d_", r"d_\text{") + "}]$"), name
        assert set(aliases.replace('"', "").replace("`", "").split()) == {
            a for a, target in SITE_ALIASES.items() if target == name}, name

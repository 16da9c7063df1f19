"""Fault injection (issue 17, item 6): every public editing or attribution entry point, given bad
input or a broken model, raises a named error and leaves every weight bit for bit as it was.

One table per entry point: (case id, how to break things, the call, the error class, a phrase the
message must contain). Each row runs on a fresh tiny model (tests/tiny.py: tiny_lm, 2 GPT-2
blocks, 64 positions); the weights are compared with torch.equal after the call.
"""
import math

import pytest
import torch

from kn_tutorial import memit, rome, stats
from kn_tutorial.attribution import integrated_gradients
from kn_tutorial.finetune import FTHparams, fine_tune
from kn_tutorial.neurons import NoKnowledgeNeuronsError, kn_edit, scale_value_slots, scaled_scores, zero_key_rows
from kn_tutorial.tracing import noise_level, trace
from kn_tutorial.validate import ContextLengthError, NonFiniteEditError
from tests.tiny import tiny_lm, tiny_tokenizer

REQUEST = {"prompt": "{} lies on the continent of", "subject": "Kuwait", "target_new": {"str": "Europe"}}
LONG = {**REQUEST, "prompt": "{} lies on the continent of" + " Asia and" * 40}  # > 64 positions
TEXTS = ["Osaka lies in Japan.", "Kuwait's capital is Kuwait City.", "Lima is in Peru."] * 20
LATER = "transformer.h.1.mlp.c_proj.weight"  # a weight after the edited layer 0
_MOM2 = {}


def _mom2(model, tokenizer, layer=0):
    if layer not in _MOM2:  # tiny_lm is seeded: every fresh model has the same C
        _MOM2[layer] = stats.compute_second_moment(model, tokenizer, layer, TEXTS)[0]
    return _MOM2[layer]


def _nan_at(name):
    def inject(model, monkeypatch):
        with torch.no_grad():
            model.get_parameter(name).view(-1)[3] = float("nan")
    return inject


def _rome_hp(**kw):
    return rome.RomeHparams(**{"layer": 0, "v_steps": 3, "prefixes": ((3, 2),), "ridge": 1e-3, **kw})


def _memit_hp(**kw):
    return memit.MemitHparams(**{"layers": (0,), "v_steps": 3, "prefixes": (), "mom2_update_weight": 1.0, **kw})


def _nan_v_star(model, monkeypatch):
    real = rome.compute_v_star

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out.delta[0] = float("nan")
        return out
    monkeypatch.setattr(rome, "compute_v_star", broken)


def _nan_targets(model, monkeypatch):
    real = memit.compute_targets

    def broken(*args, **kwargs):
        out = real(*args, **kwargs)
        out.z[0, 0] = float("inf")
        return out
    monkeypatch.setattr(memit, "compute_targets", broken)


def _nan_weight_unchecked(model, monkeypatch):
    """A NaN weight that the up-front scan does not see: the guards inside the method must catch it."""
    _nan_at(LATER)(model, monkeypatch)
    monkeypatch.setattr(memit, "check_model_finite", lambda model, method: None)
    monkeypatch.setattr(rome, "check_model_finite", lambda model, method: None)


def _run(case, monkeypatch):
    """Build a fresh model, inject the fault, call; check the error and that no weight moved."""
    _, fault, call, error, message = case
    model, tokenizer = tiny_lm("gpt2")
    mom2 = _mom2(model, tokenizer)
    if fault is not None:  # fault(model, monkeypatch): breaks the model or the method
        fault(model, monkeypatch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(error, match=message):
        call(model, tokenizer, mom2)
    for name, p in model.named_parameters():  # NaN == NaN bitwise: compare the bytes, not the values
        assert torch.equal(p.detach().view(torch.int32), before[name].view(torch.int32)), name


def _ids(table):
    return [row[0] for row in table]


ROME = [
    ("nan weight, up-front scan skipped", _nan_weight_unchecked,
     lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(), mom2=c, prefixes=[""]), NonFiniteEditError,
     f"ΔW is not finite .the model has a non-finite weight in {LATER}"),
    ("nan weight after the layer", _nan_at(LATER), lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(), mom2=c,
                                                                             prefixes=[""]),
     NonFiniteEditError, f"non-finite weight in {LATER}"),
    ("nan statistics", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(), mom2=torch.full_like(c, math.nan)),
     NonFiniteEditError, "non-finite values in C"),
    ("nan v* (optimisation diverged)", _nan_v_star, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(), mom2=c),
     NonFiniteEditError, "ΔW is not finite"),
    ("last layer", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(layer=1), mom2=c), ValueError, "last block"),
    ("layer -1 is the last layer", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(layer=-1), mom2=c),
     ValueError, "last block"),
    ("clamp 0", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(clamp_norm_factor=0), mom2=c),
     ValueError, "clamp_norm_factor must be > 0"),
    ("clamp -1", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(clamp_norm_factor=-1), mom2=c),
     ValueError, "clamp_norm_factor must be > 0"),
    ("zero steps", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(v_steps=0), mom2=c),
     ValueError, "v_steps must be a positive integer"),
    ("nan learning rate", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(v_lr=math.nan), mom2=c),
     ValueError, "v_lr must be a finite number"),
    ("no KL prompts", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(kl_prompts=()), mom2=c),
     ValueError, "kl_prompts is empty"),
    ("KL prompt without {}", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(kl_prompts=("Kuwait is",)),
                                                             mom2=c), ValueError, "template with"),
    ("empty prefixes", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(), mom2=c, prefixes=[]),
     ValueError, "prefixes is empty"),
    ("prompt longer than the context", None, lambda m, t, c: rome.edit(m, t, LONG, _rome_hp(), mom2=c),
     ContextLengthError, "context of 64 positions .config.n_positions"),
    ("subject not in the prompt", None,
     lambda m, t, c: rome.edit(m, t, {**REQUEST, "prompt": "Osaka lies in"}, _rome_hp(), mom2=c),
     ValueError, "not in the prompt"),
    ("unknown KL direction", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(kl_direction="after"), mom2=c),
     ValueError, "kl_direction must be one of"),
    ("decay power 3", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(decay_power=3), mom2=c),
     ValueError, "decay_power must be 1 or 2"),
    ("unknown stopping rule", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(stop_on="kl"), mom2=c),
     ValueError, "stop_on must be one of"),
    ("nan stopping threshold", None, lambda m, t, c: rome.edit(m, t, REQUEST, _rome_hp(stop_threshold=math.nan), mom2=c),
     ValueError, "stop_threshold must be a finite number"),
]


@pytest.mark.parametrize("case", ROME, ids=_ids(ROME))
def test_rome_edit(case, monkeypatch):
    _run(case, monkeypatch)


MEMIT = [
    ("nan loss in the target optimisation", _nan_weight_unchecked,
     lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(), mom2={0: c}), NonFiniteEditError,
     f"loss of MEMIT's target optimisation at layer 0 is not finite .the model has a non-finite weight in {LATER}"),
    ("nan weight after the layers", _nan_at(LATER),
     lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(), mom2={0: c}), NonFiniteEditError,
     f"non-finite weight in {LATER}"),
    ("nan statistics", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(),
                                                         mom2={0: torch.full_like(c, math.nan)}),
     NonFiniteEditError, "statistics C of layer 0 are not finite"),
    ("inf target z", _nan_targets, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(), mom2={0: c}),
     NonFiniteEditError, "non-finite values in residuals"),
    ("no layers", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(layers=()), mom2={0: c}),
     ValueError, "at least one layer"),
    ("last layer", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(layers=(0, 1)), mom2={0: c}),
     ValueError, "last block"),
    ("nan lambda", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(mom2_update_weight=math.nan),
                                                     mom2={0: c}), ValueError, "λ must be a finite number"),
    ("negative lambda", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(mom2_update_weight=-1.0),
                                                          mom2={0: c}), ValueError, "λ must be > 0"),
    ("clamp 0", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(clamp_norm_factor=0.0), mom2={0: c}),
     ValueError, "clamp_norm_factor must be > 0"),
    ("zero steps", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(v_steps=0), mom2={0: c}),
     ValueError, "v_steps must be a positive integer"),
    ("zero passes", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(passes=0), mom2={0: c}),
     ValueError, "passes must be at least 1"),
    ("no KL prompts", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(kl_prompts=()), mom2={0: c}),
     ValueError, "kl_prompts is empty"),
    ("no requests", None, lambda m, t, c: memit.edit(m, t, [], _memit_hp(), mom2={0: c}), ValueError, "no requests"),
    ("prompt longer than the context", None, lambda m, t, c: memit.edit(m, t, [LONG], _memit_hp(), mom2={0: c}),
     ContextLengthError, "context of 64 positions"),
    ("unknown KL direction", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(kl_direction="before"),
                                                               mom2={0: c}), ValueError, "kl_direction must be one of"),
    ("decay power 0", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(decay_power=0), mom2={0: c}),
     ValueError, "decay_power must be 1 or 2"),
    ("negative stopping threshold", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(stop_threshold=-1.0),
                                                                      mom2={0: c}), ValueError, "stop_threshold must be >= 0"),
    ("negative stop_nll (deprecated)", None, lambda m, t, c: memit.edit(m, t, [REQUEST], _memit_hp(stop_nll=-1.0),
                                                                         mom2={0: c}), ValueError, "stop_threshold must be >= 0"),
]


@pytest.mark.parametrize("case", MEMIT, ids=_ids(MEMIT))
def test_memit_edit(case, monkeypatch):
    _run(case, monkeypatch)


KN_REQUEST = {**REQUEST, "target_true": {"str": "Asia"}}
NEURONS = [(0, 3), (1, 7)]
KN = [
    ("nan weight", _nan_at(LATER), lambda m, t, c: kn_edit(m, t, KN_REQUEST, neurons=NEURONS),
     NonFiniteEditError, f"non-finite weight in {LATER}"),
    ("nan lambda", None, lambda m, t, c: kn_edit(m, t, KN_REQUEST, neurons=NEURONS, lambda_new=math.nan),
     ValueError, "lambda_new must be a finite number"),
    ("overflowing lambda", None, lambda m, t, c: kn_edit(m, t, KN_REQUEST, neurons=NEURONS, lambda_new=1e300),
     NonFiniteEditError, "KN update .* is not finite"),
    ("subject not in the prompt", None,
     lambda m, t, c: kn_edit(m, t, {**KN_REQUEST, "prompt": "Osaka lies on the continent of"}, neurons=NEURONS),
     ValueError, "not in the prompt"),
    ("empty target", None, lambda m, t, c: kn_edit(m, t, {**KN_REQUEST, "target_new": {"str": " "}}, neurons=NEURONS),
     ValueError, "target_new is empty"),
    ("neuron out of range", None, lambda m, t, c: kn_edit(m, t, KN_REQUEST, neurons=[(0, 10_000)]),
     IndexError, "out of range"),
    ("no neurons", None, lambda m, t, c: kn_edit(m, t, KN_REQUEST, neurons=[]),
     NoKnowledgeNeuronsError, "empty neuron list"),
    ("erase with a nan factor", None, lambda m, t, c: scale_value_slots(m, NEURONS, math.nan),
     ValueError, "factor must be a finite number"),
    ("amplify into overflow", None, lambda m, t, c: scale_value_slots(m, NEURONS, 1e300),
     NonFiniteEditError, "scaled value slots .* not finite"),
    ("zero key rows out of range", None, lambda m, t, c: zero_key_rows(m, [(0, -1)]), IndexError, "out of range"),
    ("suppress with a nan factor", None,
     lambda m, t, c: scaled_scores(m, t, ["Kuwait lies in"], [" Asia"], [NEURONS], math.nan),
     ValueError, "factor must be a finite number"),
    ("one factor short", None,
     lambda m, t, c: scaled_scores(m, t, ["Kuwait lies in"] * 2, [" Asia"] * 2, [NEURONS] * 2, [0.0]),
     ValueError, "2 prompts but 1 factors"),
]


@pytest.mark.parametrize("case", KN, ids=_ids(KN))
def test_kn_edit_and_value_slots(case, monkeypatch):
    _run(case, monkeypatch)


FT = [
    ("nan weight", _nan_at(LATER), lambda m, t, c: fine_tune(m, t, REQUEST, FTHparams(layer=0, steps=3)),
     NonFiniteEditError, f"non-finite weight in {LATER}"),
    ("diverging steps", None, lambda m, t, c: fine_tune(m, t, REQUEST, FTHparams(layer=1, lr=1e30, steps=5, stop_loss=0.0)),
     NonFiniteEditError, "not finite|non-finite"),
    ("zero steps", None, lambda m, t, c: fine_tune(m, t, REQUEST, FTHparams(layer=0, steps=0)),
     ValueError, "steps must be a positive integer"),
    ("negative lr", None, lambda m, t, c: fine_tune(m, t, REQUEST, FTHparams(layer=0, lr=-1e-3)),
     ValueError, "lr must be > 0"),
    ("nan norm constraint", None, lambda m, t, c: fine_tune(m, t, REQUEST, FTHparams(layer=0, norm_constraint=math.nan)),
     ValueError, "norm_constraint must be a finite number"),
    ("prompt longer than the context", None, lambda m, t, c: fine_tune(m, t, LONG, FTHparams(layer=0)),
     ContextLengthError, "context of 64 positions"),
]


@pytest.mark.parametrize("case", FT, ids=_ids(FT))
def test_fine_tune(case, monkeypatch):
    _run(case, monkeypatch)


PROMPT, TARGET = "Kuwait lies on the continent of", " Asia"
IG = [
    ("nan weight", _nan_at(LATER), lambda m, t, c: integrated_gradients(m, t, PROMPT, TARGET, steps=2),
     NonFiniteEditError, f"attributions are not finite .the model has a non-finite weight in {LATER}"),
    ("negative batch size", None, lambda m, t, c: integrated_gradients(m, t, PROMPT, TARGET, steps=2, batch_size=-1),
     ValueError, "batch_size must be a positive integer"),
    ("zero batch size", None, lambda m, t, c: integrated_gradients(m, t, PROMPT, TARGET, steps=2, batch_size=0),
     ValueError, "batch_size must be a positive integer"),
    ("no layers", None, lambda m, t, c: integrated_gradients(m, t, PROMPT, TARGET, steps=2, layers=[]),
     ValueError, "layers is empty"),
    ("zero steps", None, lambda m, t, c: integrated_gradients(m, t, PROMPT, TARGET, steps=0),
     ValueError, "steps must be a positive int"),
    ("prompt longer than the context", None,
     lambda m, t, c: integrated_gradients(m, t, PROMPT + " Asia and" * 40, TARGET, steps=2),
     ContextLengthError, "context of 64 positions"),
]


@pytest.mark.parametrize("case", IG, ids=_ids(IG))
def test_integrated_gradients(case, monkeypatch):
    _run(case, monkeypatch)


def _inf_embedding_row(token):
    def inject(model, monkeypatch):
        with torch.no_grad():
            model.get_input_embeddings().weight[token, 0] = float("inf")
    return inject


def _inf_embedding_row_of_the_prompt(model, monkeypatch):
    token = tiny_tokenizer()(PROMPT, add_special_tokens=False)["input_ids"][0]
    _inf_embedding_row(token)(model, monkeypatch)


TRACING = [
    ("nan weight", _nan_at(LATER), lambda m, t, c: trace(m, t, PROMPT, "Kuwait", samples=2),
     NonFiniteEditError, f"non-finite weight in {LATER}"),
    ("prompt uses a non-finite embedding row", _inf_embedding_row_of_the_prompt,
     lambda m, t, c: trace(m, t, PROMPT, "Kuwait", samples=2), NonFiniteEditError, "embedding row"),
    ("prompt longer than the context", None,
     lambda m, t, c: trace(m, t, PROMPT + " Asia and" * 40, "Kuwait", samples=2), ContextLengthError, "64 positions"),
    ("nan noise", None, lambda m, t, c: trace(m, t, PROMPT, "Kuwait", samples=2, noise=math.nan),
     ValueError, "noise must be a finite number"),
]


@pytest.mark.parametrize("case", TRACING, ids=_ids(TRACING))
def test_tracing(case, monkeypatch):
    _run(case, monkeypatch)


def test_one_bad_embedding_row_does_not_spoil_the_noise_scale():
    model, _ = tiny_lm("gpt2")
    clean = noise_level(model, 3.0)
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[5, 0] = float("inf")
    expected = 3.0 * torch.cat([embeddings[:5], embeddings[6:]]).detach().float().std().item()
    assert math.isfinite(noise_level(model, 3.0))
    assert noise_level(model, 3.0) == pytest.approx(expected, rel=1e-6)
    assert noise_level(model, 3.0) == pytest.approx(clean, rel=0.05)  # one row of ~400 barely moves σ


def _no_cache_files(folder):
    return not list((folder / "stats").glob("*")) if (folder / "stats").exists() else True


STATS = [
    ("nan weight before the keys", _nan_at("transformer.h.0.attn.c_attn.weight"),
     lambda m, t, c: stats.second_moment(m, t, 0, corpus="toy", n_samples=6, texts=lambda n: TEXTS[:n]),
     NonFiniteEditError, "non-finite weight in transformer.h.0.attn.c_attn.weight"),
    ("unknown corpus", None, lambda m, t, c: stats.second_moment(m, t, 0, corpus="nowhere", n_samples=3),
     ValueError, "unknown corpus"),
]


@pytest.mark.parametrize("case", STATS, ids=_ids(STATS))
def test_second_moment(case, monkeypatch, tmp_path):
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path))
    _run(case, monkeypatch)
    assert _no_cache_files(tmp_path)  # nothing was cached


def test_interrupted_statistics_write_leaves_nothing_and_the_next_call_recomputes(monkeypatch, tmp_path):
    monkeypatch.setenv(stats.CACHE_ENV, str(tmp_path))
    model, tokenizer = tiny_lm("gpt2")
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6, texts=lambda n: TEXTS[:n])
    assert list((tmp_path / "stats").iterdir()) == []  # neither a .pt nor a temporary file
    monkeypatch.setattr(torch, "save", real_save)
    calls = []
    compute = stats.compute_second_moment
    monkeypatch.setattr(stats, "compute_second_moment", lambda *a, **k: calls.append(1) or compute(*a, **k))
    mom2 = stats.second_moment(model, tokenizer, 0, corpus="toy", n_samples=6, texts=lambda n: TEXTS[:n])
    assert calls == [1] and torch.isfinite(mom2).all()
    assert [p.suffix for p in (tmp_path / "stats").iterdir()] == [".pt"]


@pytest.mark.parametrize("name", ["", "   "])
def test_load_model_refuses_an_empty_name(name, monkeypatch):
    from kn_tutorial.models import load_model

    with pytest.raises(ValueError, match="load_model needs a model name or folder"):
        load_model(name)
    monkeypatch.setenv("KN_MODEL", name)  # None reads $KN_MODEL
    with pytest.raises(ValueError, match="load_model needs a model name or folder"):
        load_model(None)


def test_apply_rank_one_refuses_an_overflowing_update():
    weight = torch.ones(4, 6, dtype=torch.float16)
    before = weight.clone()
    u, k = torch.ones(6, dtype=torch.float64), torch.ones(6)
    with pytest.raises(NonFiniteEditError, match="ΔW is not finite"):
        rome.apply_rank_one(weight, u, k, torch.full((4,), 1e9))  # 1e9 / 6 overflows float16
    assert torch.equal(weight, before)

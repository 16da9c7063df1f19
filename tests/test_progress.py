"""The package's one switch for progress bars."""

import pytest

from kn_tutorial import progress as P


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("KN_PROGRESS", "TQDM_DISABLE", "CI"):
        monkeypatch.delenv(var, raising=False)
    P.set_progress(None)
    yield
    P.set_progress(None)


@pytest.mark.parametrize(
    "env, enabled",
    [
        ({}, True),
        ({"KN_PROGRESS": "0"}, False),
        ({"KN_PROGRESS": "off"}, False),
        ({"TQDM_DISABLE": "1"}, False),
        ({"TQDM_DISABLE": "0"}, True),
        ({"CI": "true"}, False),
        ({"CI": "false"}, True),
        ({"CI": "true", "KN_PROGRESS": "1"}, True),  # explicit KN_PROGRESS wins
    ],
)
def test_environment(monkeypatch, env, enabled):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert P.progress_enabled() is enabled
    bar = P.progress(range(3))
    assert bar.disable is (not enabled)
    assert list(bar) == [0, 1, 2]  # iterating works whether shown or not


def test_runtime_switch_overrides_environment(monkeypatch):
    monkeypatch.setenv("CI", "true")
    P.set_progress(True)
    assert P.progress_enabled()
    P.set_progress(False)
    monkeypatch.delenv("CI")
    assert not P.progress_enabled()
    assert P.progress(range(2)).disable
    P.set_progress(None)  # back to the environment
    assert P.progress_enabled()


def test_caller_disable_is_honoured():
    P.set_progress(True)
    assert P.progress(range(2), disable=True).disable


def test_progress_bar_manual_updates():
    import io

    P.set_progress(True)
    out = io.StringIO()
    with P.progress_bar(total=5, desc="work", file=out) as bar:
        for _ in range(5):
            bar.update(1)
        assert (bar.total, bar.n) == (5, 5)
    assert "work" in out.getvalue()

    P.set_progress(False)
    out = io.StringIO()
    with P.progress_bar(total=5, desc="work", file=out) as bar:
        bar.update(5)  # a no-op, but allowed
    assert out.getvalue() == ""

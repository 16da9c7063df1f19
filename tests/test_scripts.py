"""The data scripts' own logic that is not a method: merging runs of the MEMIT scaling script, and
its FT-L baseline training only the chosen matrices."""
import json
from pathlib import Path

import pytest

from tests.tiny import load_script


def _run(results, command, **extra):
    return {"model": "atlas", "seed": 0, "n_cases": 20, "eval_cases": 5, "fluency_cases": 2, "device": "cpu",
            "command": command, "seconds": 1.0, "complete": True, "rome_reached": None, "rome_seconds_limit": 0,
            "hparams": {"MEMIT": {}, "ROME": {"layer": 9}}, "neighbours_dropped": {"10": 0.1},
            "results": results, **extra}


def test_merge_takes_missing_methods_and_ablations_only(tmp_path):
    scaling = load_script("memit_scaling")
    memit_row, rome_row = {"n_edits": 10, "ES": 90.0}, {"n_edits": 10, "ES": 50.0}
    a = _run({"MEMIT": [memit_row], "ROME": []}, "a", lambda_sweep={"rows": [1]})
    b = _run({"MEMIT": [{"n_edits": 10, "ES": 0.0}], "ROME": [rome_row]}, "b", rome_reached=10,
             lambda_sweep={"rows": [2]}, layer_ranges={"rows": [3]}, neighbours_dropped={"10": 0.1, "20": 0.5})
    paths = []
    for name, run in (("a.json", a), ("b.json", b)):
        paths.append(str(tmp_path / name))
        Path(paths[-1]).write_text(json.dumps(run))
    out = scaling.merge(paths, str(tmp_path / "out.json"), ["why"])
    assert out["results"]["MEMIT"] == [memit_row]  # the base keeps its own rows
    assert out["results"]["ROME"] == [rome_row] and out["rome_reached"] == 10
    assert out["lambda_sweep"] == {"rows": [1]} and out["layer_ranges"] == {"rows": [3]}
    assert out["neighbours_dropped"] == {"10": 0.1, "20": 0.5}
    assert [m["took"] for m in out["merged_from"]] == ["everything else", "ROME rows, layer_ranges"]
    assert out["notes"] == ["why"] and json.loads((tmp_path / "out.json").read_text()) == out
    Path(paths[1]).write_text(json.dumps({**b, "seed": 1}))
    with pytest.raises(ValueError, match="other settings \\(seed\\)"):
        scaling.merge(paths, str(tmp_path / "out.json"), [])


def test_fine_tune_many_trains_only_its_matrices_and_restores_every_flag():
    """FT-L of the scaling script (weights.frozen): only the chosen MLP output projections change,
    each by at most eps, and every parameter's requires_grad flag is as it was before."""
    import torch

    from kn_tutorial.models import get_module
    from tests.tiny import tiny_lm

    scaling = load_script("memit_scaling")
    model, tokenizer = tiny_lm("gpt2")
    model.transformer.wpe.weight.requires_grad_(False)  # one flag off, so "restored" is not "all on"
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    cases = [{"requested_rewrite": {"prompt": "{} lies on the continent of", "subject": s,
                                    "target_new": {"str": "Europe"}}} for s in ("Kuwait", "Peru")]
    scaling.fine_tune_many(model, tokenizer, cases, layers=[1], lr=1e-2, steps=2, eps=1e-3)
    trained = {name for name, p in model.named_parameters() if p is get_module(model, 1, "mlp_out").weight}
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed == trained
    assert all((p - before[n]).abs().max() <= 1e-3 + 1e-7 for n, p in model.named_parameters() if n in trained)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_run_notebooks_finds_a_reply_that_one_long_poll_would_miss():
    """scripts/run_notebooks.py polls the shell channel in short steps (poll_shell_in_steps): a
    reply whose wake-up a long poll loses (ZeroMQ's edge-triggered readiness, consumed by a send
    on the same socket: nbclient issue #312) is found at the next step, and the caller's timeout
    still holds when nothing comes."""
    import asyncio
    import time
    from queue import Empty
    from types import SimpleNamespace

    runner = load_script("run_notebooks")

    class LostWakeup:
        """A shell channel whose reply arrives at `arrives`; a poll started before that never wakes up."""
        def __init__(self, arrives: float):
            self.arrives, self.polls = arrives, []

        async def get_msg(self, timeout=None):
            self.polls.append(timeout)
            if time.monotonic() >= self.arrives:
                return {"msg_type": "execute_reply"}
            await asyncio.sleep(timeout)  # the wake-up is lost: the poll lasts its whole timeout
            raise Empty

    channel = LostWakeup(time.monotonic() + 0.2)
    with pytest.raises(Empty):  # without the steps: one poll sleeps through the reply
        asyncio.run(channel.get_msg(timeout=0.5))
    client = SimpleNamespace(shell_channel=LostWakeup(time.monotonic() + 0.2))
    runner.poll_shell_in_steps(client, step=0.05)
    started = time.monotonic()
    assert asyncio.run(client.shell_channel.get_msg(timeout=30))["msg_type"] == "execute_reply"
    assert time.monotonic() - started < 5  # not the 30 s of the caller's timeout
    silent = SimpleNamespace(shell_channel=LostWakeup(float("inf")))
    runner.poll_shell_in_steps(silent, step=0.05)
    started = time.monotonic()
    with pytest.raises(Empty):
        asyncio.run(silent.shell_channel.get_msg(timeout=0.3))
    assert 0.25 <= time.monotonic() - started < 5

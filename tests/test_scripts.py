"""The data scripts' own logic that is not a method: merging runs of the MEMIT scaling script."""
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

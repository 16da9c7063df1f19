"""Atomic writes (kn_tutorial.files): a reader never sees half a file, a failed write leaves the old one."""
import json
import re
from pathlib import Path

import pytest

from kn_tutorial import files

ROOT = Path(__file__).resolve().parents[1]


def test_write_json_writes_the_data_with_a_final_newline(tmp_path):
    path = files.write_json(tmp_path / "sub" / "out.json", {"a": [1, 2], "where": Path("x/y")})
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n") and json.loads(text) == {"a": [1, 2], "where": "x/y"}  # default=str
    files.write_json(path, {"é": 1}, indent=None, ensure_ascii=False, separators=(",", ":"))
    assert path.read_text(encoding="utf-8") == '{"é":1}\n'


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    files.write_json(path, {"old": True})
    before = path.read_bytes()

    def half_then_fail(f):
        f.write(b'{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(path, half_then_fail)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    with pytest.raises(TypeError):  # data JSON cannot hold: the old file stays
        files.write_json(path, {"bad": object()}, default=None)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_writers_of_one_file_use_different_temporary_names(tmp_path, monkeypatch):
    names = []
    replace = files.os.replace
    monkeypatch.setattr(files.os, "replace", lambda src, dst: names.append(Path(src).name) or replace(src, dst))
    for i in range(3):
        files.write_json(tmp_path / "out.json", {"i": i})
    assert len(set(names)) == 3 and all(n.startswith("out.json.") and n.endswith(".tmp") for n in names)
    assert json.loads((tmp_path / "out.json").read_text()) == {"i": 2}


def test_the_scripts_write_their_json_through_write_json():
    """No script writes its results with write_text(json.dumps(...)): an interrupted or concurrent
    run would leave half a file (ft_tuning.py did, beside memit_tuning.py's own .tmp + replace)."""
    for path in sorted((ROOT / "scripts").glob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert not re.search(r"write_text\(\s*json\.dumps", source), f"{path.name}: use kn_tutorial.files.write_json"

"""No text of the book tells how the book was made.

The chapters, the student notebooks, the book's Markdown pages and the README are read as a finished
book: no scratch paths, no earlier models or runs, no bugs that were fixed, no notes to the authors.
Every markdown and code cell is searched (and every output for file-system paths). A pattern names
development history only: "trained from scratch" or "no longer" are legitimate and are not matched.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

HISTORY = {
    "a scratch path": r"/tmp/|/scratch\b|\bscratch (?:file|dir|directory|folder|path|run|notebook|copy)s?\b",
    "an earlier or older model, version or run": (
        r"\b(?:earlier|previous|older|old|former) (?:Atlas|models?|versions?|runs?|checkpoints?|releases?)\b"
        r"|\bAtlas v\d\b|\bv\d (?:model|Atlas)\b"),
    "a fixed bug": r"\bbugs?\b|\bbuggy\b|\b(?:we|was|were|been) fixed\b|\bbugfix\b",
    "a note to the authors": r"\bTODO\b|\bFIXME\b|\bXXX\b|\bnote to self\b|\brun notes?\b",
}
PATHS_IN_OUTPUT = r"/tmp/|/work/|/root/|/home/[A-Za-z]"


def _files() -> list[Path]:
    book = ROOT / "book"
    return (sorted(book.glob("*.ipynb")) + sorted((book / "exercises").glob("*.ipynb")) + sorted(book.glob("*.md"))
            + [ROOT / "README.md"])


def history_lines(path: Path) -> list[str]:
    """Every place in `path` where its text mentions how the book was made, as readable lines."""
    found, name = [], path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        chunks = [(f"cell {i} (id {c.get('id')}, {c['cell_type']})", "".join(c["source"])) for i, c in enumerate(cells)]
        outputs = [(f"cell {i} (id {c.get('id')}) output",
                    "".join("".join(o.get("text", "")) + "".join("".join(v) for k, v in o.get("data", {}).items()
                                                               if k.startswith("text/"))
                            for o in c.get("outputs", [])))
                   for i, c in enumerate(cells)]
    else:
        chunks, outputs = [("text", path.read_text(encoding="utf-8"))], []
    for where, text in chunks:
        for what, pattern in HISTORY.items():
            for match in re.finditer(pattern, text, re.I if what != "a note to the authors" else 0):
                found.append(f"{name} {where}: {what}: ...{text[max(0, match.start() - 60):match.end() + 60]!r}")
    for where, text in outputs:
        for match in re.finditer(PATHS_IN_OUTPUT, text):
            found.append(f"{name} {where}: a machine path: ...{text[max(0, match.start() - 60):match.end() + 60]!r}")
    return found


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_development_history_in_the_book(path):
    found = history_lines(path)
    assert not found, "drop the history, keep the fact:\n" + "\n".join(found)


def test_the_search_covers_the_book():
    names = {p.name for p in _files()}
    assert {"README.md", "intro.md", "03_integrated_gradients.ipynb"} <= names and len(names) >= 10, names


@pytest.mark.parametrize("planted", [
    "The ROME rows come from /tmp/rome_run/out.json.",
    "An earlier Atlas model answered this with 0.9.",
    "In a previous version the loss was different.",
    "A bug in our weight decay made this worse; we fixed it.",
    "TODO: rerun with the new model.",
    "Numbers from an older run.",
    "See the scratch notebook for details.",
])
def test_a_planted_history_line_is_found(tmp_path, planted):
    notebook = {"cells": [{"cell_type": "markdown", "id": "a", "metadata": {}, "source": ["Atlas is trained from scratch; "
                                                                                        "the edit no longer holds. " + planted]}]}
    path = tmp_path / "planted.ipynb"
    path.write_text(json.dumps(notebook), encoding="utf-8")
    assert history_lines(path), planted


def test_legitimate_text_is_not_matched(tmp_path):
    notebook = {"cells": [{"cell_type": "markdown", "id": "a", "metadata": {}, "source": [
        "A model trained from scratch no longer knows the subject; the earlier layers read the token, and the "
        "first layer is an extended embedding. The edit is undone, the weights restored (cached after the first run)."]}]}
    path = tmp_path / "legitimate.ipynb"
    path.write_text(json.dumps(notebook), encoding="utf-8")
    assert history_lines(path) == []

"""Generate the student versions of the chapters: book/exercises/NN_name.ipynb.

A chapter's exercises follow the ARENA pattern (see chapter 3): a markdown cell with the
task, a code cell with a stub that raises NotImplementedError and a one-line check from
`kn_tutorial.exercises`, then the solution in a dropdown,

    <details><summary>Solution</summary> ```python ... ``` </details>

For every chapter notebook `book/[0-9][0-9]_*.ipynb` that has such a dropdown, the
student version is the same notebook with

* every solution dropdown, and every answer dropdown of the "check your understanding"
  questions (`<details><summary>Answer</summary>`), replaced by a one-line note (the text
  around it stays);
* every output and execution count cleared (students run it themselves);
* the Colab badge pointing at the student version, and a first cell saying what it is;
* relative links to the book's pages pointing one folder up, at the chapters in book/.

The output is deterministic (same chapters -> byte-identical files), and stale student
notebooks of chapters that no longer have exercises are deleted. `tests/test_exercises.py`
checks that the committed files are in sync and that every check passes on the solution
and not on the stub; it imports `exercises()` below to find them.

    python scripts/make_student_notebooks.py          # (re)write book/exercises/
    python scripts/make_student_notebooks.py --check  # exit 1 if book/exercises/ is stale
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
OUT = BOOK / "exercises"
sys.path.insert(0, str(ROOT))
from kn_tutorial.notebook import REPO  # noqa: E402  (the one place for the repository's name)

REPO_BLOB = f"https://colab.research.google.com/github/{REPO}/blob/main/"

SOLUTION = re.compile(r"<details>\s*<summary>\s*Solution\s*</summary>.*?</details>[ \t]*\n?", re.S | re.I)
ANSWER = re.compile(r"<details>\s*<summary>\s*Answer\s*</summary>.*?</details>[ \t]*\n?", re.S | re.I)
PYTHON_BLOCK = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.S)
REMOVED = "*The solution is removed from the student version; it is under this exercise in the full chapter.*\n"
ANSWER_REMOVED = "*The answer is removed from the student version; it is in the full chapter.*\n"
# A relative link of a chapter ("[chapter 5](05_causal_tracing.ipynb)", "[notation](notation.md)"),
# which from book/exercises/ must go one folder up.
RELATIVE_LINK = re.compile(r"\]\((?![a-z]+:|#|/|\.\./)([^)\s]+\.(?:ipynb|md)(?:#[^)\s]*)?)\)")
README = """# Student notebooks (generated: do not edit)

Each notebook here is a chapter of the book with the exercise solutions removed and the
outputs cleared, ready to hand out as an assignment. Every exercise has a stub to fill in
and a one-line check that says whether the answer is right and, if not, what differs.

They are generated from the chapters in `book/` by

    python scripts/make_student_notebooks.py

and `tests/test_exercises.py` fails when they are out of date. `pytest` never runs them
and the book does not render them.

| Student notebook | Chapter | Exercises |
| --- | --- | --- |
"""


@dataclass
class Exercise:
    """One exercise of a chapter: the stub cell (code) and the solution code from its dropdown."""
    chapter: str      # e.g. "03_integrated_gradients"
    title: str        # the "### Exercise N: ..." heading before the stub ("" if none)
    stub: str         # source of the stub cell: imports, `def my_...: raise NotImplementedError`, check call
    solution: str     # the python code blocks of the dropdown, joined


def chapters() -> list[Path]:
    """The chapter notebooks, in order."""
    return sorted(BOOK.glob("[0-9][0-9]_*.ipynb"))


def source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def exercises(notebook: dict, chapter: str = "") -> list[Exercise]:
    """The exercises of a notebook: each stub code cell paired with the next solution dropdown."""
    found, stub, title, heading = [], None, "", ""
    for cell in notebook["cells"]:
        text = source(cell)
        if cell["cell_type"] == "code":
            if "raise NotImplementedError" in text:
                stub, title = text, heading
            continue
        if cell["cell_type"] != "markdown":
            continue
        for block in SOLUTION.finditer(text):  # a dropdown closes the pending stub
            if stub is not None:
                code = "\n\n".join(m.group(1).strip("\n") for m in PYTHON_BLOCK.finditer(block.group(0)))
                found.append(Exercise(chapter, title, stub, code + "\n"))
                stub = None
        headings = re.findall(r"^#+\s*(Exercise\b.*)$", text, re.M)
        if headings:
            heading = headings[-1].strip()
    return found


def student_version(notebook: dict, chapter: str) -> dict:
    """The notebook with solutions removed, outputs cleared and the badge pointing here."""
    chapter_url = f"{REPO_BLOB}book/{chapter}.ipynb"
    student_url = f"{REPO_BLOB}book/exercises/{chapter}.ipynb"
    cells = [{
        "cell_type": "markdown",
        "id": "student-version",
        "metadata": {},
        "source": (f"**Student version** of chapter `book/{chapter}.ipynb`: the exercise solutions are removed "
                   f"and the outputs cleared. Run the cells from the top; fill in each stub until the check "
                   f"under it prints *Correct*. Generated by `scripts/make_student_notebooks.py`; do not edit "
                   f"it by hand."),
    }]
    for cell in notebook["cells"]:
        cell = json.loads(json.dumps(cell))  # a deep copy
        text = source(cell)
        if cell["cell_type"] == "markdown":
            text = ANSWER.sub(ANSWER_REMOVED, SOLUTION.sub(REMOVED, text)).replace(chapter_url, student_url)
            text = RELATIVE_LINK.sub(r"](../\1)", text)
            if not text.strip():
                continue
        elif cell["cell_type"] == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
            cell["metadata"].pop("execution", None)  # run timings
        cell["source"] = text
        cells.append(cell)
    keep = {k: notebook["metadata"][k] for k in ("kernelspec", "language_info") if k in notebook["metadata"]}
    return {"cells": cells, "metadata": keep, "nbformat": notebook["nbformat"],
            "nbformat_minor": notebook["nbformat_minor"]}


def dumps(notebook: dict) -> str:
    """JSON as nbformat writes it (indent 1, sorted keys), lines split like Jupyter's."""
    for cell in notebook["cells"]:
        text = source(cell)
        cell["source"] = text.splitlines(keepends=True)
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def render() -> dict[str, str]:
    """{file name in book/exercises/: its content} for the current chapters."""
    files, rows = {}, []
    for path in chapters():
        notebook = json.loads(path.read_text(encoding="utf-8"))
        found = exercises(notebook, path.stem)
        if not found:
            continue
        files[path.name] = dumps(student_version(notebook, path.stem))
        titles = "; ".join(e.title.split(":", 1)[-1].strip() or "(untitled)" for e in found)
        rows.append(f"| [{path.name}]({path.name}) | [`book/{path.name}`](../{path.name}) | {len(found)}: {titles} |\n")
    files["README.md"] = README + "".join(rows)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report whether book/exercises/ is in sync")
    args = parser.parse_args(argv)
    want = render()
    present = [*OUT.glob("*.ipynb"), OUT / "README.md"]
    have = {p.name: p.read_text(encoding="utf-8") for p in present if p.is_file()}
    stale = sorted(n for n in set(want) | set(have) if want.get(n) != have.get(n))
    if args.check:
        for name in stale:
            print(f"out of date: book/exercises/{name}")
        return 1 if stale else 0
    OUT.mkdir(exist_ok=True)
    for name in stale:
        if name in want:
            (OUT / name).write_text(want[name], encoding="utf-8")
            print(f"wrote book/exercises/{name}")
        else:
            (OUT / name).unlink()
            print(f"removed book/exercises/{name} (its chapter has no exercises now)")
    if not stale:
        print(f"book/exercises/ is up to date ({len(want) - 1} student notebooks)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

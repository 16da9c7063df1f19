"""Every figure of every chapter has a numbered caption and alt text.

A figure is a code cell with an ``image/png`` output. The markdown cell directly after it must start
with ``*Figure N.`` (N running 1, 2, ... through the chapter) and contain ``Alt text:``, and the code
cell must carry ``metadata.mystnb.image.alt`` so that MyST-NB writes the alt text into the HTML
``<img alt>`` of the output.
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "book").glob("0*.ipynb"))
CAPTION = re.compile(r"^\*Figure (\d+)\.")


def figure_problems(notebook: dict) -> list[str]:
    """What is missing around each figure of one notebook, as readable lines (empty when all is well)."""
    problems, expected = [], 1
    cells = notebook["cells"]
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        if not any("image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
            continue
        where = f"figure cell {index} (id {cell.get('id')})"
        alt = cell.get("metadata", {}).get("mystnb", {}).get("image", {}).get("alt", "")
        if len(alt.strip()) < 40:
            problems.append(f"{where}: no real alt text in metadata.mystnb.image.alt (got {alt!r})")
        after = cells[index + 1] if index + 1 < len(cells) else None
        if after is None or after["cell_type"] != "markdown":
            problems.append(f"{where}: the next cell is not a markdown caption; insert one starting '*Figure {expected}.'")
            expected += 1
            continue
        text = "".join(after["source"])
        match = CAPTION.match(text)
        if match is None:
            problems.append(f"{where}: the caption cell does not start with '*Figure {expected}.' (starts {text[:40]!r})")
        elif int(match.group(1)) != expected:
            problems.append(f"{where}: numbered Figure {match.group(1)}, expected Figure {expected}")
        if "Alt text:" not in text:
            problems.append(f"{where}: the caption cell has no 'Alt text:'")
        expected += 1
    return problems


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_figure_has_caption_and_alt_text(path):
    notebook = json.loads(path.read_text())
    problems = figure_problems(notebook)
    assert not problems, f"{path.name}:\n" + "\n".join(problems)


def test_the_chapters_have_figures():
    """The check above must see the figures at all (a renamed output key would make it pass vacuously)."""
    counts = {p.name: sum(any("image/png" in o.get("data", {}) for o in c.get("outputs", []))
                          for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code")
              for p in CHAPTERS}
    assert len(counts) == 8 and all(n > 0 for n in counts.values()), counts


def _figure(source_after: str, alt: str = "A line plot of something over layers, rising from 0 to 1.") -> dict:
    figure = {"cell_type": "code", "id": "f", "metadata": {"mystnb": {"image": {"alt": alt}}},
              "outputs": [{"output_type": "display_data", "data": {"image/png": "", "text/plain": ""}}], "source": ""}
    return {"cells": [figure, {"cell_type": "markdown", "id": "m", "metadata": {}, "source": [source_after]}]}


def test_figure_problems_catches_each_fault():
    good = "*Figure 1. A caption.* Alt text: a line plot of something over layers, rising from 0 to 1."
    assert figure_problems(_figure(good)) == []
    assert figure_problems(_figure("*Figure: a caption.* Alt text: x"))            # unnumbered
    assert figure_problems(_figure("*Figure 2. A caption.* Alt text: x"))          # wrong number
    assert figure_problems(_figure("*Figure 1. A caption.* No alt text here."))    # no alt text
    assert figure_problems(_figure(good, alt=""))                                  # no HTML alt
    code_after = _figure(good)
    code_after["cells"][1]["cell_type"] = "code"
    assert figure_problems(code_after)                                             # caption is not markdown

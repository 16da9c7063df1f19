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


RAW_DRAWING = re.compile(r"\b(?:ax|axes|axs)(?:\[[^\]]*\])*\.(bar|barh|plot|scatter|semilogy|loglog|imshow|hist|errorbar|"
                         r"fill_between|pcolormesh|matshow)\(")


def _figure_cells(notebook: dict):
    """(index, cell) for every code cell with an image/png output."""
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code" and any("image/png" in out.get("data", {}) for out in cell.get("outputs", [])):
            yield index, cell


def raw_drawing(notebook: dict) -> list[str]:
    """Figure cells that draw with matplotlib themselves instead of calling a package plot function
    (reference lines and shading on top of a package figure, such as axhline or axvspan, are fine)."""
    found = []
    for index, cell in _figure_cells(notebook):
        calls = sorted(set(RAW_DRAWING.findall("".join(cell["source"]))))
        if calls:
            found.append(f"figure cell {index} (id {cell.get('id')}) draws with {calls}: use or add a function in "
                         f"kn_tutorial.plots / plots_editing")
    return found


def test_raw_drawing_is_found():
    cell = {"cell_type": "code", "id": "x", "source": ["fig, ax = plt.subplots()\n", "ax.bar([1], [2])\n"],
            "outputs": [{"data": {"image/png": "..."}}]}
    assert raw_drawing({"cells": [cell]})
    cell["source"] = ["plot_by_layer(series, range(3), ax=ax)\n", "ax.axhline(0)\n"]
    assert not raw_drawing({"cells": [cell]})


def _plain(text: str) -> str:
    """Markdown reduced to what an alt attribute holds: no $, backticks or *, spaces collapsed."""
    return re.sub(r"\s+", " ", text.replace("$", "").replace("`", "").replace("*", "")).strip().rstrip(".")


def alt_mismatches(notebook: dict) -> list[str]:
    """Figures whose HTML alt text (metadata.mystnb.image.alt) is not the caption's 'Alt text:' paragraph."""
    found, cells = [], notebook["cells"]
    for index, cell in _figure_cells(notebook):
        if index + 1 == len(cells):
            continue
        caption = "".join(cells[index + 1]["source"])
        if "Alt text:" not in caption:
            continue  # test_every_figure_has_caption_and_alt_text names it
        shown = caption.split("Alt text:", 1)[1].strip().split("\n\n")[0]
        alt = cell.get("metadata", {}).get("mystnb", {}).get("image", {}).get("alt", "")
        if _plain(alt) != _plain(shown):
            found.append(f"figure cell {index} (id {cell.get('id')}): the HTML alt text differs from the caption's: "
                         f"{alt[:80]!r} vs {shown[:80]!r}")
    return found


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.name)
def test_every_figure_is_drawn_by_the_package_and_its_html_alt_is_the_captions(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    found = raw_drawing(notebook) + alt_mismatches(notebook)
    assert not found, "\n".join(found)


def test_a_stale_alt_text_is_found():
    figure = {"cell_type": "code", "id": "f", "metadata": {"mystnb": {"image": {"alt": "Layers 0 to 7."}}},
              "source": [], "outputs": [{"data": {"image/png": "..."}}]}
    caption = {"cell_type": "markdown", "source": ["*Figure 1. A trace.* Alt text: Layers 0 to 11.\n\nMore text."]}
    assert alt_mismatches({"cells": [figure, caption]})
    figure["metadata"]["mystnb"]["image"]["alt"] = "Layers 0 to 11"
    assert not alt_mismatches({"cells": [figure, caption]})

"""Rewrite MyST roles in the chapters' markdown as plain Markdown, for Colab and plain Jupyter.

Jupyter Book renders ``{cite:t}`key``` and ``{doc}`chapter 5 <05_causal_tracing>``` as links,
but Colab, JupyterLab and GitHub show them raw. The chapters therefore use plain Markdown,
which all of them (and Jupyter Book) render:

* ``{cite:t}`key``` (and a bare ``{cite}`key```, which the chapters use in running text) ->
  ``[Meng et al. (2022)](url)``; ``{cite:p}`key``` -> ``([Meng et al., 2022](url))``, without the
  outer parentheses right after a "("; authors, year and url come from references.bib;
* ``{doc}`text <page>``` -> ``[text](page.ipynb)`` (``page.md`` for the book's Markdown pages);
* a chapter's ```` ```{bibliography} ```` block -> a plain list of the works that chapter cites.

book/references.md keeps the full bibliography (``:all:``). ``tests/test_notebook.py`` fails
if a chapter or student notebook contains a MyST role; run this script after writing one:

    python scripts/plain_markdown.py        # rewrites book/NN_*.ipynb in place
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
#: A MyST role such as {cite:t}`key` or {doc}`text <page>`, and a MyST directive fence.
ROLE = re.compile(r"\{([a-z]+(?::[a-z]+)?)\}`([^`]*)`")
DIRECTIVE = re.compile(r"^(`{3,}|:{3,})\{([\w-]+)\}.*?^\1[ \t]*$\n?", re.M | re.S)


def bibliography(path: Path = ROOT / "references.bib") -> dict[str, dict[str, str]]:
    """{key: {"who": "Meng et al.", "year": "2022", "url": ..., "title": ...}} from a BibTeX file."""
    entries = {}
    for key, body in re.findall(r"^@\w+\{([^,\s]+),(.*?)^\}", path.read_text(encoding="utf-8"), re.M | re.S):
        fields = {name.lower(): value.strip() for name, value in
                  re.findall(r"^\s*(\w+)\s*=\s*\{(.*)\},?\s*$", body, re.M)}
        names = [a.split(",")[0].strip().replace("{", "").replace("}", "")
                 for a in fields.get("author", "").split(" and ")]
        who = names[0] if len(names) == 1 else " and ".join(names) if len(names) == 2 else f"{names[0]} et al."
        title = fields.get("title", "").replace("{", "").replace("}", "")
        entries[key] = {"who": who, "year": fields.get("year", ""), "url": fields.get("url", ""), "title": title}
    return entries


def cite(keys: str, form: str, bib: dict) -> str:
    """``form`` "t": Meng et al. (2022); "p": (Meng et al., 2022); "bare": Meng et al., 2022."""
    parts = []
    for key in (k.strip() for k in keys.split(",")):
        if key not in bib:
            raise SystemExit(f"unknown citation key {key!r}: add it to references.bib")
        e = bib[key]
        if form == "t":
            text = f"{e['who']} ({e['year']})" if e["year"] else e["who"]
        else:
            text = f"{e['who']}, {e['year']}" if e["year"] else e["who"]
        parts.append(f"[{text}]({e['url']})" if e["url"] else text)
    return f"({'; '.join(parts)})" if form == "p" else "; ".join(parts)


def doc(target: str) -> str:
    m = re.fullmatch(r"\s*(.*?)\s*<([^>]+)>\s*", target)
    text, page = (m.group(1), m.group(2)) if m else (target.strip(), target.strip())
    page = page.removeprefix("/").removeprefix("book/")
    suffix = ".md" if (BOOK / f"{page}.md").exists() else ".ipynb"
    return f"[{text}]({page}{suffix})"


def reference_list(keys: list[str], bib: dict) -> str:
    lines = []
    for key in dict.fromkeys(keys):
        e = bib[key]
        year = f" ({e['year']})" if e["year"] else ""
        lines.append(f"- {e['who']}{year}. [{e['title']}]({e['url']}).")
    return "\n".join(lines) + "\n"


def plain(text: str, bib: dict, cited: list[str]) -> str:
    """The markdown `text` with every role replaced; bibliography blocks list `cited`."""
    def role(m: re.Match) -> str:
        kind, target = m.group(1), m.group(2)
        if kind in ("cite", "cite:p", "cite:t"):
            # inside parentheses already: no second pair; {cite:p}: parenthetical; the chapters
            # use a bare {cite} in running text ("which is where {cite}`x` find"): textual
            inside = m.start() > 0 and m.string[m.start() - 1] == "("
            return cite(target, "bare" if inside else "p" if kind == "cite:p" else "t", bib)
        if kind == "doc":
            return doc(target)
        raise SystemExit(f"no plain-Markdown form for the role {{{kind}}}: write it by hand")

    def directive(m: re.Match) -> str:
        if m.group(2) == "bibliography":
            return reference_list(cited, bib)
        raise SystemExit(f"no plain-Markdown form for the directive {{{m.group(2)}}}: write it by hand")

    return DIRECTIVE.sub(directive, ROLE.sub(role, text))


def convert(path: Path, bib: dict) -> bool:
    """Rewrite the notebook's markdown cells in place; True if it changed."""
    raw = path.read_text(encoding="utf-8")
    nb = json.loads(raw)
    cells = [c for c in nb["cells"] if c["cell_type"] == "markdown"]
    cited = [k.strip() for c in cells for kind, keys in ROLE.findall("".join(c["source"]))
             if kind.startswith("cite") for k in keys.split(",")]
    for cell in cells:
        text = "".join(cell["source"])
        new = plain(text, bib, cited)
        if new != text:
            cell["source"] = new.splitlines(keepends=True)
    out = json.dumps(nb, indent=1, ensure_ascii=False) + "\n"
    if out != raw:
        path.write_text(out, encoding="utf-8")
    return out != raw


def main() -> int:
    bib = bibliography()
    for path in sorted(BOOK.glob("[0-9][0-9]_*.ipynb")):
        if convert(path, bib):
            print(f"rewrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

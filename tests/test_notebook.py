"""Setup-cell helpers, and the places that must agree with them."""

import ast
import json
import random
import re
from pathlib import Path

import pytest

from kn_tutorial import notebook as N

ROOT = Path(__file__).resolve().parents[1]


def test_on_colab(monkeypatch):
    import sys

    assert N.on_colab() is ("google.colab" in sys.modules)
    monkeypatch.setitem(sys.modules, "google.colab", object())
    assert N.on_colab()


def test_setup_seeds_and_reads_model(monkeypatch):
    import matplotlib as mpl
    import numpy as np
    import torch

    monkeypatch.delenv("KN_MODEL", raising=False)
    with mpl.rc_context():
        assert N.setup(seed=3) == "atlas"
        a = (random.random(), np.random.rand(), torch.rand(1).item())
        N.setup(seed=3)
        b = (random.random(), np.random.rand(), torch.rand(1).item())
        assert a == b
        assert mpl.rcParams["image.cmap"] == "cividis"
        monkeypatch.setenv("KN_MODEL", "gpt2-xl")
        assert N.setup() == "gpt2-xl"


def test_claim_checks_on_its_models_and_says_when_skipped(monkeypatch, capsys):
    monkeypatch.delenv("KN_MODEL", raising=False)
    assert N.claim("two is more than one", 2 > 1) is None  # nothing to display on a cell's last line
    with pytest.raises(AssertionError, match="Atlas has 8 layers"):
        N.claim("Atlas has 8 layers", False)
    with pytest.raises(AssertionError, match="lazy"):
        N.claim("lazy", lambda: False)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("KN_MODEL", "gpt2-xl")
    called = []
    assert N.claim("Atlas has 8 layers", lambda: called.append(1) or False) is None
    assert not called  # not evaluated on a model it is not about
    assert capsys.readouterr().out == "skipped on gpt2-xl: this claim is about Atlas: Atlas has 8 layers\n"
    with pytest.raises(AssertionError):
        N.claim("GPT-2 XL has 48 layers", False, models=("gpt2-xl",))
    with pytest.raises(AssertionError, match="an identity"):  # "any": checked on every model
        N.claim("an identity", False, models=N.ANY_MODEL)
    assert N.claim("an identity", True, models="any") is None
    assert capsys.readouterr().out == ""
    with pytest.raises(ValueError, match=r"\('gpt2',\)"):  # a bare string would match "gpt2-xl" by substring
        N.claim("about GPT-2", True, models="gpt2")


def test_colab_badge():
    url = "https://colab.research.google.com/github/kn-tutorial/kn-tutorial/blob/main/book/06_rome.ipynb"
    assert N.colab_url("book/06_rome.ipynb") == url
    assert N.colab_url("./book/06_rome.ipynb") == url
    assert N.colab_url("06_rome.ipynb") == url
    md = N.colab_badge("book/06_rome.ipynb")
    assert md == f"[![Open In Colab]({N.COLAB_BADGE_SVG})]({url})"
    assert f'href="{url}"' in N.colab_badge("06_rome.ipynb", html=True)
    with pytest.raises(ValueError):
        N.colab_url("book/intro.md")


def test_colab_install_is_pinned():
    assert N.COLAB_SPEC == f"kn_tutorial @ git+https://github.com/{N.REPO}@{N.RELEASE_TAG}"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", N.RELEASE_TAG)
    assert N.COLAB_INSTALL == f'pip install -q "{N.COLAB_SPEC}"'
    import kn_tutorial

    assert N.RELEASE_TAG == f"v{kn_tutorial.__version__}"
    # the version is written once: pyproject.toml reads it from kn_tutorial.__version__
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject, "pyproject.toml should not repeat the version"
    assert re.search(r'^version\s*=\s*\{\s*attr\s*=\s*"kn_tutorial.__version__"\s*\}', pyproject, re.M)
    assert N.INSTALL_CELL.splitlines()[-1] == f"    %{N.COLAB_INSTALL}"


def test_repo_url_agrees_with_book_config_and_readme():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["repository"]["url"] == N.REPO_URL
    readme = (ROOT / "README.md").read_text()
    for repo in re.findall(r"colab\.research\.google\.com/github/([\w.-]+/[\w.-]+)/", readme):
        assert repo == N.REPO
    assert N.COLAB_SPEC in readme
    pyproject = (ROOT / "pyproject.toml").read_text()
    for url in re.findall(r'^(?:Homepage|Source)\s*=\s*"([^"]+)"', pyproject, re.M):
        assert url == N.REPO_URL


def _book_notebooks():
    return sorted(p for p in (ROOT / "book").glob("*.ipynb"))


def _all_notebooks():
    return _book_notebooks() + sorted((ROOT / "book" / "exercises").glob("*.ipynb"))


@pytest.mark.parametrize("path", _all_notebooks(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_install_cell_is_the_generated_one(path):
    """Every chapter and student notebook opens with kn_tutorial.notebook.INSTALL_CELL exactly
    (scripts/release.py writes it; run that, or copy INSTALL_CELL, after changing it)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    src = "".join(first_code["source"])
    assert src.startswith(N.INSTALL_CELL), f"{path.name}: the setup cell starts with\n{src[:300]}"


@pytest.mark.parametrize("path", _book_notebooks(), ids=lambda p: p.name)
def test_chapter_notebook_conventions(path):
    """Colab install pinned to COLAB_SPEC; every nbval-skip cell says why."""
    nb = json.loads(path.read_text())
    sources = ["".join(c.get("source", "")) for c in nb["cells"]]
    for src in sources:
        for spec in re.findall(r"kn_tutorial @ git\+[^\s\"']+", src):
            assert spec == N.COLAB_SPEC, f"{path.name}: installs {spec!r}, expected {N.COLAB_SPEC!r}"
    for cell, src in zip(nb["cells"], sources):
        if "nbval-skip" in cell.get("metadata", {}).get("tags", []):
            assert re.search(r"^#\s*skip-reason:\s*\S", src, re.M), (
                f"{path.name}: a cell tagged nbval-skip needs a '# skip-reason: ...' line:\n{src[:200]}"
            )


# {cite:t}`key`, {doc}`page`, ... and ```{directive} fences: Jupyter Book renders them, Colab and
# plain Jupyter show them raw. scripts/plain_markdown.py writes them as plain Markdown.
MYST_ROLE = re.compile(r"\{[a-z]+(?::[a-z]+)?\}`[^`]*`|^(?:`{3,}|:{3,})\{[\w-]+\}", re.M)


@pytest.mark.parametrize("path", _all_notebooks(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_myst_roles_in_notebooks(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "markdown":
            found = MYST_ROLE.findall("".join(cell["source"]))
            assert not found, (f"{path.name} cell {index} uses MyST syntax that Colab shows raw: {found[:3]}; "
                               "run python scripts/plain_markdown.py")


def test_relative_links_resolve():
    """Links between the book's pages point at files that exist (from book/exercises/, one folder up)."""
    for path in _all_notebooks():
        text = "".join("".join(c["source"]) for c in json.loads(path.read_text(encoding="utf-8"))["cells"]
                       if c["cell_type"] == "markdown")
        for target in re.findall(r"\]\((?![a-z]+:|#)([^)\s#]+\.(?:ipynb|md))", text):
            assert (path.parent / target).is_file(), f"{path.name}: broken link {target}"


@pytest.mark.parametrize("path", _book_notebooks(), ids=lambda p: p.name)
def test_every_chapter_assert_says_what_was_expected(path):
    """A failing check names the claim: `assert cond, "what should hold"`, or `claim(text, cond)`
    for a claim about Atlas's numbers (kn_tutorial.notebook.claim)."""
    for index, src, node in _chapter_asserts(path):
        assert node.msg is not None, (
            f"{path.name} cell {index}: `{ast.get_source_segment(src, node)[:100]}` fails without saying "
            "what was expected; add a message")


def _chapter_asserts(path):
    """(cell index, cell source, ast.Assert) for every assert in the chapter's code cells."""
    import ast

    nb = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        src = re.sub(r"^(\s*)[%!].*$", r"\1pass", "".join(cell["source"]), flags=re.M)  # IPython magics
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Assert):
                yield index, src, node


# A claim compares a result with a threshold or with another result ("recall >= 0.95", "a < b"):
# it is written claim(text, condition, models=...) so that it names the models it holds for.
# A plain assert is left for the code checking itself: equalities, restores (`not x.changed()`),
# allclose, and differences below a tolerance (a literal of at most 1e-3, or a name with "tol").
PLUMBING_TOLERANCE = 1e-3


def _is_tolerance(node) -> bool:
    import ast

    for n in ast.walk(node):
        if (isinstance(n, ast.Constant) and isinstance(n.value, (int, float)) and not isinstance(n.value, bool)
                and 0 < abs(n.value) <= PLUMBING_TOLERANCE):
            return True
        if isinstance(n, ast.Name) and "tol" in n.id.lower():
            return True
    return False


def states_a_claim(test) -> bool:
    """True when an assert's condition compares a result with a threshold or another result."""
    import ast

    for n in ast.walk(test):
        if isinstance(n, ast.Compare):
            for op, right in zip(n.ops, n.comparators):
                if isinstance(op, (ast.Eq, ast.NotEq, ast.Is, ast.IsNot, ast.In, ast.NotIn)):
                    continue
                if isinstance(op, (ast.Lt, ast.LtE)) and _is_tolerance(right):
                    continue
                return True
    return False


def test_states_a_claim_tells_claims_from_checks_of_the_code():
    import ast

    def of(src):
        return states_a_claim(ast.parse(src).body[0].test)

    for claim_like in ('assert recall["train"] >= 0.99, "m"', "assert a < b, 'm'", "assert 2 <= n <= 5, 'm'",
                       "assert all((r > 1).all() for r in rs), 'm'", "assert x == 0 and peak >= 3, 'm'"):
        assert of(claim_like), claim_like
    for check in ("assert not original.changed(), 'm'", "assert a == b, 'm'", "assert abs(a - b) < 1e-4, 'm'",
                  "assert torch.allclose(a, b, atol=1e-5), 'm'", "assert err < tolerance, 'm'", "assert 'NS' not in r, 'm'"):
        assert not of(check), check


@pytest.mark.parametrize("path", _book_notebooks(), ids=lambda p: p.name)
def test_chapter_claims_are_claim_calls(path):
    """No plain claim-assert comes back (issue 23): a chapter states what its text claims with
    kn_tutorial.notebook.claim, naming the models it holds for ("any" for an identity or a result
    that does not depend on the language model), so that a hub model skips Atlas-only claims visibly."""
    for index, src, node in _chapter_asserts(path):
        assert not states_a_claim(node.test), (
            f"{path.name} cell {index}: `{ast.get_source_segment(src, node)[:120]}` states a claim with a plain "
            "assert; write it as claim(text, condition, models=...) (kn_tutorial.notebook.claim)")

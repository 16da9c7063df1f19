"""The package's import drawing has layers, and every arrow points down.

    0 data          the Atlas world, its prompts, corpus, tokenizer and CounterFact; the shipped
                    studies; dataset loaders; helpers that import nothing of the package
    1 plumbing      models, hooks, tokens, scoring, weights: reading and changing any model
    2 methods       Geva's memories, integrated gradients, knowledge neurons, causal tracing,
                    ROME, MEMIT and their baselines, and what they share (stats, evaluation)
    3 book, build   figures, explorers, exercises, the notebook helper, and `atlas_build`, which
                    trains, probes and reports on Atlas with the methods

A module may import modules of its own layer or below, never above: the methods read the world,
and the world knows nothing of the methods. The imports are read from the source with `ast`,
including those inside functions (a lazy import is still an arrow). A module is placed by the
first rule in `RULES` that matches its dotted name; a module no rule matches fails the test, so
a new module has to be placed on purpose.

`kn_tutorial.atlas.__main__` (`python -m kn_tutorial.atlas`) sits in the data package's folder
but is a book-and-build module: it only forwards to `kn_tutorial.atlas_build.cli`, and nothing
imports it.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from fnmatch import fnmatchcase
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kn_tutorial"
LAYER_NAMES = ("data", "plumbing", "methods", "book and build")
DATA, PLUMBING, METHODS, BOOK = range(4)

# (pattern on the dotted module name, layer); the first rule that matches places the module.
RULES: list[tuple[str, int]] = [
    ("kn_tutorial.atlas.__main__", BOOK),        # the command line: forwards to atlas_build.cli
    ("kn_tutorial.atlas", DATA),                 # the world, templates, contexts, corpus, ...
    ("kn_tutorial.atlas.*", DATA),
    ("kn_tutorial.book_data", DATA),             # the shipped studies (JSON) and their loader
    ("kn_tutorial.counterfact", DATA),           # CounterFact's schema and loader
    ("kn_tutorial.text_datasets", DATA),         # wikitext and other corpora
    ("kn_tutorial.memnet.data", DATA),           # chapter 2's stories
    ("kn_tutorial.progress", DATA),              # progress bars: imports nothing of the package
    ("kn_tutorial.lazy", DATA),                  # lazy re-exports by name (issue 23's module split)
    ("kn_tutorial.files", DATA),                 # atomic file writes (the statistics cache, the scripts' JSON)
    ("kn_tutorial.architectures", PLUMBING),    # the architecture table of the four families
    ("kn_tutorial.loading", PLUMBING),          # loading models, choosing devices
    ("kn_tutorial.models", PLUMBING),
    ("kn_tutorial.hooks", PLUMBING),
    ("kn_tutorial.tokens", PLUMBING),
    ("kn_tutorial.scoring", PLUMBING),
    ("kn_tutorial.weights", PLUMBING),
    ("kn_tutorial.validate", PLUMBING),
    ("kn_tutorial.kv_cache", PLUMBING),
    ("kn_tutorial.suffix", PLUMBING),
    ("kn_tutorial.gpt2_written", PLUMBING),     # GPT-2's block written out on its weights (the fast paths)
    ("kn_tutorial.hyperparams", PLUMBING),
    ("kn_tutorial.memnet.model", PLUMBING),
    ("kn_tutorial.*_display", BOOK),             # figures, HTML and explorers of a method (above it)
    ("kn_tutorial.memories*", METHODS),          # a method and its own modules (memories_engine, ...)
    ("kn_tutorial.attribution*", METHODS),
    ("kn_tutorial.logit_attribution", METHODS),  # direct logit attribution, beside IG (chapter 3)
    ("kn_tutorial.neurons*", METHODS),
    ("kn_tutorial.tracing*", METHODS),
    ("kn_tutorial.rome*", METHODS),
    ("kn_tutorial.memit*", METHODS),
    ("kn_tutorial.finetune", METHODS),
    ("kn_tutorial.stats", METHODS),
    ("kn_tutorial.evaluation", METHODS),
    ("kn_tutorial.memnet", METHODS),
    ("kn_tutorial.memnet.train", METHODS),
    ("kn_tutorial.memnet.analysis", METHODS),
    ("kn_tutorial.memnet.plots", BOOK),
    ("kn_tutorial.atlas_build", BOOK),
    ("kn_tutorial.atlas_build.*", BOOK),
    ("kn_tutorial.exercises", BOOK),
    ("kn_tutorial.exercises.*", BOOK),
    ("kn_tutorial.notebook", BOOK),
    ("kn_tutorial.plots", BOOK),
    ("kn_tutorial.plots_editing", BOOK),        # the figures of the editing chapters (6 and 7)
    ("kn_tutorial.explorers", BOOK),             # ipywidgets explorers of the chapters
    ("kn_tutorial", BOOK),                       # the package's own __init__: load_model, set_progress
]


def module_files(package: Path) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under `package` (a package is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def layer_of(module: str) -> int | None:
    return next((layer for pattern, layer in RULES if fnmatchcase(module, pattern)), None)


def imports_of(module: str, path: Path, modules: set[str]) -> list[tuple[str, int]]:
    """(imported module of the package, line) for every import in the file, at any depth."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    root = module.split(".")[0]
    found = []

    def add(name: str, line: int) -> None:
        while name and name not in modules:  # "kn_tutorial.atlas.world.Fact" -> "kn_tutorial.atlas.world"
            name = name.rpartition(".")[0]
        if name:
            found.append((name, line))

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == root:
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != root:
                continue
            for alias in node.names:  # `from kn_tutorial import memit` imports the module memit
                add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source, node.lineno)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.split(".")[0] == root):
            add(node.args[0].value, node.lineno)
    return sorted(set(found), key=lambda item: (item[1], item[0]))


def upward_imports(package: Path) -> tuple[list[str], list[str]]:
    """(modules no rule places, "importer (layer) -> imported (layer)" for every arrow pointing up)."""
    files = module_files(package)
    unplaced = sorted(m for m in files if layer_of(m) is None)
    arrows = []
    for module, path in files.items():
        here = layer_of(module)
        if here is None:
            continue
        for imported, line in imports_of(module, path, set(files)):
            there = layer_of(imported)
            if there is not None and there > here:
                arrows.append(f"{path.relative_to(package.parent)}:{line}: {module} ({LAYER_NAMES[here]}) imports "
                              f"{imported} ({LAYER_NAMES[there]})")
    return unplaced, arrows


def test_every_module_has_a_layer():
    unplaced, _ = upward_imports(PACKAGE)
    assert not unplaced, (f"no layer for {unplaced}: add a rule to RULES in tests/test_layers.py "
                          f"(data, plumbing, methods, or book and build)")


def test_no_module_imports_a_module_of_a_higher_layer():
    _, arrows = upward_imports(PACKAGE)
    assert not arrows, ("imports that point up the layers (move the code down, or the module up):\n"
                        + "\n".join(arrows))


def test_the_atlas_data_package_is_data_and_its_command_line_forwards_up():
    files = module_files(PACKAGE)
    atlas = [m for m in files if m == "kn_tutorial.atlas" or m.startswith("kn_tutorial.atlas.")]
    for expected in ("world", "templates", "contexts", "corpus", "tokenizer", "counterfact"):
        assert layer_of(f"kn_tutorial.atlas.{expected}") == DATA and f"kn_tutorial.atlas.{expected}" in atlas
    assert [m for m in atlas if layer_of(m) != DATA] == ["kn_tutorial.atlas.__main__"]
    # nothing imports the command line, so it cannot carry a method into the data layer
    for module, path in files.items():
        assert "kn_tutorial.atlas.__main__" not in [m for m, _ in imports_of(module, path, set(files))], module


def test_importing_the_world_loads_no_method():
    """At run time too: the data modules load the package's plumbing (its __init__ loads
    `models`) but no method and nothing above."""
    data = [m for m in module_files(PACKAGE) if m.startswith("kn_tutorial.atlas") and layer_of(m) == DATA]
    code = "import sys\n" + "".join(f"import {m}\n" for m in data) + \
        "print('\\n'.join(m for m in sys.modules if m.startswith('kn_tutorial')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=PACKAGE.parent).stdout.split()
    assert set(data) <= set(loaded)
    above = [m for m in loaded if m != "kn_tutorial" and (layer_of(m) is None or layer_of(m) > PLUMBING)]
    assert not above, f"importing the Atlas data loads {above}"


def test_the_check_finds_an_upward_import(tmp_path):
    """The checker itself: in a copy of the package's shape, a data module that imports a method
    (at the top, inside a function, or by `from .. import`) is reported, with its line."""
    root = tmp_path / "kn_tutorial"
    (root / "atlas").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "rome.py").write_text("from .atlas.world import load_world\n")
    (root / "memit.py").write_text("")
    (root / "atlas" / "__init__.py").write_text("")
    (root / "atlas" / "templates.py").write_text("")
    (root / "atlas" / "world.py").write_text(textwrap.dedent("""\
        from .templates import TEMPLATES
        from ..rome import edit

        def f():
            from kn_tutorial import memit
        """))
    unplaced, arrows = upward_imports(root)
    assert unplaced == []
    assert arrows == [
        "kn_tutorial/atlas/world.py:2: kn_tutorial.atlas.world (data) imports kn_tutorial.rome (methods)",
        "kn_tutorial/atlas/world.py:5: kn_tutorial.atlas.world (data) imports kn_tutorial.memit (methods)",
    ]
    (root / "atlas" / "world.py").write_text("from .templates import TEMPLATES\n")
    assert upward_imports(root) == ([], [])
    (root / "newthing.py").write_text("")
    assert upward_imports(root)[0] == ["kn_tutorial.newthing"]


@pytest.mark.parametrize("old", ["train", "probe", "report", "rome_check", "trace_check"])
def test_the_build_modules_left_the_data_package(old):
    """They moved to kn_tutorial.atlas_build (issue 16 item 6); the old path is gone, not shadowed."""
    assert not (PACKAGE / "atlas" / f"{old}.py").exists()
    assert (PACKAGE / "atlas_build" / f"{old}.py").exists()

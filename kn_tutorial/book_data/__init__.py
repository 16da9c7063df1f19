"""The studies behind chapters 4, 6 and 7, shipped inside the package.

Some of the book's tables and curves come from runs far too slow for a notebook (a
200-fact knowledge-neuron study, ROME and its baselines on 200 cases, MEMIT at up to
thousands of edits). The scripts in ``scripts/`` compute them once, seeded, and write
JSON files into this folder; the chapters load them with :func:`load` and recompute a
few cases live to check that the file and the model still agree.

The files are package data (``pyproject.toml``), so they travel in wheels and in
``pip install git+...``: a chapter finds them wherever it runs, from ``book/``,
``book/exercises/``, an empty Colab folder or an installed wheel. No chapter opens a
path relative to its working folder.

    from kn_tutorial.book_data import load
    study = load("neurons_study")          # dict parsed from neurons_study.json
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

__all__ = ["WRITERS", "names", "path", "load"]

#: Each shipped study -> the command that (re)writes it (see README, "Regenerate the data").
WRITERS = {
    "neurons_study": "python scripts/neurons_study.py",
    "rome_table": "python scripts/rome_table.py --n 200 --seed 0",
    "rome_layers": "python scripts/rome_layers.py --n 60 --configs ...",
    "memit_scaling": "python scripts/memit_scaling.py --merge memit.json ablations.json rome.json",
    "memit_tuning": "python scripts/memit_tuning.py (two runs, see its \"runs\")",
    "atlas_sweep": "python scripts/atlas_sweep.py --next (repeated until every variant is done)",
}


def names() -> list[str]:
    """The studies this package knows about, sorted."""
    return sorted(WRITERS)


def path(name: str) -> Path:
    """The file of study ``name`` inside the installed package (where the scripts write it).

    Raises ValueError for a name that is not one of :func:`names`.
    """
    if name not in WRITERS:
        raise ValueError(f"unknown book data {name!r}; the package ships {names()}")
    return Path(str(resources.files(__name__).joinpath(f"{name}.json")))


def load(name: str) -> dict:
    """Study ``name`` parsed from its JSON file (e.g. ``load("rome_table")``).

    Raises FileNotFoundError naming the script that writes the file when it is missing
    (an install that left package data out, or a study not computed yet).
    """
    file = path(name)
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: the package should ship it (package data in "
                                f"pyproject.toml); in a clone, write it with `{WRITERS[name]}`")
    return json.loads(file.read_text(encoding="utf-8"))

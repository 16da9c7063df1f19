"""Colab, simulated offline: the package from a wheel, a notebook alone in an empty folder.

The cheap part of scripts/colab_simulation.py, run in every CI run: build the wheel,
install it alone into a fresh environment, load every study of ``kn_tutorial.book_data``
from an empty folder, and run one short chapter copied alone into another empty folder.
The full run (every chapter and student notebook) is ``python scripts/colab_simulation.py``.
"""
import subprocess
import zipfile
from pathlib import Path

import pytest

import kn_tutorial
from kn_tutorial import book_data
from tests.tiny import load_script

ROOT = Path(__file__).resolve().parents[1]
SHORT_CHAPTER = ROOT / "book" / "01_ffn_memories.ipynb"


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    """(simulation module, wheel, python of a fresh environment holding only that wheel)."""
    sim = load_script("colab_simulation")
    base = tmp_path_factory.mktemp("colab")
    wheel = sim.build_wheel(base / "wheel")
    return sim, wheel, sim.make_env(base / "env", wheel), base


@pytest.mark.slow
def test_the_wheel_carries_the_package_data(colab):
    _, wheel, _, _ = colab
    assert wheel.name.startswith(f"kn_tutorial-{kn_tutorial.__version__}-"), wheel.name
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in book_data.names():
        assert f"kn_tutorial/book_data/{name}.json" in names, f"the wheel lacks {name}.json"
    assert any(n.startswith("kn_tutorial/atlas/model/") for n in names), "the wheel lacks the Atlas model"


@pytest.mark.slow
def test_book_data_loads_from_the_wheel_in_an_empty_folder(colab, tmp_path):
    sim, _, python, base = colab
    code = ("import kn_tutorial, kn_tutorial.book_data as d; print(kn_tutorial.__file__); "
            "print(sorted((n, len(d.load(n))) for n in d.names()))")
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, env=sim.clean_env(python=python),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    where, loaded = out.stdout.splitlines()[:2]
    assert where.startswith(str(base / "env")), f"kn_tutorial came from {where}, not from the wheel"
    assert all(n in loaded for n in book_data.names())


@pytest.mark.slow
def test_a_chapter_runs_alone_in_an_empty_folder(colab, tmp_path):
    sim, _, python, base = colab
    row = sim.run_alone(python, SHORT_CHAPTER, tmp_path / "colab", cache=tmp_path / "cache")
    assert row["status"] == "ok", f"{SHORT_CHAPTER.name} alone in an empty folder: {row.get('error')}"
    assert str(row.get("kn_tutorial")).startswith(str(base / "env")), f"the kernel imported {row.get('kn_tutorial')}"

"""kn_tutorial.book_data: the studies chapters 4, 6 and 7 load travel with the package."""
import json
import re
from pathlib import Path

import pytest

import kn_tutorial
from kn_tutorial import book_data

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb")) + sorted((ROOT / "book" / "exercises").glob("*.ipynb"))
# open("data/...", Path("book/data/..."), Path("data") / ...: a file found only from one working folder
RELATIVE_DATA = re.compile(r"""(open|Path)\(\s*["'](book/)?data\b""")


@pytest.mark.parametrize("name", book_data.names())
def test_every_study_loads_from_any_working_folder(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an empty folder, as on Colab
    study = book_data.load(name)
    assert isinstance(study, dict) and study
    package = Path(kn_tutorial.__file__).parent
    assert book_data.path(name).parent == package / "book_data"


def test_the_folder_holds_exactly_the_known_studies():
    shipped = {p.stem for p in (Path(book_data.__file__).parent).glob("*.json")}
    assert shipped == set(book_data.names())


def test_unknown_and_missing_studies_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown book data 'rome_tabel'.*rome_table"):
        book_data.load("rome_tabel")
    monkeypatch.setattr(book_data, "path", lambda name: tmp_path / f"{name}.json")
    with pytest.raises(FileNotFoundError, match=r"scripts/rome_table\.py"):
        book_data.load("rome_table")


def test_package_data_is_declared():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"book_data/*.json"' in pyproject


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.parent.name + "/" + p.name)
def test_no_notebook_opens_data_relative_to_its_folder(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(nb["cells"]):
        src = "".join(cell["source"])
        if cell["cell_type"] == "code":
            assert not RELATIVE_DATA.search(src), (
                f"{path.name} cell {index} opens a data file relative to the working folder; "
                "use kn_tutorial.book_data.load(name)")
        assert "book/data" not in src, f"{path.name} cell {index} still names book/data/ (now kn_tutorial/book_data/)"

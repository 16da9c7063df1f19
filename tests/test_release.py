"""scripts/release.py: pins every notebook's install cell to v{version} and tags that commit."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kn_tutorial.notebook import COLAB_SPEC, INSTALL_CELL, RELEASE_TAG

ROOT = Path(__file__).resolve().parents[1]


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def _release(cwd, *args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "release.py"), "--root", str(cwd), *args],
                          capture_output=True, text=True)


@pytest.fixture
def repo(tmp_path):
    """A throwaway git repository with the book's notebooks, README and student-notebook script."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    for name in ("book", "scripts"):
        (tmp_path / name).mkdir()
    for nb in ROOT.glob("book/[0-9][0-9]_*.ipynb"):
        shutil.copy(nb, tmp_path / "book" / nb.name)
    shutil.copytree(ROOT / "book" / "exercises", tmp_path / "book" / "exercises")
    shutil.copy(ROOT / "scripts" / "make_student_notebooks.py", tmp_path / "scripts")
    shutil.copy(ROOT / "README.md", tmp_path)
    # an outdated pin in chapter 1, as before a version bump
    chapter = tmp_path / "book" / "01_ffn_memories.ipynb"
    chapter.write_text(chapter.read_text(encoding="utf-8").replace(RELEASE_TAG, "v0.0.9"), encoding="utf-8")
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "start")
    return tmp_path


def test_release_pins_every_notebook_and_tags(repo):
    assert _release(repo, "--check").returncode == 1  # chapter 1 pins v0.0.9
    (repo / "stray.txt").write_text("uncommitted")
    dirty = _release(repo)
    assert dirty.returncode == 1 and "uncommitted changes" in dirty.stderr
    assert not _git(repo, "tag", "--list")
    (repo / "stray.txt").unlink()

    env_run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "release.py"), "--root", str(repo)], capture_output=True, text=True,
        env={**__import__("os").environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
             "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"})
    assert env_run.returncode == 0, env_run.stderr
    assert _git(repo, "tag", "--list").split() == [RELEASE_TAG]
    assert _git(repo, "cat-file", "-t", RELEASE_TAG).strip() == "tag"  # annotated
    assert not _git(repo, "status", "--porcelain")  # the pins were committed, and the tag is on that commit
    assert _git(repo, "rev-parse", f"{RELEASE_TAG}^{{commit}}") == _git(repo, "rev-parse", "HEAD")
    assert _release(repo, "--check").returncode == 0
    for nb in [*repo.glob("book/*.ipynb"), *repo.glob("book/exercises/*.ipynb")]:
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        assert "".join(next(c for c in cells if c["cell_type"] == "code")["source"]).startswith(INSTALL_CELL)
    assert COLAB_SPEC in (repo / "README.md").read_text(encoding="utf-8")
    again = _release(repo)
    assert again.returncode == 1 and "exists already" in again.stderr

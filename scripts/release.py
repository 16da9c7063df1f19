"""Cut a release: pin every notebook's Colab install to v{version} and tag it.

The Colab install cell (``kn_tutorial.notebook.INSTALL_CELL``) installs the package from
the repository at the tag ``v{kn_tutorial.__version__}``. This script

1. checks that the git work tree is clean (a release is a commit, not a work tree);
2. writes INSTALL_CELL at the top of the first code cell of every chapter, regenerates the
   student notebooks (``scripts/make_student_notebooks.py``) and the pinned requirement in
   README.md, and commits that if anything changed;
3. creates the annotated tag ``v{version}`` on that commit, locally.

Pushing is the maintainer's step (README, "Cut a release"):

    python scripts/release.py            # after bumping __version__ in kn_tutorial/__init__.py
    git push origin main v0.1.0          # the tag must exist on GitHub before Colab can install it

    python scripts/release.py --check    # exit 1 if a notebook's install cell is not INSTALL_CELL
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_tutorial.notebook import COLAB_SPEC, INSTALL_CELL, RELEASE_TAG  # noqa: E402

# The lines INSTALL_CELL replaces: `import sys`, the Colab test, the %pip line (any version).
OLD_INSTALL = re.compile(r'\Aimport sys\nif "google\.colab" in sys\.modules:[^\n]*\n    %pip install[^\n]*\n')
README_SPEC = re.compile(r"kn_tutorial @ git\+https://github\.com/[\w.-]+/[\w.-]+@v[\w.]+")


def chapters(root: Path) -> list[Path]:
    return sorted((root / "book").glob("[0-9][0-9]_*.ipynb"))


def first_code_cell(notebook: dict) -> dict:
    return next(c for c in notebook["cells"] if c["cell_type"] == "code")


def install_cell_problem(path: Path) -> str | None:
    """Why the notebook's first code cell does not start with INSTALL_CELL, or None."""
    src = "".join(first_code_cell(json.loads(path.read_text(encoding="utf-8")))["source"])
    if src.startswith(INSTALL_CELL):
        return None
    return f"{path}: the first code cell should start with\n{INSTALL_CELL}but starts with\n{src[:300]}"


def write_install_cell(path: Path) -> bool:
    """Put INSTALL_CELL at the top of the notebook's first code cell; True if the file changed."""
    text = path.read_text(encoding="utf-8")
    notebook = json.loads(text)
    cell = first_code_cell(notebook)
    src = "".join(cell["source"])
    if not OLD_INSTALL.match(src):
        raise SystemExit(f"{path}: the first code cell does not start with the Colab install lines; "
                         f"add them by hand once:\n{INSTALL_CELL}")
    cell["source"] = OLD_INSTALL.sub(lambda m: INSTALL_CELL, src, count=1).splitlines(keepends=True)
    new = json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"
    if new != text:
        path.write_text(new, encoding="utf-8")
    return new != text


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the install cells of all notebooks")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)  # for the tests
    args = parser.parse_args(argv)
    root = args.root.resolve()
    students = sorted((root / "book" / "exercises").glob("*.ipynb"))
    if args.check:
        problems = [p for p in map(install_cell_problem, chapters(root) + students) if p]
        print("\n\n".join(problems) or f"every notebook installs {COLAB_SPEC}")
        return 1 if problems else 0

    if git(root, "status", "--porcelain"):
        print("the work tree has uncommitted changes: commit or stash them first (a release is a commit)",
              file=sys.stderr)
        return 1
    if git(root, "tag", "--list", RELEASE_TAG).strip():
        print(f"tag {RELEASE_TAG} exists already: bump __version__ in kn_tutorial/__init__.py first", file=sys.stderr)
        return 1
    changed = [p for p in chapters(root) if write_install_cell(p)]
    subprocess.run([sys.executable, str(root / "scripts" / "make_student_notebooks.py")], cwd=root, check=True)
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    readme.write_text(README_SPEC.sub(COLAB_SPEC, text), encoding="utf-8")
    if git(root, "status", "--porcelain"):
        git(root, "add", "-A", "book", "README.md")
        git(root, "commit", "-q", "-m", f"Release {RELEASE_TAG}: every notebook's Colab cell installs {COLAB_SPEC}")
        print(f"committed the install cells ({len(changed)} chapters changed, student notebooks regenerated)")
    git(root, "tag", "-a", RELEASE_TAG, "-m", f"kn_tutorial {RELEASE_TAG.removeprefix('v')}")
    print(f"tagged {RELEASE_TAG} at {git(root, 'rev-parse', '--short', 'HEAD').strip()}; "
          f"publish it with: git push origin HEAD {RELEASE_TAG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

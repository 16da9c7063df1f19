"""Simulate opening each notebook on Colab: the package from a wheel, the notebook alone in an empty folder.

What a reader gets after clicking a Colab badge is the notebook file alone, in an empty
working folder, with the package installed by the notebook's first cell. This script
reproduces that offline:

1. builds a wheel of the package (``pip wheel --no-deps``);
2. creates a fresh virtual environment and installs only that wheel into it; the other
   dependencies (torch, transformers, Jupyter, ...) are borrowed from the environment that
   runs this script through a ``.pth`` line, which does not carry over its editable install
   of ``kn_tutorial`` (so the wheel is the only ``kn_tutorial`` the notebooks can import);
3. copies each notebook alone into an empty temporary folder and runs it there top to bottom
   with nbclient (``scripts/run_notebooks.py``'s runner; ``PYTHONPATH`` is cleared). The Colab
   install cell is a no-op off Colab, exactly as the wheel is already installed. Cells tagged
   ``nbval-skip`` (a GPU model, say) are not run. In student notebooks the stubs stay
   unimplemented: each exercise check then prints its reminder instead of failing.

It prints one row per notebook (notebook, ran to the end, seconds) and exits 1 if one failed:

    python scripts/colab_simulation.py                        # all chapters and student notebooks
    python scripts/colab_simulation.py book/01_ffn_memories.ipynb book/exercises/01_ffn_memories.ipynb

``KN_CACHE`` is passed on (the second-moment statistics of chapters 6 and 7 are then reused);
``--fresh-cache`` gives every notebook an empty one, as on a new Colab runtime.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_wheel(out_dir: Path) -> Path:
    """A wheel of the package, built from the checkout without network (no build isolation)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out_dir), str(ROOT)], check=True)
    wheels = sorted(out_dir.glob("kn_tutorial-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one kn_tutorial wheel in {out_dir}, found {wheels}")
    return wheels[0]


def make_env(env_dir: Path, wheel: Path) -> Path:
    """A fresh venv holding only `wheel`, with this interpreter's other packages visible; its python."""
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    # Directories named in a .pth file join sys.path, but their own .pth files (such as an editable
    # install's finder) are not processed: the dependencies come along, this checkout does not.
    parents = dict.fromkeys([*site.getsitepackages(), sysconfig.get_paths()["purelib"]])
    Path(purelib, "_kn_parent_env.pth").write_text("\n".join(parents) + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, env=clean_env())
    return python


def clean_env(cache: Path | None = None, python: Path | None = None) -> dict:
    """This environment without PYTHONPATH (it would put the checkout before the wheel)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if python is not None:  # a kernel spec that runs "python" must find the environment's
        env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    env.setdefault("KN_PROGRESS", "0")
    env.setdefault("MPLBACKEND", "Agg")
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    if cache is not None:
        env["KN_CACHE"] = str(cache)
    return env


def run_alone(python: Path, notebook: Path, work: Path, timeout: int = 1800, cache: Path | None = None) -> dict:
    """Copy `notebook` alone into the empty folder `work` and run it there with `python`'s kernel."""
    work.mkdir(parents=True, exist_ok=True)
    if any(work.iterdir()):
        raise ValueError(f"{work} is not empty")
    copy = work / notebook.name
    shutil.copy(notebook, copy)
    # run_one's last cell reports, from inside the kernel, which kn_tutorial it imported
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); import run_notebooks as R; from pathlib import Path; "
            "row = R.run_one(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]), False); "
            "print('ROW ' + json.dumps(row))")
    start = time.perf_counter()
    result = subprocess.run([str(python), "-c", code, str(ROOT / "scripts"), str(copy), str(work / "_run"),
                             str(timeout)], cwd=work, env=clean_env(cache, python), capture_output=True, text=True)
    rows = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
    if not rows:
        return {"notebook": notebook.name, "status": "FAILED", "seconds": round(time.perf_counter() - start, 1),
                "error": (result.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(rows[-1])


def default_notebooks() -> list[Path]:
    return sorted((ROOT / "book").glob("[0-9][0-9]_*.ipynb")) + sorted((ROOT / "book" / "exercises").glob("*.ipynb"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every chapter and student notebook")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per cell")
    parser.add_argument("--fresh-cache", action="store_true", help="an empty KN_CACHE for every notebook")
    parser.add_argument("--keep", type=Path, help="work here instead of a temporary folder, and keep it")
    args = parser.parse_args(argv)
    notebooks = [p.resolve() for p in args.notebooks] or default_notebooks()
    base = args.keep or Path(tempfile.mkdtemp(prefix="kn-colab-"))
    try:
        started = time.perf_counter()
        python = make_env(base / "env", build_wheel(base / "wheel"))
        print(f"wheel built and installed in a fresh environment in {time.perf_counter() - started:.0f} s")
        print(f"{'notebook':<42}{'ran to the end':>15}{'seconds':>10}")
        failed = 0
        for i, nb in enumerate(notebooks):
            label = f"{nb.parent.name}/{nb.name}" if nb.parent.name == "exercises" else nb.name
            cache = base / f"cache{i}" if args.fresh_cache else None
            row = run_alone(python, nb, base / f"run{i}", args.timeout, cache)
            ok = row["status"] == "ok" and str(row.get("kn_tutorial", "")).startswith(str(base / "env"))
            failed += not ok
            print(f"{label:<42}{'yes' if ok else 'NO':>15}{row['seconds']:>10.1f}", flush=True)
            if not ok:
                print(f"    {row.get('error') or 'kn_tutorial imported from ' + str(row.get('kn_tutorial'))}")
        print(f"{len(notebooks) - failed} of {len(notebooks)} ran to the end; total {time.perf_counter() - started:.0f} s")
        return 1 if failed else 0
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

"""Repository-wide pytest settings (unit tests and nbval notebook runs).

* Notebook kernels inherit this process's environment, so progress bars are
  switched off for them (and for the unit tests) unless KN_PROGRESS says otherwise.
* Notebook kernels start in book/, so the repository root is put on their
  PYTHONPATH: `pytest` finds this checkout's kn_tutorial even before
  `pip install -e .` (CI installs it anyway).
* A notebook cell tagged ``nbval-skip`` must say why in a line
  ``# skip-reason: ...``; the reason is shown in pytest's skip summary (``-rs``),
  so no cell is skipped silently.
"""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.abspath(__file__))

os.environ.setdefault("KN_PROGRESS", "0")
_path = os.environ.get("PYTHONPATH", "")
if ROOT not in _path.split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, _path) if p)
# Quiets the debugger warning ipykernel prints at every kernel start.
os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

_REASON = re.compile(r"^\s*#\s*skip-reason:\s*(.+?)\s*$", re.M)


def pytest_collection_modifyitems(config, items):
    for item in items:
        options = getattr(item, "options", None)
        cell = getattr(item, "cell", None)
        if not isinstance(options, dict) or cell is None or not options.get("skip"):
            continue
        source = cell.get("source", "")
        if isinstance(source, list):
            source = "".join(source)
        match = _REASON.search(source)
        reason = match.group(1) if match else "nbval-skip (no '# skip-reason:' given)"
        item.add_marker(pytest.mark.skip(reason=reason))

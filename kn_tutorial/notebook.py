"""Helpers for the setup cell at the top of every chapter notebook.

A chapter starts with::

    import sys
    if "google.colab" in sys.modules:  # installs the pinned package, Colab only
        %pip install -q "kn_tutorial @ git+https://github.com/kn-tutorial/kn-tutorial@v0.1.0"

    from kn_tutorial.notebook import setup
    MODEL_NAME = setup(seed=0)  # "atlas" unless KN_MODEL says otherwise

The install line cannot come from this module (on Colab the module is not there
yet), so it is written out in each notebook as ``"%" + COLAB_INSTALL``;
``COLAB_SPEC`` below is the one place that says what it must be, and
``tests/test_notebook.py`` checks the notebooks against it.
"""

from __future__ import annotations

import os
import random
import sys

__all__ = [
    "REPO",
    "REPO_URL",
    "RELEASE_TAG",
    "COLAB_SPEC",
    "COLAB_INSTALL",
    "DEFAULT_MODEL",
    "on_colab",
    "model_name",
    "setup",
    "colab_url",
    "colab_badge",
]

#: GitHub "owner/name" of the book. Keep in step with ``repository.url`` in
#: ``_config.yml`` and the links in README.md (a test checks all three).
REPO = "kn-tutorial/kn-tutorial"
REPO_URL = f"https://github.com/{REPO}"
#: The release tag Colab installs; bump it together with ``version`` in pyproject.toml.
RELEASE_TAG = "v0.1.0"
#: The pip requirement the Colab setup cell installs: the package at the release tag.
COLAB_SPEC = f"kn_tutorial @ git+{REPO_URL}@{RELEASE_TAG}"
#: The install command of the Colab setup cell (run there as ``%pip install ...``).
COLAB_INSTALL = f'pip install -q "{COLAB_SPEC}"'

DEFAULT_MODEL = "atlas"
COLAB_BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def model_name() -> str:
    """The model the chapters run on: env ``KN_MODEL``, ``"atlas"`` by default."""
    return os.environ.get("KN_MODEL", "").strip() or DEFAULT_MODEL


def setup(seed: int = 0) -> str:
    """Seed Python, NumPy and torch, set plot defaults, return the model name.

    Plots get the colour-blind-safe ``tableau-colorblind10`` colour cycle and the
    perceptually uniform, colour-blind-safe ``cividis`` colormap by default.
    """
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    try:
        import torch

        torch.manual_seed(seed)  # seeds CPU and every CUDA device
    except ImportError:  # pragma: no cover - torch is a dependency
        pass

    import matplotlib as mpl
    import matplotlib.pyplot as plt

    plt.style.use("tableau-colorblind10")
    mpl.rcParams.update(
        {
            "image.cmap": "cividis",
            "figure.dpi": 100,
            "savefig.dpi": 150,
            "savefig.bbox": "tight",
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return model_name()


def colab_url(notebook_path: str, branch: str = "main") -> str:
    """The Colab URL that opens ``notebook_path`` (relative to the repo root)."""
    path = notebook_path.strip()
    while path.startswith(("./", "/")):
        path = path[2:] if path.startswith("./") else path[1:]
    if not path.endswith(".ipynb"):
        raise ValueError(f"not a notebook path: {notebook_path!r}")
    if "/" not in path:
        path = f"book/{path}"
    return f"https://colab.research.google.com/github/{REPO}/blob/{branch}/{path}"


def colab_badge(notebook_path: str, branch: str = "main", html: bool = False) -> str:
    """Markdown (or HTML with ``html=True``) for an "Open in Colab" badge.

    A bare file name such as ``"06_rome.ipynb"`` is taken to live in ``book/``.
    """
    url = colab_url(notebook_path, branch=branch)
    if html:
        return f'<a href="{url}"><img src="{COLAB_BADGE_SVG}" alt="Open In Colab"/></a>'
    return f"[![Open In Colab]({COLAB_BADGE_SVG})]({url})"

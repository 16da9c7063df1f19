"""Helpers for the setup cell at the top of every chapter notebook.

A chapter's setup cell starts with ``INSTALL_CELL`` (the pinned install, on Colab only),
then::

    from kn_tutorial.notebook import setup
    MODEL_NAME = setup(seed=0)  # "atlas" unless KN_MODEL says otherwise

On a GPU runtime (Colab with a T4, say) ``setup`` also prints which real models the
chapter can run on instead of Atlas (``gpu_offer``): gpt2-medium and gpt2-xl fit a T4,
GPT-J needs 24 GB or more. The choice is read from ``KN_MODEL``; on a CPU nothing is printed.

The install lines cannot come from this module (on Colab the module is not there
yet), so they are written out in each notebook. ``INSTALL_CELL`` below is the one place
that says what they are: the package at the release tag ``v{__version__}`` from the
repository ``REPO``. ``scripts/release.py`` writes it into every chapter and student
notebook and creates that tag; ``tests/test_notebook.py`` checks every notebook against it.
"""

from __future__ import annotations

import os
import random
import sys

from . import __version__

__all__ = [
    "REPO",
    "REPO_URL",
    "RELEASE_TAG",
    "COLAB_SPEC",
    "COLAB_INSTALL",
    "INSTALL_CELL",
    "DEFAULT_MODEL",
    "ANY_MODEL",
    "GPU_MODELS",
    "GPTJ_MIN_GB",
    "on_colab",
    "gpu_offer",
    "model_name",
    "setup",
    "claim",
    "colab_url",
    "colab_badge",
]

#: GitHub "owner/name" of the book. Keep in step with ``repository.url`` in
#: ``_config.yml`` and the links in README.md (a test checks all three).
REPO = "kn-tutorial/kn-tutorial"
REPO_URL = f"https://github.com/{REPO}"
#: The release tag Colab installs: the package's version (``kn_tutorial.__version__``, which
#: pyproject.toml reads too), tagged by ``scripts/release.py``.
RELEASE_TAG = f"v{__version__}"
#: The pip requirement the Colab setup cell installs: the package at the release tag.
COLAB_SPEC = f"kn_tutorial @ git+{REPO_URL}@{RELEASE_TAG}"
#: The install command of the Colab setup cell (run there as ``%pip install ...``).
COLAB_INSTALL = f'pip install -q "{COLAB_SPEC}"'
#: The first lines of every notebook's setup cell, exactly (``scripts/release.py`` writes them).
INSTALL_CELL = (
    "import sys\n"
    'if "google.colab" in sys.modules:  # installs the pinned release of the package, on Colab only\n'
    f"    %{COLAB_INSTALL}\n"
)

DEFAULT_MODEL = "atlas"
#: ``claim(..., models=ANY_MODEL)``: a claim checked on every model, not only Atlas.
ANY_MODEL = "any"
#: Real models offered on a GPU runtime: name -> (parameters, GPU memory of float32 weights).
GPU_MODELS = {
    "gpt2-medium": ("355M", "about 1.5 GB"),
    "gpt2-xl": ("1.5B", "about 6 GB"),
}
GPTJ = "EleutherAI/gpt-j-6b"
#: GPU memory GPT-J needs here (float16 weights, 12 GB, plus gradients and statistics).
GPTJ_MIN_GB = 24
COLAB_BADGE_SVG = "https://colab.research.google.com/assets/colab-badge.svg"


def on_colab() -> bool:
    """True inside Google Colab."""
    return "google.colab" in sys.modules


def model_name() -> str:
    """The model the chapters run on: env ``KN_MODEL``, ``"atlas"`` by default."""
    return os.environ.get("KN_MODEL", "").strip() or DEFAULT_MODEL


def _gpu_memory_gb() -> float | None:
    """Total memory of CUDA device 0 in GB, or None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 1e9


def gpu_offer(name: str | None = None) -> str | None:
    """On a GPU runtime, the text that offers the real models; None on a CPU.

    `name` is the model chosen so far (default: ``model_name()``, i.e. ``KN_MODEL``).
    """
    memory = _gpu_memory_gb()
    if memory is None:
        return None
    import torch

    name = name or model_name()
    gpu = f"{torch.cuda.get_device_name(0)}, {memory:.0f} GB"
    lines = [f"This runtime has a GPU ({gpu}). The chapter runs on {name!r}."]
    if name == DEFAULT_MODEL:
        lines.append("To run it on a real model instead, set KN_MODEL and re-run this cell, e.g.")
        lines += [f'    %env KN_MODEL={m}    # {params} parameters, {mem} of GPU memory'
                  for m, (params, mem) in GPU_MODELS.items()]
    if "gpt-j" in name.lower() or name == DEFAULT_MODEL:
        verdict = "this GPU has enough" if memory >= GPTJ_MIN_GB else "this GPU has too little"
        lines.append(f"GPT-J ({GPTJ}) needs a GPU with {GPTJ_MIN_GB} GB or more: {verdict}.")
    return "\n".join(lines)


def setup(seed: int = 0, offer: bool = True) -> str:
    """Seed Python, NumPy and torch, set plot defaults, return the model name.

    On a GPU runtime it also prints ``gpu_offer()``, the real models the chapter can run on,
    unless ``offer=False`` (for a chapter that always uses Atlas).
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
    text = gpu_offer() if offer else None
    if text:
        print(text)
    return model_name()


def claim(text: str, condition, models: tuple[str, ...] | str = (DEFAULT_MODEL,)) -> None:
    """Check a claim the chapter's text makes about particular models (Atlas by default).

    A chapter's prose quotes numbers that hold for Atlas (its 12 layers, its tables in
    ``kn_tutorial.book_data``). On the models in ``models`` the claim is checked: ``condition``
    (a bool, or a callable returning one) must be true, or AssertionError is raised with
    ``text``, so the notebook fails under ``pytest`` when the prose stops being true. On any
    other model (``KN_MODEL``: a hub model, a local folder) the claim is not checked and a note
    says so, visibly: "skipped on gpt2-xl: this claim is about Atlas: ...". Pass a callable for
    a condition that only makes sense on those models (it then is not even evaluated elsewhere).
    ``models=ANY_MODEL`` (the string ``"any"``) checks the claim whatever the model: an identity
    of the method, or a result that does not depend on the language model (chapter 2's memory
    networks). Returns None either way, so that a claim on a cell's last line prints nothing
    when it holds.
    """
    if isinstance(models, str) and models != ANY_MODEL:  # "atlas" would match by substring
        raise ValueError(f"models={models!r}: give a tuple of model names, e.g. ({models!r},), "
                         f"or {ANY_MODEL!r} for a claim that holds on every model")
    name = model_name()
    if models != ANY_MODEL and name not in models:
        about = " and ".join("Atlas" if m == DEFAULT_MODEL else m for m in models)
        print(f"skipped on {name}: this claim is about {about}: {text}")
        return
    holds = condition() if callable(condition) else condition
    if not holds:
        raise AssertionError(text)


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

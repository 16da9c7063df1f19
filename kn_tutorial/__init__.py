"""kn_tutorial: the package behind the book *Knowledge Neurons in NLP*.

Every computation the chapters show lives here, one module per idea:
`models` (layers, modules, the FFN as memory; re-exporting `loading` and the
architecture table `architectures`), `hooks` (reading and patching activations),
`weights` (exact undo), `scoring` and `tokens` (targets, subject spans), `atlas` (the
teaching model and its world), and one module per method of the book.

Layers, each importing only from the ones below it (tests/test_layers.py):
data (`atlas`, `book_data`, ...) < model plumbing (`models`, `hooks`, `tokens`, ...) <
methods (`rome`, `memit`, `tracing`, ...) < book and build (`atlas_build`, which trains,
probes and reports on Atlas; `notebook`, `plots`, `exercises`).
"""
from .models import load_model
from .progress import set_progress

__version__ = "0.1.0"
__all__ = ["load_model", "set_progress", "__version__"]

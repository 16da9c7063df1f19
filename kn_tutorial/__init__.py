"""kn_tutorial: the package behind the book *Knowledge Neurons in NLP*.

Every computation the chapters show lives here, one module per idea:
`models` (loading, the architecture table), `hooks` (reading and patching activations),
`weights` (exact undo), `scoring` and `tokens` (targets, subject spans), `atlas` (the
teaching model and its world), and one module per method of the book.
"""
from .models import load_model
from .progress import set_progress

__version__ = "0.1.0"
__all__ = ["load_model", "set_progress", "__version__"]

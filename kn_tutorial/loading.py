"""Loading causal language models (the Atlas teaching model, a local folder or a hub name) and
choosing their device.

`load_model` returns (model, tokenizer) in eval mode and checks at once that the family is in
the architecture table (`architectures.ARCHS`), so an unsupported model fails here, not in a
later chapter. `models` re-exports every name of this module.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from .architectures import get_arch


# --------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------

def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`device` as a torch.device; None picks "cuda" when available, else "cpu"."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"device {str(device)!r} was requested but CUDA is not available here; "
            f"pass device='cpu' or device=None (auto)."
        )
    return device


def get_device(model: nn.Module) -> torch.device:
    """Device of the model's (first) parameter."""
    return next(model.parameters()).device


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------

ATLAS = "atlas"
MODEL_NAME = os.environ.get("KN_MODEL", ATLAS)  # read once at import; see default_model_name()
_BIG_MODEL_PARAMS = 2e9  # above this, dtype=None loads float16 on CUDA (GPT-J 6B: yes, gpt2-xl: no)


def default_model_name() -> str:
    """The model the notebooks use: $KN_MODEL, default "atlas"."""
    return os.environ.get("KN_MODEL", ATLAS)


def atlas_model_dir() -> Path:
    """Folder holding the shipped Atlas weights and tokenizer."""
    return Path(__file__).resolve().parent / "atlas" / "model"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Quick TCP check of the Hugging Face endpoint, so offline machines fail fast.

    (Without it transformers retries for ~25 s before giving up.)
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _estimate_n_params(config) -> float:
    """Rough parameter count from a config: 12 L d^2 + vocab d."""
    d = getattr(config, "hidden_size", 0) or 0
    n_layer = getattr(config, "num_hidden_layers", 0) or 0
    return 12 * n_layer * d * d + (getattr(config, "vocab_size", 0) or 0) * d


def _finish_tokenizer(tokenizer):
    """Make sure eos and pad tokens exist (GPT-2 convention: pad = eos = <|endoftext|>)."""
    if tokenizer.eos_token is None and "<|endoftext|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|endoftext|>"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _dtype_kwarg() -> str:
    """from_pretrained's dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def _load_from(source: str, device: torch.device, dtype: torch.dtype | None, local_only: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    if dtype is None:
        big = _estimate_n_params(config) > _BIG_MODEL_PARAMS
        dtype = torch.float16 if (device.type == "cuda" and big) else torch.float32
    from transformers.utils import logging as hf_logging

    from .progress import progress_enabled

    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress_enabled():  # transformers' "Loading weights" bar follows the package switch too
        hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, config=config, local_files_only=local_only, **{_dtype_kwarg(): dtype}
        )
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    return model, tokenizer


def load_model(
    name: str | None = ATLAS,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
):
    """Load a causal LM and its tokenizer; returns (model, tokenizer), model in eval mode.

    name:   "atlas" (default; the package's offline teaching model in
            kn_tutorial/atlas/model/), a local directory, or a Hugging Face hub name
            such as "gpt2-xl" (tried from the local cache first, then the network).
            None means default_model_name() ($KN_MODEL).
    device: None picks "cuda" when available, else "cpu".
    dtype:  None keeps float32, except hub/local models with more than ~2B
            parameters on CUDA, which load in float16 (GPT-J 6B fits a 24 GB card).
    The tokenizer gets pad_token = eos_token when it has no pad token.
    """
    name = default_model_name() if name is None else name
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ValueError(f"load_model needs a model name or folder, got {name!r}: use 'atlas' (the offline "
                         f"teaching model), a local directory, or a Hugging Face name such as 'gpt2'")
    name = str(name) if isinstance(name, os.PathLike) else name
    device = pick_device(device)

    if name == ATLAS:
        path = atlas_model_dir()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"The Atlas model is not built yet: {path} has no config.json. "
                f"Build it with `python -m kn_tutorial.atlas train` (a few minutes on a CPU), "
                f"or pass another model name, e.g. load_model('gpt2')."
            )
        model, tokenizer = _load_from(str(path), device, dtype, local_only=True)
    elif Path(name).expanduser().is_dir():
        model, tokenizer = _load_from(str(Path(name).expanduser()), device, dtype, local_only=True)
    else:
        try:
            model, tokenizer = _load_from(name, device, dtype, local_only=True)  # the HF cache
        except OSError as cache_error:
            if not _hub_reachable():
                raise OSError(
                    f"Cannot load {name!r}: it is not a local directory, not in the Hugging Face "
                    f"cache, and the hub cannot be reached (offline or HF_HUB_OFFLINE=1). Fixes: run "
                    f"on a machine with network access; or download it elsewhere "
                    f"(`hf download {name} --local-dir DIR`) and pass the local path; "
                    f"or use the offline model: load_model('atlas')."
                ) from cache_error
            model, tokenizer = _load_from(name, device, dtype, local_only=False)

    get_arch(model)  # fail now, with the list of supported families, not in a later chapter
    model.to(device).eval()
    return model, _finish_tokenizer(tokenizer)

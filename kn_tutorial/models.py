"""Loading causal language models and finding our way around inside them.

One small table, `ARCHS`, says where the pieces of each supported family live
(GPT-2, GPT-J, GPT-NeoX/Pythia, Llama), keyed by Hugging Face's
`config.model_type`. Everything else in the package asks this module, never a
hard-coded attribute path, so a chapter written for GPT-2 runs on Pythia too.

The FFN as a key-value memory follows Geva et al. (2021), "Transformer
Feed-Forward Layers Are Key-Value Memories", in the book's notation

    FF(x) = f(x K^T + b_K) V + b_V,    K, V: [d_ff, d_model]

row k_i of K is the i-th key (input projection), row v_i of V the i-th value
(output projection), and the "key activation" f(x k_i + b_i) is the coefficient
of v_i. For Llama the key activation is act(x g_i) * (x k_i): gate times up
projection; `key_matrix` returns the up projection, `gate_matrix` the gate.

ROME (Meng et al. 2022) writes the same output projection the other way round,
as a matrix W: [d_model, d_ff] with W @ key = value; `mlp_out_weight` returns
that orientation as a view of the parameter, so in-place edits of it edit the
model.

Weight orientation: `nn.Linear` stores weight as [out, in]; GPT-2's `Conv1D`
stores it as [in, out] (transposed). Every transposition below is written out.
"""

from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn


# --------------------------------------------------------------------------------------
# The architecture table
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArchSpec:
    """Where things live in one model family (dotted attribute paths).

    Paths marked (model) are relative to the *ForCausalLM model, paths marked
    (block) are relative to one transformer block, e.g. `transformer.h.3`.
    """

    family: str                # human-readable family name, e.g. "GPT-2"
    blocks: str                # (model) the ModuleList of blocks, e.g. "transformer.h"
    attn: str                  # (block) attention module
    mlp: str                   # (block) the whole MLP / FFN module
    mlp_in: str                # (block) input projection d_model -> d_ff (the keys)
    mlp_gate: str | None       # (block) Llama's gate projection d_model -> d_ff, else None
    mlp_out: str               # (block) output projection d_ff -> d_model (the values)
    mlp_act: str               # (block) the MLP's activation module f
    embed: str                 # (model) token embedding, weight [vocab, d_model]
    final_norm: str            # (model) the norm applied after the last block
    unembed: str               # (model) the output projection to the vocabulary
    conv1d: bool = False       # True for GPT-2: Conv1D weights are [in, out], not [out, in]


ARCHS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        family="GPT-2", blocks="transformer.h", attn="attn", mlp="mlp",
        mlp_in="mlp.c_fc", mlp_gate=None, mlp_out="mlp.c_proj", mlp_act="mlp.act",
        embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head",
        conv1d=True,
    ),
    "gptj": ArchSpec(
        family="GPT-J", blocks="transformer.h", attn="attn", mlp="mlp",
        mlp_in="mlp.fc_in", mlp_gate=None, mlp_out="mlp.fc_out", mlp_act="mlp.act",
        embed="transformer.wte", final_norm="transformer.ln_f", unembed="lm_head",
    ),
    # Pythia checkpoints call the unembedding `embed_out`; transformers 5 renames it
    # to `lm_head` while loading, so `lm_head` is the module we find.
    "gpt_neox": ArchSpec(
        family="GPT-NeoX / Pythia", blocks="gpt_neox.layers", attn="attention", mlp="mlp",
        mlp_in="mlp.dense_h_to_4h", mlp_gate=None, mlp_out="mlp.dense_4h_to_h", mlp_act="mlp.act",
        embed="gpt_neox.embed_in", final_norm="gpt_neox.final_layer_norm", unembed="lm_head",
    ),
    "llama": ArchSpec(
        family="Llama", blocks="model.layers", attn="self_attn", mlp="mlp",
        mlp_in="mlp.up_proj", mlp_gate="mlp.gate_proj", mlp_out="mlp.down_proj", mlp_act="mlp.act_fn",
        embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
    ),
}

# The module names `get_module` understands, mapped to the ArchSpec field. These are module
# kinds (where a weight lives), not hook points (where an activation is read): "mlp_in" and
# "mlp_out" here are the MLP's input and output projection modules, while the hook points of the
# same names are the input and output of the whole MLP, and the activation between the two
# projections is hook point "key" (the input of module "mlp_out"). The hook points, with their
# shapes, are defined once in hooks.HOOK_POINTS.
MODULE_KINDS = ("attn", "mlp", "mlp_in", "mlp_gate", "mlp_out", "mlp_act")


def get_arch(model: nn.Module) -> ArchSpec:
    """The ArchSpec of `model`, looked up by `model.config.model_type`."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ValueError(
            f"{type(model).__name__} has no `config.model_type`: kn_tutorial works on Hugging Face "
            f"causal LMs (e.g. GPT2LMHeadModel); load one with kn_tutorial.load_model."
        )
    if model_type not in ARCHS:
        supported = ", ".join(f"{k!r} ({v.family})" for k, v in ARCHS.items())
        raise ValueError(
            f"model_type {model_type!r} is not supported. Supported model types: {supported}. "
            f"To add a family, add an ArchSpec entry to kn_tutorial.models.ARCHS."
        )
    return ARCHS[model_type]


# --------------------------------------------------------------------------------------
# Sizes, layers and modules
# --------------------------------------------------------------------------------------

def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(get_arch(model).blocks)


def n_layers(model: nn.Module) -> int:
    """Number of transformer blocks."""
    return len(_blocks(model))


def d_model(model: nn.Module) -> int:
    """Width of the residual stream."""
    return embedding_matrix(model).shape[1]


def d_ff(model: nn.Module) -> int:
    """Number of FFN neurons (memories) per layer."""
    return key_matrix(model, 0).shape[0]


def check_layer(model: nn.Module, layer: int) -> int:
    """Validate a layer index and return it as a non-negative int.

    Negative indices count from the end as in Python (-1 is the last block).
    Raises TypeError for non-integers and IndexError when out of range.
    """
    if isinstance(layer, bool) or not hasattr(layer, "__index__"):
        raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
    layer = int(layer.__index__())
    n = n_layers(model)
    if not -n <= layer < n:
        raise IndexError(
            f"layer {layer} is out of range: this model has {n} layers "
            f"(0-{n - 1}, or -{n} to -1 counting from the end)"
        )
    return layer % n


def get_block(model: nn.Module, layer: int) -> nn.Module:
    """Transformer block number `layer`."""
    return _blocks(model)[check_layer(model, layer)]


def get_module(model: nn.Module, layer: int, which: str) -> nn.Module | None:
    """A module inside block `layer`: one of MODULE_KINDS.

    Returns None only for "mlp_gate" on families without a gate (all but Llama).
    """
    if which not in MODULE_KINDS:
        raise ValueError(f"unknown module {which!r}; choose one of {MODULE_KINDS}")
    path = getattr(get_arch(model), which)
    if path is None:
        return None
    return get_block(model, layer).get_submodule(path)


def module_name(model: nn.Module, layer: int, which: str) -> str:
    """Full dotted name of a block module, e.g. 'transformer.h.3.mlp.c_proj'."""
    spec = get_arch(model)
    path = getattr(spec, which) if which in MODULE_KINDS else None
    if path is None:
        raise ValueError(f"{spec.family} has no module {which!r}")
    return f"{spec.blocks}.{check_layer(model, layer)}.{path}"


def embedding_matrix(model: nn.Module) -> Tensor:
    """Token embedding matrix, [vocab, d_model] (the parameter itself)."""
    return model.get_submodule(get_arch(model).embed).weight


def unembedding_matrix(model: nn.Module) -> Tensor:
    """Unembedding matrix, [vocab, d_model]: logits = final_norm(h) @ U^T (+ bias if any).

    For GPT-2 this is the same tensor as the embedding matrix (tied weights).
    """
    return model.get_submodule(get_arch(model).unembed).weight


def final_norm(model: nn.Module) -> nn.Module:
    """The norm applied to the last hidden state before unembedding (ln_f / RMSNorm)."""
    return model.get_submodule(get_arch(model).final_norm)


def mlp_activation(model: nn.Module, layer: int) -> nn.Module:
    """The FFN nonlinearity f of block `layer` (GELU for GPT-2/J/NeoX, SiLU for Llama)."""
    return get_module(model, layer, "mlp_act")


def _gelu_tanh(x: Tensor) -> Tensor:
    return torch.nn.functional.gelu(x, approximate="tanh")


@contextmanager
def fused_activations(model: nn.Module):
    """Within the block, GPT-2's "gelu_new" MLP activation (transformers' NewGELUActivation,
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) written as five tensor operations) runs as
    torch's fused kernel of the same formula, F.gelu(x, approximate="tanh"): the same function,
    equal to float rounding (about 1e-7 relative in float32), about three times faster on CPU.

    Only the module's forward is replaced (an instance attribute, removed on exit), so hooks on
    the activation module (Recorder, patch, IG's scaling) still run. Other activations, and a
    module whose forward is already replaced (nested use), are left alone. Speed only: the
    engines use it, the literal `*_naive` implementations do not.
    """
    from transformers.activations import NewGELUActivation

    swapped = []
    try:
        for layer in range(n_layers(model)):
            act = mlp_activation(model, layer)
            if type(act) is NewGELUActivation and "forward" not in act.__dict__:
                act.forward = _gelu_tanh
                swapped.append(act)
        yield model
    finally:
        for act in swapped:
            del act.forward


# --------------------------------------------------------------------------------------
# The FFN as key-value memory (Geva et al. 2021)
# --------------------------------------------------------------------------------------
# All matrices are returned as views of the parameters (no copy): in-place edits under
# torch.no_grad() change the model. Use `.detach().clone()` for a private copy.

def _as_out_in(model: nn.Module, module: nn.Module) -> Tensor:
    """Weight of a projection in nn.Linear orientation [out, in], as a view."""
    weight = module.weight
    return weight.T if get_arch(model).conv1d else weight  # Conv1D stores [in, out]


def key_matrix(model: nn.Module, layer: int) -> Tensor:
    """K: [d_ff, d_model], row i is key k_i (the MLP input projection).

    GPT-2: c_fc.weight is [d_model, d_ff] (Conv1D), so K = c_fc.weight.T.
    Llama: the up projection; its key activation is act(x g_i) * (x k_i) with g_i
    the rows of `gate_matrix`.
    """
    return _as_out_in(model, get_module(model, layer, "mlp_in"))


def gate_matrix(model: nn.Module, layer: int) -> Tensor | None:
    """Llama's gate projection G: [d_ff, d_model]; None for ungated families."""
    gate = get_module(model, layer, "mlp_gate")
    return None if gate is None else _as_out_in(model, gate)


def key_bias(model: nn.Module, layer: int) -> Tensor | None:
    """b_K: [d_ff], bias of the input projection, or None (Llama: only if mlp_bias=True)."""
    return get_module(model, layer, "mlp_in").bias


def value_matrix(model: nn.Module, layer: int) -> Tensor:
    """V: [d_ff, d_model], row i is value v_i (the MLP output projection).

    GPT-2: c_proj.weight is already [d_ff, d_model] (Conv1D [in, out]).
    Linear families: weight is [d_model, d_ff], so V = weight.T.
    """
    return mlp_out_weight(model, layer).T


def value_bias(model: nn.Module, layer: int) -> Tensor | None:
    """b_V: [d_model], bias of the output projection, or None (Llama by default)."""
    return get_module(model, layer, "mlp_out").bias


def mlp_out_weight(model: nn.Module, layer: int) -> Tensor:
    """W: [d_model, d_ff] with W @ key (+ b_V) = MLP output (ROME's orientation).

    A view of the parameter: GPT-2 Conv1D -> c_proj.weight.T; nn.Linear -> weight
    itself. Edit it in place under torch.no_grad(), e.g. `W += u[:, None] * k[None, :]`.
    """
    return _as_out_in(model, get_module(model, layer, "mlp_out"))


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

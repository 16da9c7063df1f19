"""Finding our way around inside a causal language model: layers, modules, and the FFN as memory.

One small table, `ARCHS`, says where the pieces of each supported family live
(GPT-2, GPT-J, GPT-NeoX/Pythia, Llama), keyed by Hugging Face's
`config.model_type`. Everything else in the package asks this module, never a
hard-coded attribute path, so a chapter written for GPT-2 runs on Pythia too.
The table itself lives in `architectures`, loading and devices in `loading`; their public
names are re-exported here, so `from kn_tutorial.models import load_model, ARCHS` keeps working.

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

from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .architectures import ARCHS, MODULE_KINDS, ArchSpec, get_arch  # noqa: F401  (re-exported)
from .loading import (  # noqa: F401  (re-exported)
    ATLAS, MODEL_NAME, atlas_model_dir, default_model_name, get_device, load_model, pick_device,
)


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


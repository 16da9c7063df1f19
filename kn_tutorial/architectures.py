"""Where the pieces of each supported model family live: the architecture table.

`ARCHS`, keyed by Hugging Face's `config.model_type`, gives for GPT-2, GPT-J, GPT-NeoX/Pythia
and Llama the dotted attribute path of the blocks, the attention and MLP modules, the MLP's
projections (Geva et al.'s keys and values), the embedding, the final norm and the unembedding.
Everything else in the package asks this table (through `models`), never a hard-coded attribute
path, so a chapter written for GPT-2 runs on Pythia too. To support a family, add an entry here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


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
            f"To add a family, add an ArchSpec entry to ARCHS in kn_tutorial/architectures.py."
        )
    return ARCHS[model_type]


"""Reading and patching activations with PyTorch forward hooks.

A *site* (a hook point) names an activation inside block `layer`, for every family in
`models.ARCHS`. This table is the package's one vocabulary of places (`HOOK_POINTS` holds
it; input_ids of shape [batch, pos]):

    site       location in block l                          shape                  also called
    resid_pre  input of the block (residual stream before)  [batch, pos, d_model]  h^(l-1); tracing's noise goes
                                                                                   into resid_pre of block 0
    attn_out   output of the attention module (element 0)   [batch, pos, d_model]  tracing kind "attn" (a_t^l)
    mlp_in     input of the MLP module (after its norm)     [batch, pos, d_model]  Geva's x
    key        input of the MLP output projection           [batch, pos, d_ff]     Geva's coefficients m_i,
                                                                                   Dai's neuron activations
                                                                                   w_i^(l), ROME's key k
    mlp_out    output of the MLP module                     [batch, pos, d_model]  tracing kind "mlp" (m_t^l),
                                                                                   Geva's FF(x)
    hidden     output of the block (residual stream after)  [batch, pos, d_model]  tracing kind "hidden" (h_t^l),
                                                                                   TransformerLens's resid_post

Aliases, accepted wherever a site is (a Recorder keeps the name it was given): "attn" is
"attn_out" and "mlp" is "mlp_out" (causal tracing's kinds), "resid_post" is "hidden"
(TransformerLens's word). `canonical_site` resolves them; `describe_hook_points(model)` gives
the table with the model's sizes. "key" is the activation m_i (for
Llama act(x G^T) * (x K^T)); knowledge neurons (Dai et al. 2022) are indices into its last
dimension, and the key *row* k_i is a weight (`models.key_matrix`). Module names are another
namespace: `models.MODULE_KINDS` "mlp_in" and "mlp_out" are the MLP's two projection
*modules*; site "key" is the input of module "mlp_out", site "mlp_out" the output of the
whole MLP.

`hidden` at layer l equals `output_hidden_states[l + 1]` for every layer but the
last: Hugging Face applies the final norm to the last entry, so
`output_hidden_states[L] == final_norm(hidden at layer L-1)` (checked for
GPT-2, GPT-J, GPT-NeoX and Llama in transformers 5.24).

Every hook is removed when its `with` block ends, also on exceptions. Our
hooks run before any hook transformers installs itself (it records
`output_hidden_states` with hooks in v5), so a patched "hidden" shows up in
`output_hidden_states`; among our own hooks on one module, the one registered
first runs first (a Recorder opened inside a patch sees the patched value).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import Tensor, nn

from .models import check_layer, d_ff, d_model, get_block, get_module


class HookPoint(NamedTuple):
    """One row of the vocabulary: where the site is, its width, how it is hooked, its other names."""

    location: str     # inside block l
    width: str        # "d_model" or "d_ff": the activation is [batch, pos, width]
    module: str       # the hooked module: "block", or a models.MODULE_KINDS entry
    pre: bool         # True: the module's input (a forward pre-hook); False: its output
    also_called: str  # the words the package and the papers use for the same place


HOOK_POINTS: dict[str, HookPoint] = {
    "resid_pre": HookPoint("input of the block (residual stream before it)", "d_model", "block", True,
                           "h^(l-1); tracing adds its noise to resid_pre of block 0"),
    "attn_out": HookPoint("output of the attention module (element 0 if a tuple)", "d_model", "attn", False,
                          'tracing kind "attn" (a_t^l)'),
    "mlp_in": HookPoint("input of the MLP module (after the block's layer norm)", "d_model", "mlp", True,
                        "Geva's x"),
    "key": HookPoint("input of the MLP output projection", "d_ff", "mlp_out", True,
                     "Geva's coefficients m_i, Dai's neuron activations w_i^(l), ROME's key k"),
    "mlp_out": HookPoint("output of the MLP module", "d_model", "mlp", False,
                         'tracing kind "mlp" (m_t^l), Geva\'s FF(x)'),
    "hidden": HookPoint("output of the block (residual stream after it)", "d_model", "block", False,
                        'tracing kind "hidden" (h_t^l), TransformerLens\'s resid_post'),
}
SITES = tuple(HOOK_POINTS)  # the canonical names
SITE_ALIASES = {"attn": "attn_out", "mlp": "mlp_out", "resid_post": "hidden"}


def canonical_site(site: str) -> str:
    """The canonical name of a site or alias ("mlp" -> "mlp_out"); a clear error for anything else."""
    name = SITE_ALIASES.get(site, site)
    if name not in HOOK_POINTS:
        raise ValueError(f"unknown site {site!r}; choose one of {SITES} (or an alias: {SITE_ALIASES})")
    return name


class HookPointRow(NamedTuple):
    """One hook point as `describe_hook_points` shows it for a model."""

    name: str                 # the canonical name
    location: str             # inside block l
    shape: str                # e.g. "[batch, pos, d_ff=1024]", with the model's size
    aliases: tuple[str, ...]  # other names accepted for it


def describe_hook_points(model: nn.Module) -> list[HookPointRow]:
    """The vocabulary table (`HOOK_POINTS`) for `model`, one row per hook point, widths filled in.

        for row in describe_hook_points(model):
            print(row.name, row.shape, row.location)
    """
    widths = {"d_model": d_model(model), "d_ff": d_ff(model)}
    return [
        HookPointRow(name, point.location, f"[batch, pos, {point.width}={widths[point.width]}]",
                     tuple(alias for alias, target in SITE_ALIASES.items() if target == name))
        for name, point in HOOK_POINTS.items()
    ]


Site = tuple[str, int]  # (site name, layer)


def site_module(model: nn.Module, site: str, layer: int) -> tuple[nn.Module, bool]:
    """(module to hook, is_pre_hook) for an activation site (or an alias of one)."""
    point = HOOK_POINTS[canonical_site(site)]
    module = get_block(model, layer) if point.module == "block" else get_module(model, layer, point.module)
    return module, point.pre


# --------------------------------------------------------------------------------------
# Low level: one hook that reads (and may replace) the activation at a site
# --------------------------------------------------------------------------------------

def _mark(hook: Callable) -> Callable:
    hook._kn_tutorial_hook = True  # lets count_hooks/remove_hooks find ours and only ours
    return hook


def _is_ours(hook: Callable) -> bool:
    return getattr(hook, "_kn_tutorial_hook", False)


def _add_hook(module: nn.Module, pre: bool, hook: Callable) -> torch.utils.hooks.RemovableHandle:
    """Register `hook` before foreign hooks, after our earlier hooks on this module."""
    register = module.register_forward_pre_hook if pre else module.register_forward_hook
    handle = register(_mark(hook), with_kwargs=True, prepend=True)
    hooks = module._forward_pre_hooks if pre else module._forward_hooks
    earlier_ours = [key for key, fn in hooks.items() if _is_ours(fn) and key != handle.id]
    for key in reversed(earlier_ours):  # [ours in registration order..., new, foreign...]
        hooks.move_to_end(key, last=False)
    return handle


def _site_hook(pre: bool, site: str, fn: Callable[[Tensor], Tensor | None]) -> Callable:
    """A hook calling fn(activation); a returned tensor replaces the activation."""

    def replaced(old: Tensor, new: Tensor | None) -> Tensor | None:
        if new is None or new is old:
            return None
        if not isinstance(new, Tensor) or new.shape != old.shape:
            got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
            raise ValueError(
                f"patch function for site {site!r} must return a tensor of shape "
                f"{tuple(old.shape)} (or None), got {got}"
            )
        return new.to(device=old.device, dtype=old.dtype)

    if pre:
        def pre_hook(module, args, kwargs):
            if args:
                new = replaced(args[0], fn(args[0]))
                return None if new is None else ((new, *args[1:]), kwargs)
            if "hidden_states" in kwargs:
                old = kwargs["hidden_states"]
                new = replaced(old, fn(old))
                return None if new is None else (args, {**kwargs, "hidden_states": new})
            raise RuntimeError(
                f"cannot find the input of {type(module).__name__} for site {site!r}: "
                f"no positional argument and no `hidden_states` keyword"
            )
        return pre_hook

    def forward_hook(module, args, kwargs, output):
        if isinstance(output, tuple):  # e.g. attention returns (out, attn_weights)
            new = replaced(output[0], fn(output[0]))
            return None if new is None else (new, *output[1:])
        new = replaced(output, fn(output))
        return new
    return forward_hook


@contextmanager
def _hooks(model: nn.Module, site_fns: Iterable[tuple[str, int, Callable]]) -> Iterator[None]:
    """Install one site hook per (site, layer, fn); remove them all on exit."""
    handles = []
    try:
        for site, layer, fn in site_fns:
            module, pre = site_module(model, site, layer)
            handles.append(_add_hook(module, pre, _site_hook(pre, site, fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------

def _as_site_list(sites: Site | Sequence[Site]) -> list[Site]:
    if isinstance(sites, tuple) and len(sites) == 2 and isinstance(sites[0], str):
        return [sites]  # a single (site, layer)
    return list(sites)


class Recorder:
    """Context manager recording activations at (site, layer) pairs.

        with Recorder(model, [("key", 3), ("hidden", 5)]) as rec:
            logits = model(input_ids).logits
        rec.activations[("key", 3)]   # [batch, seq, d_ff]

    detach=True stores detached tensors; detach=False keeps the autograd graph
    (for gradients with respect to an activation). If the model runs several times
    inside the block, the last forward pass wins. Keys are (site, layer) exactly as
    given (a layer of -1 stays -1).
    """

    def __init__(self, model: nn.Module, sites: Site | Sequence[Site], detach: bool = True):
        self.model = model
        self.sites = _as_site_list(sites)
        for site, layer in self.sites:
            site_module(model, site, layer)  # validate now, with a clear error
        self.detach = detach
        self.activations: dict[Site, Tensor] = {}
        self._context = None

    def _reader(self, key: Site) -> Callable[[Tensor], None]:
        def read(activation: Tensor) -> None:
            self.activations[key] = activation.detach() if self.detach else activation
        return read

    def __enter__(self) -> "Recorder":
        self._context = _hooks(self.model, [(s, l, self._reader((s, l))) for s, l in self.sites])
        self._context.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        context, self._context = self._context, None
        context.__exit__(*exc)

    def __getitem__(self, key: Site) -> Tensor:
        return self.activations[key]


def record(model: nn.Module, sites: Site | Sequence[Site], detach: bool = True, **forward_kwargs) -> dict[Site, Tensor]:
    """Run model(**forward_kwargs) once and return {(site, layer): activation}.

    With detach=True the forward runs under torch.no_grad(); with detach=False
    the activations keep their graph.
        acts = record(model, [("key", 2)], input_ids=ids)
    """
    with torch.set_grad_enabled(torch.is_grad_enabled() and not detach):
        with Recorder(model, sites, detach=detach) as rec:
            model(**forward_kwargs)
    return rec.activations


# --------------------------------------------------------------------------------------
# Patching
# --------------------------------------------------------------------------------------

@contextmanager
def patch(model: nn.Module, site: str, layer: int, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """Replace the activation at (site, layer) by fn(activation) inside the block.

    fn gets the activation ([b, s, d_model] or [b, s, d_ff] for "key") and returns a
    tensor of the same shape; returning None keeps it (fn may then have changed it
    in place, which is only safe when no gradients are needed). Patches stack: nest
    them, or use contextlib.ExitStack; on one site they apply in the order entered.
        with patch(model, "mlp_out", 3, torch.zeros_like):
            logits = model(ids).logits
    """
    with _hooks(model, [(site, layer, fn)]):
        yield


def _index(idx, size: int, what: str) -> Tensor:
    """Indices as a 1-D long tensor in [0, size), accepting Python-style negatives."""
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1)
    bad = (idx < -size) | (idx >= size)
    if bad.any():
        raise IndexError(f"{what} {idx[bad].tolist()} out of range: there are {size} {what}s")
    return idx % size


@contextmanager
def set_neurons(
    model: nn.Module,
    layer: int,
    neurons: int | Sequence[int] | Tensor,
    value: float | Tensor | None = None,
    scale: float | Tensor | None = None,
    positions: int | Sequence[int] | None = None,
) -> Iterator[None]:
    """Set or scale the key activations of chosen FFN neurons in block `layer`.

    Give exactly one of
      value: the activation is set to it (0.0 suppresses the neuron);
      scale: the activation is multiplied by it (2.0 amplifies it).
    A tensor value/scale of shape [len(neurons)] gives one number per neuron.
    positions: sequence positions to change (negatives count from the end, -1 is
    the last token); None changes every position.
        with set_neurons(model, 4, [17, 230], value=0.0):   # suppress two neurons
            probs = model(ids).logits.softmax(-1)
    """
    if (value is None) == (scale is None):
        raise ValueError("set_neurons needs exactly one of value= (set) or scale= (multiply)")
    check_layer(model, layer)

    def edit(key: Tensor) -> Tensor:  # key: [b, s, d_ff]
        neuron_idx = _index(neurons, key.shape[-1], "neuron").to(key.device)
        seq = key.shape[-2]
        pos_idx = torch.arange(seq) if positions is None else _index(positions, seq, "position")
        pos_idx = pos_idx.to(key.device)
        where = (..., pos_idx[:, None], neuron_idx[None, :])  # selects [b, P, N]
        new = key.clone()
        if value is not None:
            new[where] = torch.as_tensor(value, dtype=key.dtype, device=key.device)
        else:
            new[where] = key[where] * torch.as_tensor(scale, dtype=key.dtype, device=key.device)
        return new

    with patch(model, "key", layer, edit):
        yield


# --------------------------------------------------------------------------------------
# Housekeeping
# --------------------------------------------------------------------------------------

def count_hooks(model: nn.Module) -> int:
    """Number of kn_tutorial hooks currently installed anywhere in `model` (normally 0)."""
    return sum(
        _is_ours(fn)
        for module in model.modules()
        for hooks in (module._forward_hooks, module._forward_pre_hooks)
        for fn in hooks.values()
    )


def remove_hooks(model: nn.Module) -> int:
    """Remove every kn_tutorial hook left in `model` (e.g. after a hand-called __enter__).

    Leaves hooks installed by transformers or by you untouched; returns how many it removed.
    """
    removed = 0
    for module in model.modules():
        for hooks, extra in ((module._forward_hooks, module._forward_hooks_with_kwargs),
                             (module._forward_pre_hooks, module._forward_pre_hooks_with_kwargs)):
            for key in [k for k, fn in hooks.items() if _is_ours(fn)]:
                del hooks[key]
                extra.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)
                removed += 1
    return removed

"""Snapshots of weights that restore them bit for bit.

Every method in the book that edits a model (knowledge-neuron erase/update,
ROME, MEMIT) edits parameters in place; this module makes each edit undoable:

    with snapshot_layers(model, [17]) as snap:     # ROME on gpt2-xl edits layer 17
        W = models.mlp_out_weight(model, 17)
        rome.apply_rank_one(W, u, k_star, residual)  # W += Λ uᵀ, in place
        evaluate(model)
        print(snap.changed())                      # ['transformer.h.17.mlp.c_proj.weight']
    # here the weights are exactly the originals again (torch.equal)

(`rome.edit(model, tokenizer, request, hparams)` does the same itself: it returns a handle whose
`restore()` undoes the edit.)

The snapshot is a clone of each tensor's data; restoring copies it back into
the same storage, so edits made through views (e.g. `models.mlp_out_weight`,
which is `c_proj.weight.T` for GPT-2's Conv1D) are undone too. Every function in
the package that changes weights follows this convention: it returns or records
what it changed, and a context manager restores the originals bit for bit.

Restore order. Edits that change the same tensor stack up: edit 2's snapshot holds the weights
*with* edit 1 in them, so restoring edit 1 and then edit 2 would bring edit 1 back. An edit's
snapshot is therefore made with `track=True` (every editing method does this): tracked snapshots
form a stack per tensor, and restoring one while a later tracked edit of the same tensor is
still applied raises `RestoreOrderError` ("restore the later edit first"), weights untouched.
Restoring a tracked snapshot a second time does nothing (the edit is already undone; copying its
originals again could erase an edit made since). Untracked snapshots (`preserve`, plain
`WeightSnapshot`) are checkpoints: restoring one always puts its weights back, and the tracked
edits made after it on the same tensors count as undone by it.
"""

from __future__ import annotations

import itertools
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from .models import MODULE_KINDS, check_layer, get_module, module_name

Params = nn.Module | Mapping[str, Tensor] | Iterable[tuple[str, Tensor]] | Iterable[Tensor]


class RestoreOrderError(RuntimeError):
    """An edit was restored while a later edit of the same weights is still applied."""


_ORDER = itertools.count()
_LIVE: "weakref.WeakSet[WeightSnapshot]" = weakref.WeakSet()  # tracked snapshots whose edit is applied


def _storage_key(tensor: Tensor) -> tuple:
    """The memory a tensor lives in (views of one parameter share it)."""
    return (tensor.device.type, tensor.device.index, tensor.untyped_storage().data_ptr())


class Restorable:
    """Mixin for the handle an editing method returns: it holds a `snapshot` (a WeightSnapshot)
    and undoes the edit bit for bit with `.restore()` or at the end of a `with` block."""

    snapshot: "WeightSnapshot"

    def restore(self) -> None:
        self.snapshot.restore()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.restore()


def _named(params: Params) -> list[tuple[str, Tensor]]:
    """Normalise the accepted inputs to a list of (name, tensor)."""
    if isinstance(params, nn.Module):
        return list(params.named_parameters())
    if isinstance(params, Mapping):
        return list(params.items())
    items = list(params)
    named = []
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            named.append((f"param{i}", item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor):
            named.append((str(item[0]), item[1]))
        else:
            raise TypeError(
                f"cannot snapshot {type(item).__name__}: pass a module, a dict name -> tensor, "
                f"or a list of (name, tensor) pairs such as model.named_parameters()"
            )
    return named


class WeightSnapshot:
    """A copy of some parameters that can be put back exactly.

    params: a module (all its parameters), a dict {name: tensor}, or a list of
            (name, tensor) pairs; tensors are the live parameters, not copies.
    offload: keep the copies on the CPU (saves accelerator memory for big layers).

    track: this snapshot is an edit's undo record (see "Restore order" above): it may only be
            restored while no later tracked edit of the same tensors is applied, and only once.
    label: how errors name the edit (e.g. "ROME edit of 'Kuwait'").

    restore() copies the originals back (untracked: any number of times; tracked: once, later
    calls do nothing); used as a context manager it restores on exit, also on exceptions.
    changed() names the parameters that differ now; deltas() gives current - original.
    """

    def __init__(self, params: Params, offload: bool = False, track: bool = False, label: str = ""):
        self.track, self.label, self.order = track, label or "an edit", next(_ORDER)
        self.undone = False
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.originals: list[Tensor] = []
        for name, param in _named(params):
            if name in self.names:
                raise ValueError(f"parameter name {name!r} appears twice in the snapshot")
            self.names.append(name)
            self.params.append(param)
            copy = param.detach().clone()
            self.originals.append(copy.cpu() if offload else copy)
        # a tensor is the same if it is the same object (kept across model.to(...)) or shares memory (views)
        self._storages = {_storage_key(p) for p in self.params} | {("object", id(p)) for p in self.params}
        if track:
            _LIVE.add(self)

    def _later_live(self) -> list["WeightSnapshot"]:
        """Tracked snapshots made after this one, still applied, that share a tensor with it."""
        return sorted((s for s in list(_LIVE) if s is not self and s.order > self.order
                       and not s.undone and s._storages & self._storages), key=lambda s: s.order)

    def on_top(self) -> list[str]:
        """Labels of the later edits still applied on top of this one (restore those first)."""
        return [s.label for s in self._later_live() if s.track]

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the original values back into the live parameters (bit for bit).

        Tracked: raises RestoreOrderError, changing nothing, while a later tracked edit of the same
        weights is applied; a second call does nothing."""
        later = self._later_live()
        if self.track:
            if self.undone:
                return
            if later:
                names = sorted(set(self.names) & set(n for s in later for n in s.names)) or self.names
                raise RestoreOrderError(
                    f"cannot restore {self.label}: {later[-1].label} (made later) still changes {names[0]}; "
                    f"restore the later edit first (undo edits in reverse order). Restoring this one now would "
                    f"bring back the weights from before {later[-1].label} was undone. Nothing was changed.")
        for param, original in zip(self.params, self.originals):
            param.copy_(original)
        if self.track:
            self.undone = True
            _LIVE.discard(self)
        else:  # a checkpoint: the tracked edits made after it on these tensors are undone by it
            for s in later:
                s.undone = True
                _LIVE.discard(s)

    @torch.no_grad()
    def changed(self) -> list[str]:
        """Names of the parameters that differ from the snapshot now."""
        return [
            name for name, param, original in zip(self.names, self.params, self.originals)
            if not torch.equal(param.detach(), original.to(param.device))
        ]

    @torch.no_grad()
    def deltas(self, only_changed: bool = True) -> dict[str, Tensor]:
        """{name: current - original} (in the parameter's dtype and device)."""
        changed = set(self.changed()) if only_changed else set(self.names)
        return {
            name: param.detach() - original.to(param.device)
            for name, param, original in zip(self.names, self.params, self.originals)
            if name in changed
        }

    def __enter__(self) -> "WeightSnapshot":
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:4]) + (", ..." if len(self.names) > 4 else "")
        return f"WeightSnapshot({len(self.names)} tensors: {shown})"


def preserve(params: Params, offload: bool = False) -> WeightSnapshot:
    """Snapshot `params` now; use `with preserve(...):` to undo any edit made inside."""
    return WeightSnapshot(params, offload=offload)


def snapshot_layers(
    model: nn.Module,
    layers: int | Sequence[int],
    which: str | Sequence[str] = ("mlp_out",),
    offload: bool = False,
    track: bool = False,
    label: str = "",
) -> WeightSnapshot:
    """Snapshot the weights (and biases) of modules in the given blocks (track, label: as WeightSnapshot).

    which: module kinds from models.MODULE_KINDS, default the MLP output projection
    (what ROME, MEMIT and knowledge-neuron edits change). Names are the model's own,
    e.g. 'transformer.h.17.mlp.c_proj.weight'. Kinds a family lacks (mlp_gate outside
    Llama) are skipped.
    """
    layers = [layers] if isinstance(layers, int) else list(layers)
    which = [which] if isinstance(which, str) else list(which)
    for kind in which:
        if kind not in MODULE_KINDS:
            raise ValueError(f"unknown module kind {kind!r}; choose from {MODULE_KINDS}")
    named: dict[str, Tensor] = {}
    for layer in sorted({check_layer(model, layer) for layer in layers}):
        for kind in which:
            module = get_module(model, layer, kind)
            if module is None:
                continue
            prefix = module_name(model, layer, kind)
            for pname, param in module.named_parameters():
                named.setdefault(f"{prefix}.{pname}", param)  # "mlp" and "mlp_out" overlap
    return WeightSnapshot(named, offload=offload, track=track, label=label)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No parameter of `model` requires grad inside the block; each one's flag is restored on exit.

    What every edit's inner optimisation (ROME's v*, MEMIT's z, fine-tuning one matrix) and integrated
    gradients need: gradients flow to the tensor being optimised, and autograd neither stores what
    weight gradients would need nor computes them. A method that trains one weight switches it back
    on inside the block (`weight.requires_grad_(True)`); that flag, too, is restored on exit."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)

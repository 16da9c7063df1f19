"""Checks that every editing and attribution method makes before it writes or runs: written once here.

The book's methods edit weights in place (Dai et al., 2022; Meng et al., 2022, 2023), so a bad
setting or a broken model must be refused *before* anything is written, with an error that names
the problem and the fix. Two named errors, both `ValueError`s:

- `NonFiniteEditError`: something that would be written (an update ΔW, a statistic) is NaN or
  infinite. The message names the cause when it can be found, e.g. "the model has a non-finite
  weight in transformer.h.3.mlp.c_proj.weight", by scanning the parameters.
- `ContextLengthError`: a prompt is longer than the model's context (n_positions or
  max_position_embeddings), which otherwise ends in "IndexError: index out of range in self".

The `require_*` helpers raise plain `ValueError`s naming the setting, the value and the fix.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sized

import torch
from torch import Tensor, nn


class NonFiniteEditError(ValueError):
    """What an edit (or a statistic it needs) would write is NaN or infinite; nothing was written."""


class ContextLengthError(ValueError):
    """A prompt has more tokens than the model has positions."""


# --------------------------------------------------------------------------------------
# Non-finite values
# --------------------------------------------------------------------------------------

def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the model's parameters (and buffers) that hold a NaN or an infinity."""
    named = list(model.named_parameters()) + [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    return [name for name, tensor in named if not bool(torch.isfinite(tensor.detach()).all())]


def _model_cause(model: nn.Module | None) -> str:
    if model is None:
        return ""
    bad = nonfinite_parameters(model)
    if not bad:
        return ""
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"the model has a non-finite weight in {bad[0]}{more}"


def nonfinite_cause(model: nn.Module | None = None, **tensors: Tensor | None) -> str:
    """Why something computed from `model` and `tensors` is not finite: the model's first
    non-finite parameter, else the named inputs that are not finite; '' when all are finite."""
    cause = _model_cause(model)
    if cause:
        return cause
    bad = [name for name, t in tensors.items() if t is not None and not bool(torch.isfinite(t).all())]
    return f"non-finite values in {', '.join(bad)}" if bad else ""


def check_model_finite(model: nn.Module, method: str) -> None:
    """Refuse to run `method` on a model with a NaN/Inf parameter: whatever it computed would be NaN."""
    cause = _model_cause(model)
    if cause:
        raise NonFiniteEditError(f"{method}: {cause}; every edit computed through it would be NaN. "
                                 "Reload the model (or restore the edit that broke it) first.")


def check_finite_update(what: str, update: Tensor, current: Tensor | None = None, model: nn.Module | None = None,
                        hint: str = "", **inputs: Tensor | None) -> None:
    """Raise NonFiniteEditError unless `update` (and `current + update`, the values about to be
    written) are finite; the message names the cause (model weights first, then `inputs`)."""
    ok = bool(torch.isfinite(update).all())
    if ok and current is not None:
        ok = bool(torch.isfinite(current.detach() + update.to(current.dtype)).all())
    if ok:
        return
    cause = nonfinite_cause(model, **inputs) or (
        "the current weight is not finite" if current is not None and not bool(torch.isfinite(current).all())
        else "the update overflowed")
    raise NonFiniteEditError(f"{what} is not finite ({cause}); nothing was written. {hint}".rstrip())


# --------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------

def _is_number(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, numbers.Real) or (isinstance(value, Tensor) and value.numel() == 1)


def require_finite(name: str, value, hint: str = "") -> float:
    if not _is_number(value) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}. {hint}".rstrip())
    return float(value)


def require_positive(name: str, value, hint: str = "") -> float:
    """A finite number > 0."""
    value = require_finite(name, value, hint)
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}. {hint}".rstrip())
    return value


def require_nonnegative(name: str, value, hint: str = "") -> float:
    """A finite number >= 0."""
    value = require_finite(name, value, hint)
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}. {hint}".rstrip())
    return value


def require_positive_int(name: str, value, hint: str = "") -> int:
    """An int >= 1 (bools are not ints here)."""
    if isinstance(value, bool) or not hasattr(value, "__index__") or int(value.__index__()) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}. {hint}".rstrip())
    return int(value.__index__())


def require_nonempty(name: str, items: Iterable | Sized, hint: str = "") -> list:
    items = list(items)
    if not items:
        raise ValueError(f"{name} is empty. {hint}".rstrip())
    return items


def require_templates(name: str, templates: Iterable[str]) -> list[str]:
    """A non-empty list of prompt templates, each with one '{}' where the subject goes."""
    templates = require_nonempty(name, templates, "Give at least one prompt template such as '{} is a'.")
    for t in templates:
        if not isinstance(t, str) or "{}" not in t:
            raise ValueError(f"every entry of {name} must be a template with '{{}}' for the subject, got {t!r}")
    return templates


# --------------------------------------------------------------------------------------
# Layers and context
# --------------------------------------------------------------------------------------

def require_later_layer(model: nn.Module, layer: int, method: str, what: str) -> None:
    """Refuse to edit the last block where only later blocks could carry the edit to the prediction:
    ROME's v* and MEMIT's z change the state at the subject's last token, and from the last block
    no attention layer moves it to the last token, so δ gets no gradient and ΔW = 0."""
    from .models import n_layers

    n = n_layers(model)
    if layer >= n - 1:
        raise ValueError(
            f"{method} cannot edit layer {layer}, the model's last block (layers 0-{n - 1}): {what} at the "
            f"subject's last token, and no later attention layer carries it to the token where the answer is "
            f"predicted, so the optimisation gets no gradient and the edit would change nothing. "
            f"Choose a layer below {n - 1}.")


def context_length(model: nn.Module) -> int | None:
    """The model's number of positions (n_positions / max_position_embeddings / n_ctx), or None."""
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def context_attr(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(config, attr, None), int):
            return attr
    return "context length"


def shorten(text: str, limit: int = 60) -> str:
    """repr of `text`, cut to about `limit` characters (for error messages)."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def check_context(model: nn.Module, n_tokens: int, what: str) -> None:
    """Raise ContextLengthError when `what` needs more positions than the model has."""
    limit = context_length(model)
    if limit is not None and n_tokens > limit:
        raise ContextLengthError(
            f"{what} is {n_tokens} tokens long, longer than the model's context of {limit} positions "
            f"(config.{context_attr(model)}); shorten it (or its prefixes / target).")

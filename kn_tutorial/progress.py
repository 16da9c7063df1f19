"""One switch for every progress bar in the package.

All loops in ``kn_tutorial`` that deserve a bar go through :func:`progress` or
:func:`progress_bar`. They return a ``tqdm.auto`` bar (a widget in Jupyter, text
in a terminal) whose ``disable=`` is always passed explicitly, because tqdm's
notebook bar ignores the ``TQDM_DISABLE`` environment variable.

Bars are off when any of these holds (first match wins):

1. :func:`set_progress` was called with ``False`` (``True`` forces them on);
2. ``KN_PROGRESS`` is set: ``0/false/no/off`` turns them off, anything else on;
3. ``TQDM_DISABLE`` is set to a true value;
4. ``CI`` is set to a true value (GitHub Actions and our ``.ci/run`` set it).

Example::

    from kn_tutorial.progress import progress
    for prompt in progress(prompts, desc="tracing"):
        ...
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["progress", "progress_bar", "set_progress", "progress_enabled"]

T = TypeVar("T")

_FALSE = {"0", "false", "no", "off", ""}

# None: follow the environment; True/False: set at runtime by set_progress().
_override: bool | None = None


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().lower() not in _FALSE


def set_progress(enabled: bool | None) -> None:
    """Turn progress bars on or off for this process.

    ``None`` forgets the runtime choice and goes back to the environment.
    """
    global _override
    _override = None if enabled is None else bool(enabled)


def progress_enabled() -> bool:
    """Whether new progress bars will be shown (see the module docstring)."""
    if _override is not None:
        return _override
    kn = os.environ.get("KN_PROGRESS")
    if kn is not None:
        return _truthy(kn)
    if _truthy(os.environ.get("TQDM_DISABLE")):
        return False
    if _truthy(os.environ.get("CI")):
        return False
    return True


def progress(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """Wrap ``iterable`` in a tqdm bar that obeys the package switch.

    Keyword arguments go to ``tqdm`` unchanged; an explicit ``disable=True``
    from the caller is honoured too.
    """
    disable = bool(kwargs.pop("disable", False)) or not progress_enabled()
    kwargs.setdefault("leave", False)
    return tqdm(iterable, disable=disable, **kwargs)


def progress_bar(total: int | None = None, desc: str | None = None, **kwargs: Any) -> tqdm:
    """A manual bar (call ``.update(n)``; use it as a context manager to close it)."""
    return progress(None, total=total, desc=desc, **kwargs)

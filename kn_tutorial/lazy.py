"""Names a module re-exports from a module above it, imported only when first used.

`tracing`, `memories`, `neurons` and `attribution` keep their figure, HTML and explorer
functions importable from their old place (`from kn_tutorial.tracing import plot_traces`),
although those now live in `*_display` modules that import the definition. An import at the
top of the definition would close a cycle (and load matplotlib for every user of the method);
a module-level `__getattr__` (PEP 562) imports the display module only when such a name is
first asked for, so the import drawing stays acyclic.
"""
from __future__ import annotations

import importlib
from typing import Callable, Iterable, Mapping


def lazy_exports(package: str, module: str | Mapping[str, Iterable[str]],
                 names: Iterable[str] = ()) -> Callable[[str], object]:
    """A module `__getattr__` serving each of `names` from `package.module` on first access.

    `module` may also be a mapping {module: names} when the names come from several modules."""
    sources = {module: names} if isinstance(module, str) else dict(module)
    home = {name: source for source, served in sources.items() for name in served}

    def __getattr__(name: str):
        if name in home:
            return getattr(importlib.import_module(f"{package}.{home[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__

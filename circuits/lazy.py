"""Lazy attribute forwarding for a package that grew from a module (a leaf: imports nothing of ours).

``circuits.zoo`` was one module and is now a package whose core is ``circuits.zoo.registry``;
``from circuits import zoo; zoo.load(...)`` keeps working through :func:`forward`, which imports the
core on first use, so importing one light submodule (``circuits.zoo.seeds`` from the plugin) does
not pull in torch."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def forward(package: str, core: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package`` that reads names from module ``core``."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return getattr(importlib.import_module(core), name)
        except AttributeError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None

    return __getattr__

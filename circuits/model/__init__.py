"""The model layer: one HookedTransformer, its hook points, activation cache and converters.

``circuits.model.transformer.<name>`` still reaches what ``circuits.model.transformer`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

import importlib as _importlib


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)
    try:
        return getattr(_importlib.import_module('circuits.model.transformer'), name)
    except AttributeError:
        raise AttributeError(f"module 'circuits.model.transformer' has no attribute {name!r}") from None

"""The claim layer: verdicts with intervals, statistics, controls, mutations and draws.

``circuits.claims.core.<name>`` still reaches what ``circuits.claims.core`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

import importlib as _importlib


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)
    try:
        return getattr(_importlib.import_module('circuits.claims.core'), name)
    except AttributeError:
        raise AttributeError(f"module 'circuits.claims.core' has no attribute {name!r}") from None

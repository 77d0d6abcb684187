"""Balanced brackets: data, the published ARENA reference, and subjects.

``circuits.tasks.brackets.data.<name>`` still reaches what ``circuits.tasks.brackets.data`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

import importlib as _importlib


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)
    try:
        return getattr(_importlib.import_module('circuits.tasks.brackets.data'), name)
    except AttributeError:
        raise AttributeError(f"module 'circuits.tasks.brackets.data' has no attribute {name!r}") from None

"""Tracr-compiled ground-truth models: compiled fixtures and their edge-level circuits.

``circuits.tasks.tracr.compiled.<name>`` still reaches what ``circuits.tasks.tracr.compiled`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

import importlib as _importlib


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)
    try:
        return getattr(_importlib.import_module('circuits.tasks.tracr.compiled'), name)
    except AttributeError:
        raise AttributeError(f"module 'circuits.tasks.tracr.compiled' has no attribute {name!r}") from None

"""The zoo layer: named models, their store, training (single and stacked), sweeps and censuses.

``circuits.zoo.registry.<name>`` still reaches what ``circuits.zoo.registry`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

import importlib as _importlib


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)
    try:
        return getattr(_importlib.import_module('circuits.zoo.registry'), name)
    except AttributeError:
        raise AttributeError(f"module 'circuits.zoo.registry' has no attribute {name!r}") from None

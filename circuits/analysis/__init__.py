"""The analysis layer: measures, interventions, scrubbing, roles and circuits over a model.

``circuits.analysis.measures.<name>`` still reaches what ``circuits.analysis.measures`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

import importlib as _importlib


def __getattr__(name):
    if name.startswith('__'):
        raise AttributeError(name)
    try:
        return getattr(_importlib.import_module('circuits.analysis.measures'), name)
    except AttributeError:
        raise AttributeError(f"module 'circuits.analysis.measures' has no attribute {name!r}") from None

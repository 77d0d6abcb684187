"""The model layer: one HookedTransformer, its hook points, activation cache and converters.

``circuits.model.<name>`` still reaches what ``circuits.model.transformer`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

from circuits.lazy import forward

__getattr__ = forward(__name__, "circuits.model.transformer")

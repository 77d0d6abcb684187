"""The zoo layer: named models, their store, training (single and stacked), sweeps and censuses.

``circuits.zoo.<name>`` still reaches what ``circuits.zoo.registry`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

from circuits.lazy import forward

__getattr__ = forward(__name__, "circuits.zoo.registry")

"""The analysis layer: measures, interventions, scrubbing, roles and circuits over a model.

``circuits.analysis.<name>`` still reaches what ``circuits.analysis.measures`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

from circuits.lazy import forward

__getattr__ = forward(__name__, "circuits.analysis.measures")

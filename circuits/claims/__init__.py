"""The claim layer: verdicts with intervals, statistics, controls, mutations and draws.

``circuits.claims.<name>`` still reaches what ``circuits.claims.core`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

from circuits.lazy import forward

__getattr__ = forward(__name__, "circuits.claims.core")

"""Balanced brackets: data, the published ARENA reference, and subjects.

``circuits.tasks.brackets.<name>`` still reaches what ``circuits.tasks.brackets.data`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

from circuits.lazy import forward

__getattr__ = forward(__name__, "circuits.tasks.brackets.data")

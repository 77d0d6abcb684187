"""Tracr-compiled ground-truth models: compiled fixtures and their edge-level circuits.

``circuits.tasks.tracr.<name>`` still reaches what ``circuits.tasks.tracr.compiled`` defines (the module this package grew
from), imported on first use so that importing one submodule stays cheap."""

from circuits.lazy import forward

__getattr__ = forward(__name__, "circuits.tasks.tracr.compiled")

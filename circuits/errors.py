"""Errors the library raises on bad input. Each names the problem; none is a deep torch traceback."""

import difflib
from typing import Iterable


def did_you_mean(name: str, choices: Iterable[str], cutoff: float = 0.4) -> str:
    """'; did you mean 'a', 'b'?' for the closest choices to a mistyped name, or ''."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=cutoff)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


class CircuitsError(Exception):
    """Base class for every error `circuits` raises on purpose."""


class ConfigError(CircuitsError, ValueError):
    """A model configuration is inconsistent (e.g. d_model != n_heads * d_head where required)."""


class HookNameError(CircuitsError, KeyError):
    """An unknown hook name; the message suggests the closest valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


class HookOutputError(CircuitsError, TypeError):
    """A hook function returned something other than None or a tensor of its activation's shape,
    dtype and device; the message names the hook point, what was expected and what came back."""


class InputError(CircuitsError, ValueError):
    """Model input of the wrong dtype, shape, token range or length."""


class StateDictError(CircuitsError, ValueError):
    """A state dict with missing, unexpected or mis-shaped keys (each is named)."""


class UnknownModelError(CircuitsError, KeyError):
    """A model name that is not in the zoo."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class ControlError(CircuitsError, ValueError):
    """A control or mutation that is malformed, misused, that the test never applied, or that cannot
    act on the model it was given (the message names the part it needs)."""


class ScrubError(CircuitsError, ValueError):
    """A causal-scrubbing hypothesis that cannot be evaluated as written (an unknown component or
    position, a feature with the wrong number of values, recursion into a part that has no inputs)."""


class SettingError(CircuitsError, ValueError):
    """An environment setting (CIRCUITS_CACHE, CIRCUITS_LOCK_TIMEOUT) or a command-line value
    (--device, --workers) that cannot be used; the message names the setting and the fix."""


class StoreError(CircuitsError, OSError):
    """The model store cannot be read or written: a cache path that is a file, a lock path that is a
    folder, a full disk. Nothing half-written is left behind; the message names the path."""


class ShippedFileError(CircuitsError, ValueError):
    """A file the package ships (the ARENA reference checkpoint or data) is missing, unreadable, or
    does not match its recorded sha256; the message names the file and how to restore it."""

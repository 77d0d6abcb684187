"""Where the model store lives and how long a process waits for a lock, from the environment.

:func:`default_root` is where :class:`ModelStore` keeps its entries when no ``root`` is given:

:func:`default_cache_dir` ``(root)`` is where a :class:`ModelStore` keeps its entries:

* ``$CIRCUITS_CACHE`` if that environment variable is set and non-empty (``~`` is expanded);
* otherwise ``<root>/.circuits-cache``, where ``root`` is the caller's project folder (the pytest
  plugin passes its rootdir, the CLI the current directory) -- never the package's own folder, so an
  installed wheel does not write next to itself. ``ModelStore()`` without a root uses the current
  directory.

``$CIRCUITS_LOCK_TIMEOUT`` (seconds, default 7200) bounds how long a process waits for another one
that is building the same model (and for the machine's multi-threaded training slot,
:func:`circuits.zoo.train.training_slot`). Bad values of either are a :class:`SettingError`;
:func:`check_environment` checks both up front (the CLI calls it before any training).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from circuits.errors import SettingError, StoreError
from circuits.paths import CACHE_ENV

__all__ = ["check_environment", "default_cache_dir", "default_root", "lock_timeout_from_env", "seconds_from_env"]

LOCK_TIMEOUT_ENV = "CIRCUITS_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 7200.0


def default_cache_dir(root: str | os.PathLike[str]) -> Path:
    """``$CIRCUITS_CACHE`` if set (and non-empty), else ``<root>/.circuits-cache``
    (:func:`circuits.paths.cache_dir`, the one rule)."""
    from circuits.paths import cache_dir

    return cache_dir(Path(root).expanduser())


def default_root() -> Path:
    """:func:`default_cache_dir` of the current directory (what ``ModelStore()`` uses)."""
    return default_cache_dir(Path.cwd())


def seconds_from_env(name: str, default: float, example: str) -> float:
    """``$name`` as seconds >= 0 (``default`` when unset or empty); :class:`SettingError` naming the
    variable otherwise. ``example`` says what a good value looks like (it ends the message)."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise SettingError(f"${name}={raw[:40]!r} is not a number of seconds >= 0 ({example}; "
                           f"unset it for the default {default:g})")
    return value


def lock_timeout_from_env() -> float:
    """``$CIRCUITS_LOCK_TIMEOUT`` in seconds (default 7200); :class:`SettingError` unless a number >= 0."""
    return seconds_from_env(LOCK_TIMEOUT_ENV, DEFAULT_LOCK_TIMEOUT, f"e.g. {LOCK_TIMEOUT_ENV}=600")


def check_cache_dir(path: Path) -> Path:
    """``path`` if it can hold a model store: a folder, or not there yet below a folder we may write
    to. :class:`StoreError` naming the path otherwise (nothing is created here)."""
    from circuits.paths import check_output_dir

    hint = f"point ${CACHE_ENV} at a folder" if os.environ.get(CACHE_ENV, "").strip() else f"set ${CACHE_ENV}"
    try:
        return check_output_dir(path, "the model store", hint)
    except ValueError as e:
        raise StoreError(str(e)) from None


def check_environment(root: str | os.PathLike[str] | None = None) -> tuple[Path, float]:
    """Validate ``$CIRCUITS_CACHE`` (through the store folder it selects: :func:`default_cache_dir` of
    ``root``, default the current directory) and ``$CIRCUITS_LOCK_TIMEOUT`` before any work starts:
    ``(store folder, lock timeout)``, or the first problem as a one-line error."""
    folder = default_cache_dir(root) if root is not None else default_root()
    return check_cache_dir(folder), lock_timeout_from_env()

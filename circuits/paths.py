"""Where things live: the files the package ships, and the user's project folders.

Two kinds of places, never mixed:

* **Shipped, read-only** (`fixtures_dir`, `reference_dir`, `arena_dir`): the reference checkpoints and
  the ARENA files. In a wheel they are package data at ``circuits/_fixtures/`` (setup.py copies the
  repository's top-level ``fixtures/`` there at build time); in a source checkout or an editable
  install they are read from ``fixtures/`` beside the package. Found through ``importlib.resources``,
  so they follow the package wherever it is installed.
* **The user's project, written** (`project_root`, `reports_dir`, `cache_dir`): resolved against the
  user's pytest rootdir (or the current directory for the CLI), with an environment variable first
  and a pytest ini option second, never against the package folder: an installed package must not
  read or write next to itself.

Leaf module: imports nothing from `circuits`, so every other module may use it.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

PathLike = Union[str, "os.PathLike[str]"]

CACHE_ENV = "CIRCUITS_CACHE"  # the model store
REPORTS_ENV = "CIRCUITS_REPORTS"  # where runs are written
CACHE_INI = "circuits_cache_dir"
REPORTS_INI = "circuits_report_dir"

_SOURCE_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"  # a source checkout's fixtures/


def fixtures_dir() -> Path:
    """The shipped fixtures root (holds ``models/`` and ``reference/``): package data when installed
    from a wheel, else the source checkout's ``fixtures/``."""
    packaged = resources.files("circuits") / "_fixtures"
    if packaged.is_dir():
        # a wheel installs into a plain folder, where the Traversable is a real path; a zipped
        # install has none, and torch/safetensors need real files
        return Path(str(packaged))
    return _SOURCE_FIXTURES


def reference_dir() -> Path:
    """The committed reference checkpoints (``<name>.safetensors`` + ``<name>.card.json``)."""
    return fixtures_dir() / "models"


def arena_dir() -> Path:
    """The published ARENA bracket checkpoint and data, as shipped (see its SOURCE.md)."""
    return fixtures_dir() / "reference" / "arena-brackets"


def project_root(config_or_cwd: Any = None) -> Path:
    """The user's project folder: a pytest ``Config``'s rootdir, a given path, or the current
    directory (the CLI)."""
    if config_or_cwd is None:
        return Path.cwd()
    rootpath = getattr(config_or_cwd, "rootpath", None)
    if rootpath is not None:
        return Path(rootpath)
    return Path(config_or_cwd).expanduser()


def _resolve(root: PathLike, env: str, ini: str, default: str, config: Any) -> Path:
    """``$env`` (absolute or relative to the current directory), else the ini option ``ini``
    (relative to ``root``), else ``root/default``."""
    value = os.environ.get(env, "").strip()
    if value:
        return Path(value).expanduser()
    if config is not None:
        try:
            value = str(config.getini(ini) or "").strip()
        except ValueError:  # the option is not registered in this session
            value = ""
        if value:
            return Path(root) / Path(value).expanduser()
    return Path(root) / default


def reports_dir(root: PathLike, config: Optional[Any] = None) -> Path:
    """Where runs are written: ``$CIRCUITS_REPORTS``, else ini ``circuits_report_dir``, else
    ``<root>/reports``."""
    return _resolve(root, REPORTS_ENV, REPORTS_INI, "reports", config)


def cache_dir(root: PathLike, config: Optional[Any] = None) -> Path:
    """The model store: ``$CIRCUITS_CACHE``, else ini ``circuits_cache_dir``, else
    ``<root>/.circuits-cache``."""
    return _resolve(root, CACHE_ENV, CACHE_INI, ".circuits-cache", config)


def check_output_dir(path: PathLike, what: str, fix: str = "") -> Path:
    """``path`` if files can be written under it: a folder, or not there yet below a writable
    folder (nothing is created here). ValueError naming the path otherwise, so a run that writes
    there at its end is refused before it starts (``fix``: what to do instead, appended)."""
    path = Path(path)
    fix = f"; {fix}" if fix else ""
    probe = path
    while not probe.exists():
        if probe.is_symlink():
            raise ValueError(f"{what} {path}: {probe} is a broken symbolic link{fix}")
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        where = "" if probe == path else f" (its parent {probe} is a file)"
        raise ValueError(f"{what} {path} is not a folder{where}{fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {path}: {probe} is not writable by this user{fix}")
    return path

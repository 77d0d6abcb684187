"""The hooks the circuits plugin declares (registered with ``pluginmanager.add_hookspecs``, as
pytest-benchmark and pytest-xdist declare theirs): what a project may provide in its ``conftest.py``
(or any plugin) instead of, or beside, the module-level conventions.

* :func:`pytest_circuits_known_failures` -- the known failures of a test module. The plugin's own
  implementation returns the module's ``KNOWN_FAILURES`` table, so a module that has one keeps working;
  a conftest may add tables for modules it cannot edit (generated tests, a vendored suite).
* :func:`pytest_circuits_sweep_plan` -- the models to train before the first test of a run with
  ``--circuits-seeds`` / ``--circuits-full-sweep``. The plugin's own implementation calls the module's
  ``circuits_sweep_plan(options, items)`` function, if it has one.

Both are collected from every implementation (not first-result): tables are merged (the same key with
two different reasons is an error), plans are concatenated.
"""

from __future__ import annotations

from typing import Any

import pytest

__all__ = ["pytest_circuits_known_failures", "pytest_circuits_sweep_plan"]


@pytest.hookspec
def pytest_circuits_known_failures(module: Any, config: pytest.Config) -> dict[str, str] | None:
    """Known failures of the test ``module``: ``{"test_x": "reason", "test_y control=untrained": "..."}``
    (keys as in a module's ``KNOWN_FAILURES`` table, see the README), or None for none.

    Every key must name a test of the module (a stale key is a collection error) and every reason must
    be non-empty. The run expects each listed main run to fail a claim (strictly, on the reference
    models) and each listed control run to hold."""


@pytest.hookspec
def pytest_circuits_sweep_plan(options: Any, module: Any, items: list) -> list[tuple[str, Any]] | None:
    """Models to train up front for ``module``'s selected ``items`` under this run's ``options``
    (:class:`circuits.plugin.session.RunOptions`): ``[(zoo name, seeds), ...]``, e.g. a paper's grid under
    ``--circuits-full-sweep``, for the experiments that ``-k`` kept. None or ``[]`` for nothing."""

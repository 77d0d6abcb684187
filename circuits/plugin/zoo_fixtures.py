"""Fixtures for zoo models: one ``<name>_model`` per registered zoo entry, and the session loader.

``<name>_model`` is function-scoped so the test's control or mutation can transform it: it returns
``control.apply_model(model)``, the trained model itself on the main run. The trained model is
loaded (or trained) once per session and seed by :class:`ZooSession`. With ``--circuits-seeds``, ``zoo_seed``
is parametrised and each seed gets its own model; with ``--circuits-retrain``, models are trained into the
run's report dir (``reports/<run-id>/models/``), once per run even under pytest-xdist (the store's
file lock).

The plugin registers these fixtures lazily (:func:`fixture_module`), when a test module that uses
circuits is collected, so an unrelated project never imports torch; entries registered later (from
a ``conftest.py``) get their fixture before the modules below that conftest are collected.
"""

from __future__ import annotations

import os

import sys
import types
from typing import Any, Optional

import pytest

from circuits.plugin.session import RunOptions, note_model

__all__ = ["ZooSession", "fixture_module", "pretrain", "sweep_plan", "SWEEP_PLAN"]


class ZooSession:
    """Loads each (name, seed) once per session and notes it for the report."""

    def __init__(self, config: pytest.Config, options: RunOptions):
        self.config = config
        self.options = options
        self._loaded: dict[tuple[str, Optional[int]], Any] = {}

    def store(self):
        from circuits.zoo.store import ModelStore

        return ModelStore(_store_root(self.config, self.options))

    def get(self, request: pytest.FixtureRequest, name: str, seed: Optional[int]):
        from circuits.zoo.train import TerminalProgress

        key = (self.options.model_name(name), seed)
        if key not in self._loaded:
            progress = TerminalProgress(f"training {name} (seed {seed})", stream=sys.__stderr__)
            with _uncaptured(self.config):
                loaded = self._load(name, seed, progress)
            if loaded.source == "trained":
                progress.done(f"{loaded.card.get('metrics')}")
            self._loaded[key] = loaded
            note_model(request, loaded.info())
        return self._loaded[key]

    def _load(self, name, seed, progress):
        from circuits.zoo import registry as zoo

        return zoo.load(self.options.model_name(name), seed, retrain=self.options.retrain,
                        device=self.options.device, store=self.store(), progress=progress)


SWEEP_PLAN = "circuits_sweep_plan"  # a module's fn(RunOptions, its selected items) -> [(zoo name, seeds), ...]


def module_sweep_plan(options: RunOptions, module: Any, items: list) -> list:
    """What a module's own ``circuits_sweep_plan(options, items)`` asks for (the convention the
    plugin's default ``pytest_circuits_sweep_plan`` implements); [] without one."""
    fn = getattr(module, SWEEP_PLAN, None)
    if not callable(fn):
        return []
    try:
        return list(fn(options, items))
    except Exception as e:  # a user's plan: one line naming it, not an INTERNALERROR
        raise pytest.UsageError(f"{module.__name__}.{SWEEP_PLAN}: {type(e).__name__}: {e}") from None


def sweep_plan(options: RunOptions, items: list, hook: Any = None) -> dict:
    """seeds -> the zoo names to train for them before the first test: with ``--circuits-seeds``, the model
    fixtures the collected tests use; and what the ``pytest_circuits_sweep_plan`` hook (``hook``: the
    config's hook relay; by default each collected module's ``circuits_sweep_plan(options, items)``)
    asks for, given each module's selected items (models a test loads by name, e.g. a paper's grid
    under ``--circuits-full-sweep``, for the experiments that ``-k`` kept)."""
    from circuits.zoo import registry as zoo

    plan: dict = {}

    def want(name: str, seeds) -> None:
        names = plan.setdefault(tuple(seeds), [])
        if name not in names:
            names.append(name)

    by_fixture = {fixture_name(n): n for n in zoo.names()}
    modules: dict = {}  # id(module) -> (module, its selected items), in collection order
    for item in items:
        if options.seeds:
            for f in getattr(item, "fixturenames", ()):
                if f in by_fixture:
                    want(options.model_name(by_fixture[f]), options.seeds)
        module = getattr(item, "module", None)
        if module is not None:
            modules.setdefault(id(module), (module, []))[1].append(item)
    relay = getattr(hook, "pytest_circuits_sweep_plan", None)
    for module, its in modules.values():
        if relay is None:
            answers = [module_sweep_plan(options, module, its)]
        else:
            try:
                answers = relay(options=options, module=module, items=its)
            except pytest.UsageError:
                raise
            except Exception as e:  # a conftest's plan: one line naming it, not an INTERNALERROR
                raise pytest.UsageError(f"pytest_circuits_sweep_plan for {module.__name__}: "
                                        f"{type(e).__name__}: {e}") from None
        for asked in answers:
            for name, seeds in asked or []:
                want(name, seeds)
    return plan


def apply_ensemble_option(config: pytest.Config) -> None:
    """``--circuits-ensemble K``: this session's models come from the stacked trainer (issue 34): the
    run's loads and pretraining use its store keys ($CIRCUITS_TRAIN_BACKEND=ensemble, inherited by
    xdist workers and sweep processes)."""
    k = config.getoption("circuits_ensemble", None)
    if k is None:
        return
    if k < 0:
        raise pytest.UsageError(f"--circuits-ensemble must be >= 0 (0 = automatic stacks), got {k}")
    from circuits.zoo.ensemble import BACKEND_ENV

    os.environ[BACKEND_ENV] = "ensemble"


def pretrain(config: pytest.Config, options: RunOptions, items: list, stream=None) -> dict:
    """Train every (model, seed) of `sweep_plan` that the store lacks before the first test, through
    the sweep runner (in parallel, one progress view) instead of one after another inside fixtures.
    Returns zoo name -> SweepResult; a failed training is left to the test that needs it, which then
    fails with the training's own error."""
    from circuits.zoo.sweep import run_sweeps

    plan = sweep_plan(options, items, config.hook)
    if not plan:
        return {}
    out = {}
    for seeds, names in plan.items():
        with _uncaptured(config):
            out.update(run_sweeps(names, list(seeds), root=_store_root(config, options), device=options.device,
                                  stream=stream or sys.__stderr__, train_references=options.retrain,
                                  ensemble=config.getoption("circuits_ensemble", None)))
    return out


def _uncaptured(config: pytest.Config):
    """Training progress goes to the screen live, not into pytest's capture."""
    import contextlib

    capman = config.pluginmanager.getplugin("capturemanager")
    return capman.global_and_fixture_disabled() if capman is not None else contextlib.nullcontext()


def _store_root(config: pytest.Config, options: RunOptions):
    """Where this run's models live: the run's own folder under --circuits-retrain, else the project's store."""
    return options.run_dir / "models" if options.retrain else _cache_dir(config)


def _cache_dir(config: pytest.Config):
    """The model store of this project (:func:`circuits.paths.cache_dir`: $CIRCUITS_CACHE, else the
    ini option circuits_cache_dir, else <rootdir>/.circuits-cache), never the package's folder."""
    from circuits.paths import cache_dir

    return cache_dir(config.rootpath, config)


def _model_fixture(name: str):
    def fixture(request: pytest.FixtureRequest, zoo_models: ZooSession, zoo_seed, circuits_control):
        return circuits_control.apply_model(zoo_models.get(request, name, zoo_seed).model)

    fixture.__name__ = fixture_name(name)
    fixture.__doc__ = (f"The zoo model {name!r} (reference checkpoint, or the --circuits-seeds model), "
                       "after the test's control.")
    return pytest.fixture(name=fixture_name(name))(fixture)


def _data_fixture(name: str):
    def fixture(zoo_seed):
        from circuits.zoo import registry as zoo
        from circuits.zoo.train import final_test_seed

        entry = zoo.get_entry(name)
        return entry.make_split(entry.recipe.n_eval, final_test_seed(zoo_seed if zoo_seed is not None else 0))

    fixture.__name__ = f"{name}_data"
    fixture.__doc__ = (f"Held-out data of the zoo entry {name!r}: its make_split on the final-test seed of the "
                       "model's seed (never seen in training), n_eval examples.")
    return pytest.fixture(name=f"{name}_data", scope="session")(fixture)


def fixture_name(entry_name: str) -> str:
    """``brackets`` -> ``brackets_model``; a recipe variant ``brackets@arena_like`` ->
    ``brackets_at_arena_like_model`` (fixture names must be identifiers)."""
    return entry_name.replace("@", "_at_").replace("-", "_").replace(".", "_") + "_model"


def _has_split(name: str) -> bool:
    from circuits.zoo import registry as zoo

    return getattr(zoo.get_entry(name), "make_split", None) is not None


def fixture_module(names: list[str]) -> types.ModuleType:
    """A module-like object holding the ``<name>_model`` fixtures of ``names``, to be registered as
    a pytest plugin (pytest parses the fixtures of every registered plugin)."""
    mod = types.ModuleType(f"circuits_zoo_fixtures_{len(names)}")
    for name in names:
        fx = _model_fixture(name)
        setattr(mod, fixture_name(name).removesuffix("_model") + "_model_fixture", fx)
        if "@" not in name and name.isidentifier() and _has_split(name):
            setattr(mod, f"{name}_data_fixture", _data_fixture(name))
    return mod

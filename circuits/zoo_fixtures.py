"""pytest fixtures for the zoo: `<name>_model` per zoo entry, plus `zoo_models` (the session loader).

`<name>_model` is function-scoped so the test's negative control can transform it: it returns
`control.apply_model(model)`, the trained model itself on the main run. The trained model is loaded
(or trained) once per session and seed by `zoo_models`. With `--seeds`, `zoo_seed` is parametrised
and each seed gets its own model; with `--retrain`, models are trained into the run's report dir
(`reports/<run-id>/models/`), once per run even under pytest-xdist (the store's file lock).
"""

from __future__ import annotations

import sys
from typing import Optional

import pytest

from . import zoo
from .zoo import LoadedModel


class ZooSession:
    """Loads each (name, seed) once per session and notes it for the report."""

    def __init__(self, request: pytest.FixtureRequest):
        from .pytest_plugin import get_plugin

        self.config = request.config
        self.options = get_plugin(request.config).options
        self._loaded: dict[tuple[str, Optional[int]], LoadedModel] = {}

    def store(self):
        from .store import ModelStore

        return ModelStore(self.options.run_dir / "models") if self.options.retrain else ModelStore()

    def get(self, request: pytest.FixtureRequest, name: str, seed: Optional[int]) -> LoadedModel:
        from .pytest_plugin import note_model
        from .train import TerminalProgress

        key = (name, seed)
        if key not in self._loaded:
            capman = self.config.pluginmanager.getplugin("capturemanager")
            progress = TerminalProgress(f"training {name} (seed {seed})", stream=sys.__stderr__)
            if capman is not None:  # show training progress live, not swallowed by capture
                with capman.global_and_fixture_disabled():
                    loaded = self._load(name, seed, progress)
            else:
                loaded = self._load(name, seed, progress)
            if loaded.source == "trained":
                progress.done(f"{loaded.card.get('metrics')}")
            self._loaded[key] = loaded
            note_model(request, loaded.info())
        return self._loaded[key]

    def _load(self, name, seed, progress) -> LoadedModel:
        return zoo.load(name, seed, retrain=self.options.retrain, device=self.options.device,
                        store=self.store(), progress=progress)


@pytest.fixture(scope="session")
def zoo_models(request: pytest.FixtureRequest) -> ZooSession:
    return ZooSession(request)


def _model_fixture(name: str):
    def fixture(request: pytest.FixtureRequest, zoo_models: ZooSession, zoo_seed, control):
        return control.apply_model(zoo_models.get(request, name, zoo_seed).model)

    fixture.__name__ = f"{name}_model"
    fixture.__doc__ = f"The zoo model {name!r} (reference checkpoint, or the --seeds model), after the test's control."
    return pytest.fixture(name=f"{name}_model")(fixture)


__all__ = ["zoo_models"]
for _name in zoo.names():
    globals()[f"{_name}_model_fixture"] = _model_fixture(_name)
    __all__.append(f"{_name}_model_fixture")

"""The model zoo: name -> task (data recipe), model config, training recipe, default seed.

Adding a model is one `register(ZooEntry(...))` call in the task's module (see circuits/tasks/).
`load(name, seed)` returns a trained model:
  * default seed, no retrain: the committed reference checkpoint in `fixtures/models/` (its spec must
    match the current code's, else StaleCheckpointError says what changed and how to refresh);
  * any other seed, or retrain: the content-addressed store (trained once, under a file lock, then
    cached), keyed by the full spec: config, data recipe, seed, training recipe, training code version
    and torch version.
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import InputError, UnknownModelError, did_you_mean
from .model import HookedTransformer, TransformerConfig
from .train import TRAIN_CODE_VERSION, Split, TrainRecipe, data_seeds, evaluate, final_test_seed, train

REFERENCE_DIR = Path(__file__).resolve().parent.parent / "fixtures" / "models"
# Modules whose import registers zoo entries (one per seed notebook).
TASK_MODULES = ("circuits.tasks.brackets", "circuits.tasks.palindromes", "circuits.tasks.skip_trigrams",
                "circuits.tasks.icl", "circuits.tasks.assoc_memory")


@dataclass
class ZooEntry:
    name: str
    description: str
    config: TransformerConfig  # its `seed` field is replaced by the model seed
    recipe: TrainRecipe
    make_split: Callable[[int, int], Split]  # (n, data_seed) -> Split, the task's distribution
    data_recipe: dict  # what the split functions do, versioned: part of the store key
    # training may use an easier-to-learn-from distribution; held-out evaluation always uses make_split
    make_train_split: Optional[Callable[[int, int], Split]] = None
    default_seed: int = 0
    extra: dict = field(default_factory=dict)  # task-specific notes for cards

    def spec(self, seed: int) -> dict:
        """Everything that determines the trained weights: the store key is its hash."""
        return {
            "name": self.name,
            "config": replace(self.config, seed=seed).to_dict(),
            "data": self.data_recipe,
            "train": self.recipe.to_dict(),
            "seed": seed,
            "train_code": TRAIN_CODE_VERSION,
            "torch": torch.__version__.split("+")[0],
        }


ZOO: dict[str, ZooEntry] = {}


def register(entry: ZooEntry) -> ZooEntry:
    if entry.name in ZOO and ZOO[entry.name] is not entry:
        raise ValueError(f"zoo entry {entry.name!r} registered twice")
    ZOO[entry.name] = entry
    return entry


def _load_tasks() -> None:
    for mod in TASK_MODULES:
        if importlib.util.find_spec(mod) is not None:  # a task module may not exist yet
            importlib.import_module(mod)


def get_entry(name: str) -> ZooEntry:
    _load_tasks()
    if name not in ZOO:
        raise UnknownModelError(f"unknown model {name!r}{did_you_mean(name, ZOO)} "
                                f"(the zoo has: {', '.join(sorted(ZOO))})")
    return ZOO[name]


def names() -> list[str]:
    _load_tasks()
    return sorted(ZOO)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def build_model(entry: ZooEntry, seed: int) -> HookedTransformer:
    return HookedTransformer(replace(entry.config, seed=seed))


def train_entry(entry: ZooEntry, seed: int, progress=None, recipe: Optional[TrainRecipe] = None) -> tuple[HookedTransformer, dict]:
    """Train a zoo model from scratch: returns the model and card fields (metrics, history, time)."""
    train_seed, eval_seed = data_seeds(seed)
    t0 = time.perf_counter()
    train_split = (entry.make_train_split or entry.make_split)(entry.recipe.n_train, train_seed)
    eval_split = entry.make_split(entry.recipe.n_eval, eval_seed)
    data_time = time.perf_counter() - t0
    model = build_model(entry, seed)
    result = train(model, train_split, eval_split, entry.recipe, seed=seed, progress=progress)
    card = {
        "metrics": result.final,
        "history": result.history,
        "steps": result.steps,
        "wall_time": round(result.wall_time + data_time, 3),  # data generation + training
        "data_seeds": {"train": train_seed, "eval": eval_seed},
    }
    if entry.recipe.n_test:
        seed_test = final_test_seed(seed)
        test = evaluate(model, entry.make_split(entry.recipe.n_test, seed_test), entry.recipe.loss)
        card["metrics"] = {**result.final, **{k.replace("eval_", "test_"): v for k, v in test.items()}}
        card["data_seeds"]["test"] = seed_test
    return model, card


@dataclass
class LoadedModel:
    model: HookedTransformer
    card: dict
    source: str  # "reference" | "cache" | "trained"
    entry: ZooEntry
    seed: int

    def info(self) -> dict:
        """What the report records about this model."""
        return model_info(self.entry.name, self.seed, self.card, self.source)


def model_info(name: str, seed: int, card: dict, source: str) -> dict:
    """The report's record of a model (`circuits.pytest_plugin.note_model`), from its card."""
    return {
        "name": name,
        "seed": seed,
        "key": card.get("key"),
        "content_hash": card.get("content_hash"),
        "source": source,
        "metrics": {**(card.get("metrics") or {}), "history": card.get("history") or []},
        "wall_time": card.get("wall_time"),
    }


def load(name: str, seed: Optional[int] = None, *, retrain: bool = False, force: bool = False,
         device: str = "cpu", store=None, progress=None, reference_dir: Path = REFERENCE_DIR) -> LoadedModel:
    """retrain: skip the reference checkpoint even for the default seed (the pytest plugin then
    passes a store inside the run's report dir, so each run trains afresh and xdist workers share
    one training); force: retrain even if `store` already holds the model (the CLI's `train`)."""
    from .store import ModelStore, load_reference

    entry = get_entry(name)
    seed = entry.default_seed if seed is None else check_seed(seed)
    spec = entry.spec(seed)
    model = build_model(entry, seed)
    if seed == entry.default_seed and not retrain:
        state, card = load_reference(reference_dir, name, spec)
        source = "reference"
    else:
        store = store or ModelStore()

        def build():
            trained, card = train_entry(entry, seed, progress)
            return trained.state_dict(), card

        state, card, created = store.get_or_create(spec, build, force=force)
        source = "trained" if created else "cache"
    from .convert import load_tl_state_dict

    load_tl_state_dict(model, state)
    return LoadedModel(model.to(device).eval(), card, source, entry, seed)

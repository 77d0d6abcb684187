"""The model zoo: one registry of every model family. name -> how to build, train and key a model.

Where entries come from (nothing registers at import time):
  * built-in task modules: every module of `circuits.tasks` (found with `pkgutil.iter_modules`) that
    exposes `zoo_entries() -> list[ZooEntry]`; a new `circuits/tasks/x.py` with that function is in
    the zoo (and `python -m circuits list`) with no other change;
  * installed packages: callables in the entry-point group `circuits.zoo`, each returning entries;
  * `register(entry)`, from a user's conftest.py or anywhere, at any time.

A `ZooEntry` defaults to the HookedTransformer path (`config` a TransformerConfig, `recipe` a
TrainRecipe, data from `make_split`); another family (the associative-memory AoT, the low-rank
baseline) supplies `build_model(config, seed)`, `train_fn(entry, seed, progress) -> (model, card)`
and, to keep its store keys, `spec_fn(entry, seed)`. A recipe variant `name@variant` is the entry
with the variant's overrides applied, its own name and so its own store key.

`load(name, seed)` returns a trained model, with one store policy for every family:
  * a seed in `entry.reference_seeds` (default: the default seed), no retrain: the committed
    reference checkpoint `fixtures/models/<reference_name(seed)>.*` (its spec must match the
    current code's, else StaleCheckpointError says what changed and how to refresh);
  * any other seed, or retrain: the content-addressed store (trained once, under a file lock, then
    cached), keyed by the full spec (config, data recipe, seed, training recipe, training code
    version, torch version).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import pkgutil
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from circuits.errors import ConfigError, InputError, UnknownModelError, did_you_mean
from circuits.model.transformer import HookedTransformer, TransformerConfig
from circuits.paths import reference_dir
from circuits.zoo.train import TRAIN_CODE_VERSION, Split, TrainRecipe, data_seeds, evaluate, final_test_seed, train

REFERENCE_DIR = reference_dir()  # shipped package data in a wheel, fixtures/models in a checkout
TASK_PACKAGE = "circuits.tasks"
ENTRY_POINT_GROUP = "circuits.zoo"
VARIANT_SEP = "@"

Variant = Union[dict, Callable[["ZooEntry"], "ZooEntry"]]


@dataclass
class ZooEntry:
    name: str
    description: str
    config: Any  # TransformerConfig by default, else the family's config; its `seed` is the model seed
    recipe: Any  # TrainRecipe by default, else the family's recipe (needs `to_dict()`)
    make_split: Optional[Callable[[int, int], Split]] = None  # (n, data_seed) -> Split (default trainer)
    data_recipe: dict = field(default_factory=dict)  # what the data functions do, versioned: in the key
    # training may use an easier-to-learn-from distribution; held-out evaluation always uses make_split
    make_train_split: Optional[Callable[[int, int], Split]] = None
    default_seed: int = 0
    extra: dict = field(default_factory=dict)  # task-specific notes for cards
    # --- another model family (None: the HookedTransformer path) ---
    build_model: Optional[Callable[[Any, int], nn.Module]] = None  # (config, seed) -> untrained model
    train_fn: Optional[Callable[["ZooEntry", int, Any], tuple]] = None  # (entry, seed, progress) -> (model, card)
    spec_fn: Optional[Callable[["ZooEntry", int], dict]] = None  # (entry, seed) -> the store key's spec
    family: str = "transformer"  # shown by `python -m circuits list`
    # seeds whose checkpoint is committed under fixtures/models/ (None: the default seed only)
    reference_seeds: Optional[tuple] = None
    # recipe variants: name -> overrides ({field: value}; a dict value for `config`/`recipe` replaces
    # those fields inside it) or a function entry -> entry. `get_entry("name@variant")` applies one.
    variants: dict = field(default_factory=dict)
    # compiled (e.g. by Tracr, circuits.tasks.tracr.compiled), not trained: its weights depend on no seed, so
    # every seed, --seeds and --retrain load the shipped reference; train_fn only explains that
    compiled: bool = False

    def spec(self, seed: int, backend: Optional[str] = None) -> dict:
        """Everything that determines the trained weights: the store key is its hash. ``backend``
        (default: $CIRCUITS_TRAIN_BACKEND, circuits.zoo.ensemble.backend()) "ensemble" names the stacked
        trainer in the spec (its own key: its weights differ from a single training's by rounding);
        "single" adds nothing, so the keys of every model trained before it stay valid."""
        if self.spec_fn is not None:
            return self.spec_fn(self, seed)
        spec = self._base_spec(seed)
        from circuits.zoo import ensemble

        if (backend or ensemble.backend()) == "ensemble" and ensemble.stackable(self) is None:
            spec["train_backend"] = ensemble.BACKEND
        return spec

    def _base_spec(self, seed: int) -> dict:
        return {
            "name": self.name,
            "config": replace(self.config, seed=seed).to_dict(),
            "data": self.data_recipe,
            "train": self.recipe.to_dict(),
            "seed": seed,
            "train_code": TRAIN_CODE_VERSION,
            "torch": torch.__version__.split("+")[0],
        }

    @property
    def is_transformer(self) -> bool:
        """The default family: weights in TransformerLens layout (convert.py) in references."""
        return self.build_model is None

    def ref_seeds(self) -> tuple:
        return (self.default_seed,) if self.reference_seeds is None else tuple(self.reference_seeds)

    def reference_name(self, seed: int) -> str:
        """File stem of the seed's committed checkpoint: the name for the default seed, else name_s<seed>."""
        return self.name if seed == self.default_seed else f"{self.name}_s{seed}"

    def new_model(self, seed: int) -> nn.Module:
        if self.build_model is not None:
            return self.build_model(self.config, seed)
        return HookedTransformer(replace(self.config, seed=seed))

    def load_state(self, model: nn.Module, state: dict) -> None:
        if self.is_transformer:
            from circuits.model.convert import load_tl_state_dict

            load_tl_state_dict(model, state)
        else:
            model.load_state_dict(state)  # strict; copies into the model's own dtypes

    def reference_state(self, model: nn.Module) -> dict:
        """The state dict a committed reference holds (TL layout for transformers)."""
        if self.is_transformer:
            from circuits.model.convert import to_tl_state_dict

            return to_tl_state_dict(model)
        return model.state_dict()


# --- the registry ------------------------------------------------------------------------------------

ZOO: dict[str, ZooEntry] = {}
_SOURCES: dict[str, str] = {}  # name -> where it came from (for duplicate errors)
_discovered = False


def register(entry: ZooEntry, source: str = "register()") -> ZooEntry:
    """Add an entry (from a conftest.py, a test, a plugin); the same object twice is a no-op."""
    if not isinstance(entry, ZooEntry):
        raise InputError(f"{source}: zoo entries must be ZooEntry objects, got {type(entry).__name__}")
    if VARIANT_SEP in entry.name or not entry.name:
        raise InputError(f"{source}: zoo entry name {entry.name!r} must be non-empty and contain no {VARIANT_SEP!r}")
    old = ZOO.get(entry.name)
    if old is not None and old is not entry:
        raise ConfigError(f"zoo entry {entry.name!r} registered twice: by {_SOURCES.get(entry.name, '?')} and by {source}")
    ZOO[entry.name] = entry
    _SOURCES[entry.name] = source
    return entry


def _entries_from(fn: Callable, source: str) -> Iterable[ZooEntry]:
    try:
        entries = fn() if callable(fn) else fn
        return list(entries)
    except TypeError as e:
        raise InputError(f"{source} must be a callable returning a list of ZooEntry ({e})") from None


def builtin_task_modules() -> list[str]:
    """The modules of circuits.tasks (each may expose `zoo_entries()`)."""
    pkg = importlib.import_module(TASK_PACKAGE)
    return sorted(f"{TASK_PACKAGE}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def _discover() -> None:
    """Built-in task modules, then installed plugins: once per process (register() adds any time)."""
    global _discovered
    if _discovered:
        return
    _discovered = True  # first: a task module that imports the zoo must not discover again
    try:
        for modname in builtin_task_modules():
            fn = getattr(importlib.import_module(modname), "zoo_entries", None)
            if fn is not None:
                for entry in _entries_from(fn, f"{modname}.zoo_entries"):
                    register(entry, modname)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            source = f"entry point {ep.name!r} ({ep.value}) of group {ENTRY_POINT_GROUP!r}"
            try:
                fn = ep.load()
            except Exception as e:  # a broken third-party package: say which one
                raise ConfigError(f"{source} failed to load: {type(e).__name__}: {e}") from None
            for entry in _entries_from(fn, source):
                register(entry, source)
    except BaseException:
        _discovered = False  # a fixed problem is found again next time
        raise


def rediscover() -> None:
    """Forget discovered entries and look again (tests; a newly installed plugin)."""
    global _discovered
    for name, source in list(_SOURCES.items()):
        if source != "register()":
            ZOO.pop(name, None)
            _SOURCES.pop(name, None)
    _discovered = False


def get_entry(name: str) -> ZooEntry:
    """The entry `name`, or `base@variant` (the base entry with that recipe variant)."""
    _discover()
    if not isinstance(name, str):
        raise UnknownModelError(f"a zoo model name is a string, got {type(name).__name__}")
    base, sep, variant = name.partition(VARIANT_SEP)
    if base not in ZOO:
        raise UnknownModelError(f"unknown model {base!r}{did_you_mean(base, ZOO)} "
                                f"(the zoo has {len(ZOO)} entries: `python -m circuits list`)")
    entry = ZOO[base]
    return with_variant(entry, variant) if sep else entry


def with_variant(entry: ZooEntry, variant: str) -> ZooEntry:
    """`entry` trained with its recipe variant `variant`: its own name (so its own store key), no reference."""
    if variant not in entry.variants:
        known = ", ".join(sorted(entry.variants)) or "none"
        raise UnknownModelError(f"unknown variant {variant!r} of {entry.name!r}{did_you_mean(variant, entry.variants)} "
                                f"(its variants: {known})")
    change = entry.variants[variant]
    if callable(change):
        new = change(entry)
        if not isinstance(new, ZooEntry):
            raise InputError(f"variant {entry.name}@{variant} returned {type(new).__name__}, not a ZooEntry")
    else:
        allowed = {f.name for f in fields(ZooEntry)} - {"name", "variants", "reference_seeds"}
        bad = sorted(set(change) - allowed)
        if bad:
            raise InputError(f"variant {entry.name}@{variant} overrides unknown fields {bad}")
        overrides = {}
        for key, value in change.items():
            if key in ("config", "recipe") and isinstance(value, dict):
                try:
                    value = replace(getattr(entry, key), **value)
                except TypeError as e:
                    raise InputError(f"variant {entry.name}@{variant}: bad {key} override ({e})") from None
            overrides[key] = value
        new = replace(entry, **overrides)
    return replace(new, name=f"{entry.name}{VARIANT_SEP}{variant}", variants={}, reference_seeds=())


def names(include_variants: bool = False) -> list[str]:
    _discover()
    out = sorted(ZOO)
    if include_variants:
        out += sorted(f"{n}{VARIANT_SEP}{v}" for n in ZOO for v in ZOO[n].variants)
    return out


def check_seed(seed) -> int:
    from circuits.zoo.seeds import check_seed as check

    return check(seed)


def build_model(entry: ZooEntry, seed: int) -> nn.Module:
    return entry.new_model(seed)


def train_entry(entry: ZooEntry, seed: int, progress=None, recipe: Optional[TrainRecipe] = None, *,
                during: Optional[Callable[[nn.Module], Any]] = None) -> tuple[nn.Module, dict]:
    """Train a zoo model from scratch: returns the model and card fields (metrics, history, time).

    ``during(model)``: a context manager active only while the model trains (training-time extras
    such as dropout hooks; its exit may fold them into the weights), so a family's `train_fn` can
    reuse this whole path (data seeds, held-out test set, card) instead of copying it."""
    if entry.train_fn is not None and during is None:
        return entry.train_fn(entry, seed, progress)
    if entry.make_split is None:
        raise ConfigError(f"zoo entry {entry.name!r} has neither make_split nor train_fn: nothing trains it")
    train_seed, eval_seed = data_seeds(seed)
    t0 = time.perf_counter()
    train_split = (entry.make_train_split or entry.make_split)(entry.recipe.n_train, train_seed)
    eval_split = entry.make_split(entry.recipe.n_eval, eval_seed)
    data_time = time.perf_counter() - t0
    model = build_model(entry, seed)
    with (during(model) if during is not None else contextlib.nullcontext()):
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


def train_for_store(entry: ZooEntry, seed: int, progress=None) -> tuple[nn.Module, dict]:
    """Train (entry, seed) with the backend its spec names (`ZooEntry.spec`): the stacked trainer
    (a stack of one) when the spec names it, else train_entry."""
    spec = entry.spec(seed)
    if "train_backend" in spec:
        from circuits.zoo.ensemble import train_stack

        each = (lambda s, step, total, m: progress(step, total, m)) if progress else None
        return train_stack(entry, [seed], device=_train_device(), progress=each)[seed]
    return train_entry(entry, seed, progress)


def _train_device() -> str:
    from circuits.zoo.train import _DEVICE

    return _DEVICE.get()


@dataclass
class LoadedModel:
    model: nn.Module
    card: dict
    source: str  # "reference" | "cache" | "trained"
    entry: ZooEntry
    seed: int

    def info(self) -> dict:
        """What the report records about this model."""
        return model_info(self.entry.name, self.seed, self.card, self.source)


def card_n_test(card: dict) -> int:
    """The size of the card's final held-out test set (its spec's recipe; 0 without one)."""
    train = ((card.get("spec") or {}).get("train") or {}) if isinstance(card, dict) else {}
    return int(train.get("n_test") or 0)


def model_info(name: str, seed: int, card: dict, source: str) -> dict:
    """The report's record of a model (`circuits.plugin.pytest_plugin.note_model`), from its card."""
    return {
        "n_test": card_n_test(card),
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
    """retrain: skip the reference checkpoint even for a reference seed (the pytest plugin then
    passes a store inside the run's report dir, so each run trains afresh and xdist workers share
    one training); force: retrain even if `store` already holds the model (the CLI's `train`)."""
    from circuits.zoo.store import ModelStore, load_reference

    entry = get_entry(name)
    seed = entry.default_seed if seed is None else check_seed(seed)
    if entry.compiled:  # one model, whatever the seed: the shipped compiled weights
        seed, retrain = entry.default_seed, False
    spec = entry.spec(seed)
    model = entry.new_model(seed)
    if seed in entry.ref_seeds() and not retrain:  # committed references were trained by the single trainer
        state, card = load_reference(reference_dir, entry.reference_name(seed), entry.spec(seed, "single"))
        source = "reference"
    else:
        store = store or ModelStore()

        def build():
            trained, card = train_for_store(entry, seed, progress)
            return trained.state_dict(), card

        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())  # sizes the free-space check
        state, card, created = store.get_or_create(spec, build, force=force, expected_bytes=weights)
        source = "trained" if created else "cache"
    entry.load_state(model, state)
    return LoadedModel(model.to(device).eval(), card, source, entry, seed)


def find_card(name: str, seed: Optional[int] = None, *, store=None,
              reference_dir: Path = REFERENCE_DIR) -> Optional[dict]:
    """The card of a trained model without loading its weights: the reference for a reference seed,
    else the store's entry, else None (not trained yet)."""
    from circuits.zoo.store import ModelStore, load_reference, spec_key

    entry = get_entry(name)
    seed = entry.default_seed if seed is None else check_seed(seed)
    if entry.compiled:
        seed = entry.default_seed
    if seed in entry.ref_seeds():
        return load_reference(reference_dir, entry.reference_name(seed), entry.spec(seed, "single"))[1]
    found = (store or ModelStore()).load(spec_key(entry.spec(seed)))
    return None if found is None else found[1]


def save_reference(loaded: LoadedModel, reference_dir: Path = REFERENCE_DIR) -> dict:
    """Write `loaded` as the committed reference of its seed; returns the written card."""
    from circuits.zoo.store import save_reference as _save

    entry, seed = loaded.entry, loaded.seed
    if seed not in entry.ref_seeds():
        raise InputError(f"{entry.name}: seed {seed} is not a reference seed (reference seeds: {list(entry.ref_seeds())})")
    return _save(reference_dir, entry.reference_name(seed), entry.reference_state(loaded.model.cpu()),
                 {**loaded.card, "spec": entry.spec(seed, "single")})

"""Negative controls: transformations under which a test's claims must fail.

A control is named by a spec string ``"name"`` or ``"name:arg1,arg2"`` (``"untrained"``,
``"zero_ablate:L2H0"``, ``"zero_ablate:count_head"``, ``"permute_heads:L2"``, ``"shuffle_labels"``).
``register_control(name, kind=..., fn=...)`` adds one; ``fn(target, *args, seed=...)`` must return a
NEW object (a model for ``kind="model"``, a dataset / batch for ``kind="data"``) and leave its input
untouched. The plugin parametrises a test marked ``@pytest.mark.controls(...)`` over the main run and
each control, and gives fixtures a :class:`Control` through the ``control`` fixture:

    model = control.apply_model(reference_model)   # identity on the main run
    data = control.apply_data(eval_set)            # identity unless a data control is active

The built-ins call ``circuits.analysis.interventions`` (imported when a control is applied).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from circuits.errors import ControlError
from circuits.records import MAIN  # the main run's spec: defined once, in the records' schema

__all__ = [
    "Control",
    "Labels",
    "ControlError",
    "UnknownControlError",
    "MAIN",
    "register_control",
    "registered_controls",
    "parse_spec",
    "parse_head",
    "parse_layer",
    "make_control",
    "main_control",
]

KINDS = ("model", "data", "part")  # "part": re-points the part a claim reads (Control.mlp / .feature)
_HEAD_RE = re.compile(r"^L(\d+)H(\d+)$")
_LAYER_RE = re.compile(r"^L(\d+)$")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class UnknownControlError(ControlError):
    """A control name that is not registered; the message lists the known ones."""


@dataclass(frozen=True)
class _Entry:
    name: str
    kind: str
    fn: Callable[..., Any]
    head_args: bool
    description: str
    accepts: Callable[[Any], bool] | None = None


_REGISTRY: dict[str, _Entry] = {}


def register_control(
    name: str,
    *,
    kind: str,
    fn: Callable[..., Any],
    head_args: bool = False,
    description: str = "",
    replace: bool = False,
    accepts: Callable[[Any], bool] | None = None,
) -> None:
    """Register a control ``name`` of ``kind`` "model" or "data".

    ``fn(target, *args, seed=...)`` returns a new transformed object; ``args`` are the spec's
    arguments as strings, or, with ``head_args=True``, ``(layer, head)`` tuples resolved from
    ``L{l}H{h}`` or from a role name in the ``head_roles`` fixture. Registering a name twice is an
    error unless it is the same function again (a re-imported conftest) or ``replace=True``.
    ``accepts(target)``, for data controls, says which objects the control transforms: a test may
    pass several objects through ``apply_data`` and only the accepted ones are changed (with an
    attribute ``takes_args = True`` it is called as ``accepts(target, *args)``).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name) or name == MAIN:
        raise ControlError(f"control name must be an identifier other than {MAIN!r}, got {name!r}")
    if kind not in KINDS:
        raise ControlError(f"control {name!r}: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    if not callable(fn):
        raise ControlError(f"control {name!r}: fn must be callable, got {type(fn).__name__}")
    old = _REGISTRY.get(name)
    if old is not None and not replace and _qualname(old.fn) != _qualname(fn):
        raise ControlError(f"control {name!r} is already registered (by {_qualname(old.fn)}); "
                           "pass replace=True to override it")
    _REGISTRY[name] = _Entry(name, kind, fn, head_args, description, accepts)


def _qualname(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def registered_controls() -> dict[str, str]:
    """Known control names -> kind (sorted)."""
    return {k: _REGISTRY[k].kind for k in sorted(_REGISTRY)}


def parse_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """``"zero_ablate:L2H0,L1H3"`` -> ``("zero_ablate", ("L2H0", "L1H3"))``; checks the name is known."""
    if not isinstance(spec, str) or not spec.strip():
        raise ControlError(f"a control spec must be a non-empty string, got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    args = tuple(a.strip() for a in rest.split(",")) if rest else ()
    if any(not a for a in args):
        raise ControlError(f"control spec {spec!r} has an empty argument")
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise UnknownControlError(f"unknown control {name!r} in spec {spec!r}; known controls: {known}")
    return name, args


def parse_head(spec: str) -> tuple[int, int]:
    """``"L2H0"`` -> ``(2, 0)``."""
    m = _HEAD_RE.match(spec.strip()) if isinstance(spec, str) else None
    if not m:
        raise ControlError(f"not a head like 'L2H0': {spec!r}")
    return int(m.group(1)), int(m.group(2))


def parse_layer(spec: str) -> int:
    """``"L2"`` -> ``2``."""
    m = _LAYER_RE.match(spec.strip()) if isinstance(spec, str) else None
    if not m:
        raise ControlError(f"not a layer like 'L2': {spec!r}")
    return int(m.group(1))


@dataclass(frozen=True)
class Labels:
    """Per-example labels on their way through a data control (:meth:`Control.apply_labels`)."""

    labels: Any


@dataclass
class Control:
    """One negative control of one test run (or the null control of the main run).

    ``apply_model`` / ``apply_data`` return the transformed object when this control is of that
    kind, and their argument unchanged otherwise. The plugin checks after the test that an active
    control was applied at least once, so a control cannot silently do nothing.
    """

    name: str = MAIN
    spec: str = MAIN
    args: tuple = ()
    kind: str | None = None
    seed: int = 0
    _roles: Callable[[], Mapping[str, Any]] | None = field(default=None, repr=False)
    applied: int = 0

    @property
    def is_main(self) -> bool:
        return self.name == MAIN

    def apply_model(self, model: Any) -> Any:
        return self._apply("model", model)

    def apply_data(self, obj: Any) -> Any:
        return self._apply("data", obj)

    def apply_labels(self, labels: Any) -> Any:
        """``labels`` (a tensor / array of per-example labels) after this control when it acts on
        labels (``shuffle_labels``: permuted), else unchanged (the same object): what passing a
        dataclass with a ``labels`` field through :meth:`apply_data` does, without defining one."""
        return self.apply_data(Labels(labels)).labels

    def mlp(self, layer: int) -> int:
        """The layer of the MLP a claim about ``mlp:L<layer>`` reads: ``layer`` itself on every run
        except that target's specificity alternatives (``other_mlp:L2,L0``: the same claim computed
        on MLP 0), so a claim that holds for any MLP is caught as unspecific. Another layer comes
        back unchanged (a claim about two MLPs reads both; each alternative moves one), so a test
        about ``mlp:L2`` that never reads layer 2 here leaves its alternative unapplied: an error."""
        layer = int(layer)
        if self.name != "other_mlp":
            return layer
        named, alternative = (parse_layer(a) for a in self.args)
        if layer != named:
            return layer
        self.applied += 1
        return alternative

    def feature(self, name: str, values: Any) -> Any:
        """The values of the feature ``name`` a claim about ``feature:<name>`` reads (per example, a
        tensor or array): unchanged on every run except that target's specificity alternative
        (``independent_feature:<name>``), where they are permuted across examples: a feature with
        the same values and marginal distribution, independent of the named one and of the input.
        A claim that holds as well for it says nothing about the named feature."""
        if self.name != "independent_feature" or self.args[0] != name:
            return values
        import numpy as np
        import torch

        perm = torch.randperm(len(values), generator=torch.Generator().manual_seed(self.seed))
        self.applied += 1
        if isinstance(values, torch.Tensor):
            return values[perm.to(values.device)]
        return np.asarray(values)[perm.numpy()]

    def _apply(self, kind: str, target: Any) -> Any:
        if self.is_main or self.kind != kind:
            return target
        entry = _REGISTRY[self.name]
        args = self._resolved_args(entry)
        if entry.accepts is not None and not (entry.accepts(target, *args) if getattr(entry.accepts, "takes_args", False)
                                              else entry.accepts(target)):
            return target
        try:
            out = entry.fn(target, *args, seed=self.seed)
        except AttributeError as exc:  # a model without the parts this control edits: one line, not a traceback
            raise ControlError(f"control {self.spec!r} cannot be applied to a {_type_name(target)} "
                               f"({exc}); it needs a circuits HookedTransformer or a model with the same "
                               "parameter names") from None
        if out is target:
            raise ControlError(f"control {self.spec!r} returned its input; a control must return a new object")
        self.applied += 1
        return out

    def _resolved_args(self, entry: _Entry) -> tuple:
        if not entry.head_args:
            return self.args
        return tuple(self._head(a) for a in self.args)

    def _head(self, arg: str) -> tuple[int, int]:
        if _HEAD_RE.match(arg):
            return parse_head(arg)
        roles = self._roles() if self._roles is not None else None
        if not roles or arg not in roles:
            known = ", ".join(sorted(roles)) if roles else "no head_roles fixture / no roles"
            raise ControlError(f"control {self.spec!r}: {arg!r} is neither a head like 'L2H0' nor a "
                               f"role in the head_roles fixture ({known})")
        layer, head = roles[arg]
        return int(layer), int(head)

    def describe(self) -> str:
        return "main run" if self.is_main else f"control {self.spec!r} ({self.kind})"


def main_control() -> Control:
    """The null control of a main run: applying it is the identity."""
    return Control()


def make_control(spec: str, *, seed: int = 0, roles: Callable[[], Mapping[str, Any]] | None = None) -> Control:
    """Build the :class:`Control` of a spec. ``roles()`` returns a role -> (layer, head) mapping."""
    if spec == MAIN:
        return main_control()
    name, args = parse_spec(spec)
    entry = _REGISTRY[name]
    if entry.head_args and not args:
        raise ControlError(f"control {spec!r} needs at least one head, e.g. '{name}:L2H0'")
    return Control(name=name, spec=spec, args=args, kind=entry.kind, seed=seed, _roles=roles)


# --- built-ins ----------------------------------------------------------------------------------------


def _untrained(model: Any, seed: int = 0) -> Any:
    """A circuits model re-initialised with its own scheme; any other ``nn.Module`` through the
    ``reset_parameters()`` of its submodules (torch's own layers have one), under a fixed seed."""
    if hasattr(model, "init_weights") and hasattr(model, "cfg"):
        return intervention("reinitialize")(model, seed=seed)
    import copy

    import torch

    if not isinstance(model, torch.nn.Module):
        raise ControlError(f"control 'untrained' needs a torch.nn.Module, got a {_type_name(model)}")
    new = copy.deepcopy(model)
    resettable = [m for m in new.modules() if callable(getattr(m, "reset_parameters", None))]
    if not resettable:
        raise ControlError(f"control 'untrained' cannot re-initialise a {_type_name(model)}: it needs "
                           "init_weights(seed) or submodules with reset_parameters()")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in resettable:
            m.reset_parameters()
    return new


def _type_name(obj: Any) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}".replace("builtins.", "")


def intervention(name: str) -> Callable[..., Any]:
    """The function ``name`` of :mod:`circuits.analysis.interventions`, looked up when a control is applied
    (so torch loads then, not when the plugin does)."""
    from circuits.analysis import interventions

    return getattr(interventions, name)


def per_head(name: str, *, seeded: bool = False) -> Callable[..., Any]:
    """A control fn applying the intervention ``name(model, layer, head)`` to each head of the spec
    in turn (``head_args=True`` resolves them); ``seeded`` passes the control's seed on."""
    def apply(model: Any, *heads: tuple[int, int], seed: int = 0) -> Any:
        fn = intervention(name)
        for layer, head in heads:
            model = fn(model, layer, head, seed=seed) if seeded else fn(model, layer, head)
        return model

    return apply


def per_layer(name: str, spec: str, *, seeded: bool = False) -> Callable[..., Any]:
    """A control fn applying the intervention ``name(model, layer)`` to each layer of the spec
    (``"spec:L2,L3"``) in turn; ``seeded`` passes the control's seed on."""
    def apply(model: Any, *layers: str, seed: int = 0) -> Any:
        if not layers:
            raise ControlError(f"{spec} needs a layer, e.g. '{spec}:L2'")
        fn = intervention(name)
        for arg in layers:
            model = fn(model, parse_layer(arg), seed=seed) if seeded else fn(model, parse_layer(arg))
        return model

    return apply


def _shuffle_labels(obj: Any, seed: int = 0) -> Any:
    return intervention("shuffle_labels")(obj, seed=seed)


def _has_label_field(obj: Any) -> bool:
    import dataclasses

    from circuits.analysis.interventions import LABEL_FIELDS

    return dataclasses.is_dataclass(obj) and any(f.name in LABEL_FIELDS for f in dataclasses.fields(obj))


register_control("untrained", kind="model", fn=_untrained,
                 description="the same architecture, freshly initialised")
register_control("zero_ablate", kind="model", fn=per_head("zero_ablate_head"), head_args=True,
                 description="the named heads' outputs set to zero")
register_control("zero_ablate_mlp", kind="model", fn=per_layer("zero_ablate_mlp", "zero_ablate_mlp"),
                 description="the named layers' MLP outputs set to zero")
register_control("permute_heads", kind="model", fn=per_layer("permute_heads", "permute_heads", seeded=True),
                 description="the heads of a layer shuffled")
register_control("shuffle_labels", kind="data", fn=_shuffle_labels, accepts=_has_label_field,
                 description="the evaluation labels permuted")

"""Targeted mutations: break exactly the part of a model a claim is about.

A test declares what its claims are about with ``@pytest.mark.about(...)``; the plugin derives the
mutations below from it and runs the test once per mutation, requiring every claim to FAIL — the
claim's *power* (as mutation testing judges a test suite). A claim that still holds after the part it
names was destroyed fails the run as "no power".

What a target names, and the mutations it gets (``X`` is a head ``L2H0`` or a role name bound by the
``head_roles`` fixture; ``L`` a layer ``L2``):

==================  ==========================================================================
``head:X``          the whole head: ``zero_ablate:X``, ``mean_ablate:X``, ``swap_head:X``
``ov:X``            the head's output: ``zero_ablate:X``, ``mean_ablate:X``
``qk:X``            the head's attention pattern: ``uniform_attention:X``, ``swap_head:X``
``mlp:L``           an MLP: ``zero_ablate_mlp:L``, ``mean_ablate_mlp:L``
``attn:L``          every head of a layer together: ``zero_ablate_attn:L``, ``mean_ablate_attn:L``
``path:X``          head X's path in a causal-scrubbing hypothesis: ``zero_ablate:X``, ``swap_head:X``
``positions[:a-b]`` the positional embeddings (of positions a..b): ``permute_positions[:a-b]``
``read_in``         the token embedding / vector read-in: ``randomise_read_in``
``model``           the whole model: ``untrained``
``feature:NAME``    a feature the claim reads through ``control.feature(NAME, values)``: none
==================  ==========================================================================

Specificity alternatives (the same claim pointed elsewhere; each must FAIL, or the claim is
"unspecific"): a head gets every other head (of its layer, or of the model for a role binding); an
MLP ``mlp:L2``, which the test reads through ``control.mlp(2)``, every other layer's MLP
(``other_mlp:L2,L0``); a feature, an independent feature with the same values
(``independent_feature:NAME``, a permutation across examples).

``@pytest.mark.about(none="why")`` says the test's claims are about no part of a model (a bound any
model obeys, a refuted claim, a fact about data): no mutation is derived, and the report shows why.

Every mutation is an intervention of :mod:`circuits.analysis.interventions` and returns a NEW model
(the input is never modified). ``swap_head:X`` (``interventions.swap_heads``) exchanges all weights of
head X with the next head of its layer: the model computes the same function, but index X now names
the other circuit, so a claim pinned to X must notice. ``mean_ablate`` (``interventions.
batch_mean_ablate_head``) replaces the output by its mean over the batch at each position
(non-padding rows only), computed on the fly from the batch being evaluated. A model whose exact
evaluation runs no hooks (the associative memories' ``table_logits``) does the hook-based ones in its
weights: it defines ``weight_mutation(name, *args)``, returning the mutant or None for a name it
leaves to the hooks (``interventions._in_weights``). Mutations need a circuits ``HookedTransformer`` (or a model with the
same parameter names); on another model they fail with one line saying what is missing.
"""

from __future__ import annotations

import re
from typing import Any

from circuits.claims.controls import ControlError, intervention, parse_layer, per_head, per_layer, register_control

__all__ = ["TARGETS", "derive_mutations", "derive_alternatives", "parse_target", "about_none", "rebind",
           "register_model_shape", "model_shape", "SameBindingError"]

TARGETS = {
    "head": ("zero_ablate:{}", "mean_ablate:{}", "swap_head:{}"),
    "ov": ("zero_ablate:{}", "mean_ablate:{}"),
    "qk": ("uniform_attention:{}", "swap_head:{}"),
    "mlp": ("zero_ablate_mlp:{}", "mean_ablate_mlp:{}"),
    # all heads of a layer together: for claims about what the heads store jointly (one head of 20 is
    # no test of them); no swap, which such a claim cannot notice
    "attn": ("zero_ablate_attn:{}", "mean_ablate_attn:{}"),
    # a head's path in a causal-scrubbing hypothesis: dead (its output zeroed in the weights) or swapped
    # with its sibling; weight edits only, so a scrub's cached activations describe the mutant exactly
    "path": ("zero_ablate:{}", "swap_head:{}"),
    "positions": ("permute_positions{}",),
    "read_in": ("randomise_read_in",),
    "model": ("untrained",),
    # a feature the claim reads (its labels, a quantity a head tracks): nothing of the model to break,
    # so no mutation; its specificity alternative is an independent feature of the same distribution
    "feature": (),
}
_TAKES_ARG = ("head", "ov", "qk", "mlp", "attn", "path", "feature")
_BY_LAYER = ("mlp", "attn")  # targets named by a layer, 'mlp:L2'
_RANGE_RE = re.compile(r"^(\d+)-(\d+)$")


def parse_target(target: str) -> tuple[str, str | None]:
    """``"head:count_head"`` -> ``("head", "count_head")``; ``"positions:1-10"``; ``"read_in"``."""
    if not isinstance(target, str) or not target.strip():
        raise ControlError(f"@pytest.mark.about needs targets like 'head:L2H0', got {target!r}")
    kind, _, arg = target.strip().partition(":")
    if kind not in TARGETS:
        raise ControlError(f"unknown target kind {kind!r} in about({target!r}); known: "
                           + ", ".join(f"{k}:..." if k in _TAKES_ARG else k for k in TARGETS))
    takes_arg = kind in _TAKES_ARG
    if takes_arg and not arg:
        raise ControlError(f"about({target!r}): {kind} needs a part, e.g. '{kind}:L2H0'"
                           if kind not in _BY_LAYER else f"about({target!r}): {kind} needs a layer, e.g. '{kind}:L2'")
    if not takes_arg and kind != "positions" and arg:
        raise ControlError(f"about({target!r}): {kind} takes no argument")
    if kind == "positions" and arg and not _RANGE_RE.match(arg):
        raise ControlError(f"about({target!r}): positions take a range like 'positions:1-10'")
    if kind in _BY_LAYER:
        parse_layer(arg)
    if kind == "feature" and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", arg):
        raise ControlError(f"about({target!r}): a feature is named by an identifier, e.g. 'feature:open_proportion'")
    return kind, arg or None


def about_none(markers) -> str | None:
    """The reason of ``@pytest.mark.about(none="...")`` among a test's ``about`` markers, or None.
    A marker with neither a target nor ``none=``, or with both, is a ControlError."""
    reasons = []
    for m in markers:
        none = m.kwargs.get("none")
        if none is not None and (not isinstance(none, str) or not none.strip()):
            raise ControlError(f"about(none={none!r}): give the reason the claims are about no part, as a sentence")
        if none is not None and m.args:
            raise ControlError(f"about({', '.join(map(repr, m.args))}, none=...): a test about parts is not about none")
        if none is None and not m.args:
            raise ControlError("@pytest.mark.about() names nothing: give targets ('head:L2H0', ...) or "
                               "none='why the claims are about no part of a model'")
        if none is not None:
            reasons.append(none.strip())
    if reasons and any(m.args for m in markers):
        raise ControlError("about(none=...) and about(targets) on one test: it is about parts or about none")
    return "; ".join(reasons) or None


def derive_mutations(targets: list[str]) -> list[str]:
    """The mutation specs (registered control specs) a list of ``about`` targets calls for, in order,
    without duplicates."""
    out: list[str] = []
    for target in targets:
        kind, arg = parse_target(target)
        for pattern in TARGETS[kind]:
            if kind == "positions":
                spec = pattern.format(f":{arg}" if arg else "")
            else:
                spec = pattern.format(arg) if "{}" in pattern else pattern
            if spec not in out:
                out.append(spec)
    return out


# --- specificity: the same claim pointed at each alternative of the part it names ---------------------
#
# A claim about head X must fail when X is replaced by another head: otherwise the named part is not
# distinguishable from its alternatives and the claim is "unspecific". The alternatives reuse the
# binding the claims already read: a role (``head:count_head``) is re-pointed by the ``rebind`` data
# control (``rebind:count_head,L0H1``: the test's role binding, passed through ``control.apply_data``,
# now names L0H1); a head named by index (``ov:L0H2``) by exchanging the weights of X and Y
# (``swap_with:L0H2,L0H0``: the same function, index X now names Y's circuit). Alternatives are every
# other head of the model for a role (the binding is known only at run time, so a run whose
# alternative IS the bound head skips itself), every other head of X's layer for an index (weights
# cannot move across layers without changing the function).

_SHAPES: dict[str, tuple[int, int]] = {}


def register_model_shape(fixture: str, n_layers: int, n_heads: int) -> None:
    """Tell the plugin the shape of the model a fixture that is no zoo entry serves (a checkpoint
    loaded in a conftest), so that claims on it get their alternatives at collection."""
    _SHAPES[fixture] = (int(n_layers), int(n_heads))


def model_shape(fixtures) -> tuple[int, int] | None:
    """(n_layers, n_heads) of the first model fixture among ``fixtures`` whose shape is known: one
    registered with :func:`register_model_shape`, or a zoo entry's config (``<name>_model``)."""
    for name in fixtures:
        if name in _SHAPES:
            return _SHAPES[name]
    for name in fixtures:
        if not name.endswith("_model"):
            continue
        from circuits.zoo import registry as zoo

        try:
            cfg = zoo.get_entry(name[: -len("_model")]).config
        except Exception:  # not a zoo entry: no shape from it
            continue
        if hasattr(cfg, "n_layers") and hasattr(cfg, "n_heads"):
            return int(cfg.n_layers), int(cfg.n_heads)
    return None


SCOPES = ("model", "layer", False)  # False: a claim about the model's behaviour (below)


def derive_alternatives(targets: list[str], shape: tuple[int, int] | None, scope: str = "model") -> list[str]:
    """The specificity variants (registered control specs) of a test's ``about`` targets on a model of
    ``shape`` = (n_layers, n_heads): ``rebind:ROLE,LlHh`` for every head of the model (a role; with
    ``scope="layer"``, ``@pytest.mark.about(..., alternatives="layer")``, where the hypothesis names
    the layer, the runs outside the bound head's layer skip themselves), or ``swap_with:LlHh,LlHk``
    for every other head of the layer (an index); with ``scope=False`` none (a claim about the
    model's behaviour, ``about("model", "mlp:L2", alternatives=False)``); ``other_mlp:L2,Lk`` for every other layer of an
    ``mlp:L2`` target (the test reads its layer through ``control.mlp``); ``independent_feature:NAME``
    for a ``feature:NAME`` target (read through ``control.feature``). Positions, the read-in and the
    whole model have no alternative of their kind here."""
    from circuits.claims.controls import _HEAD_RE

    if scope not in SCOPES:
        raise ControlError(f"about(..., alternatives={scope!r}): expected one of {', '.join(map(repr, SCOPES))}")
    if scope is False:
        # a claim about the model's behaviour that names no part in what it computes (a correlation of
        # its outputs, an accuracy): its parts are where its power comes from, so it has mutations but
        # nothing to point elsewhere; only allowed with "model" among the targets
        if "model" not in targets:
            raise ControlError("about(..., alternatives=False) is for claims about the model's behaviour: list "
                               "'model' among the targets (the other targets are then its power only)")
        return []
    out: list[str] = []
    for target in targets:  # a feature's alternative needs no model shape
        kind, arg = parse_target(target)
        if kind == "feature" and f"independent_feature:{arg}" not in out:
            out.append(f"independent_feature:{arg}")
    if shape is None:
        return out
    n_layers, n_heads = shape
    for target in targets:
        kind, arg = parse_target(target)
        if kind == "mlp":
            named = parse_layer(arg)
            out += [s for s in (f"other_mlp:{arg},L{k}" for k in range(n_layers) if k != named) if s not in out]
            continue
        if kind not in ("head", "ov", "qk") or arg is None:
            continue
        m = _HEAD_RE.match(arg)
        if m:
            layer, head = int(m.group(1)), int(m.group(2))
            specs = [f"swap_with:{arg},L{layer}H{h}" for h in range(n_heads) if h != head]
        else:
            specs = [f"rebind:{arg},L{l}H{h}" + (",layer" if scope == "layer" else "")
                     for l in range(n_layers) for h in range(n_heads)]
        out += [s for s in specs if s not in out]
    return out


class SameBindingError(ControlError):
    """A rebind whose alternative is the head the role is bound to: that run is the main run again."""


def rebind(binding: Any, role: str, head: str, scope: str = "model", seed: int = 0) -> Any:
    """A copy of a role binding with ``role`` pointed at ``head`` (``"L0H1"``): a dict role -> (layer,
    head), or a dataclass with a field named ``role``. The alternative run of a specificity check.
    With ``scope="layer"`` a head outside the bound head's layer is no alternative either."""
    import dataclasses

    from circuits.claims.controls import parse_head

    new = parse_head(head)
    old = binding.get(role) if isinstance(binding, dict) else getattr(binding, role)
    if tuple(old) == new:
        raise SameBindingError(f"rebind:{role},{head}: {role} is bound to {head}; no alternative")
    if scope == "layer" and int(old[0]) != new[0]:
        raise SameBindingError(f"rebind:{role},{head}: outside layer {int(old[0])}, the layer the hypothesis names")
    if isinstance(binding, dict):
        return {**binding, role: new}
    return dataclasses.replace(binding, **{role: new})


def _binds(obj: Any, role: str) -> bool:
    import dataclasses

    if isinstance(obj, dict):
        return role in obj
    return dataclasses.is_dataclass(obj) and not isinstance(obj, type) and role in {
        f.name for f in dataclasses.fields(obj)}


def _rebind_control(binding: Any, role: str, head: str, scope: str = "model", seed: int = 0) -> Any:
    try:
        return rebind(binding, role, head, scope, seed=seed)
    except SameBindingError as exc:  # this alternative is the bound head: the main run, not a variant
        import pytest

        pytest.skip(f"not an alternative: {exc}")


def _binds_role(obj: Any, role: str = "", *rest: str) -> bool:
    return _binds(obj, role)


_binds_role.takes_args = True  # type: ignore[attr-defined]


def _swap_with(model: Any, first: tuple[int, int], second: tuple[int, int], seed: int = 0) -> Any:
    if first[0] != second[0]:
        raise ControlError(f"swap_with:L{first[0]}H{first[1]},L{second[0]}H{second[1]}: the heads must share a "
                           "layer (weights moved across layers change the function)")
    return intervention("swap_heads")(model, first[0], first[1], second[1])


# --- registered as controls (the plugin runs a mutation as a control named "mutate:<spec>") ----------


def _positions(model, *args, seed: int = 0):
    if not args:
        return intervention("permute_positions")(model, seed=seed)
    m = _RANGE_RE.match(args[0]) if len(args) == 1 else None
    if not m:
        raise ControlError(f"permute_positions takes one range like 'permute_positions:1-10', got {args}")
    return intervention("permute_positions")(model, int(m.group(1)), int(m.group(2)), seed=seed)


register_control("swap_head", kind="model", fn=per_head("swap_heads"), head_args=True,
                 description="all weights of the head exchanged with the next head of its layer")
register_control("mean_ablate", kind="model", fn=per_head("batch_mean_ablate_head"), head_args=True,
                 description="the head's output replaced by its batch mean at each position")
register_control("uniform_attention", kind="model", fn=per_head("uniform_attention"), head_args=True,
                 description="the head's queries zeroed: uniform attention over the allowed keys")
register_control("mean_ablate_mlp", kind="model", fn=per_layer("batch_mean_ablate_mlp", "mean_ablate_mlp"),
                 description="the MLP's output replaced by its batch mean at each position")
register_control("zero_ablate_attn", kind="model", fn=per_layer("zero_ablate_attn", "zero_ablate_attn"),
                 description="every head of the layer removed (W_O zeroed)")
register_control("mean_ablate_attn", kind="model", fn=per_layer("batch_mean_ablate_attn", "mean_ablate_attn"),
                 description="every head of the layer replaced by its batch mean at each position")
register_control("permute_positions", kind="model", fn=_positions,
                 description="positional embeddings moved to other positions (a derangement)")
register_control("randomise_read_in", kind="model", fn=lambda m, seed=0: intervention("randomise_read_in")(m, seed=seed),
                 description="the token embedding / vector read-in freshly initialised")

def _part_only(*args, **kwargs):
    raise ControlError("a part alternative is read through control.mlp() / control.feature(), not applied to "
                       "a model or data")


register_control("other_mlp", kind="part", fn=_part_only,
                 description="the claim computed on another layer's MLP (a specificity alternative; read "
                             "through control.mlp)")
register_control("independent_feature", kind="part", fn=_part_only,
                 description="the feature replaced by an independent one of the same distribution (a "
                             "specificity alternative; read through control.feature)")
register_control("swap_with", kind="model", fn=_swap_with, head_args=True,
                 description="all weights of two heads of a layer exchanged (a specificity alternative)")
register_control("rebind", kind="data", fn=_rebind_control, accepts=_binds_role,
                 description="a role binding re-pointed at another head (a specificity alternative)")

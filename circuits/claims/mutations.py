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
``path:X``          head X's path in a causal-scrubbing hypothesis: ``zero_ablate:X``, ``swap_head:X``
``positions[:a-b]`` the positional embeddings (of positions a..b): ``permute_positions[:a-b]``
``read_in``         the token embedding / vector read-in: ``randomise_read_in``
``model``           the whole model: ``untrained``
==================  ==========================================================================

Every mutation returns a NEW model (the input is never modified). ``swap_head:X`` exchanges all
weights of head X with the next head of its layer: the model computes the same function, but index
X now names the other circuit, so a claim pinned to X must notice. ``mean_ablate`` replaces the
output by its mean over the batch at each position (non-padding rows only), computed on the fly
from the batch being evaluated. Mutations need a circuits ``HookedTransformer`` (or a model with the
same parameter names); on another model they fail with one line saying what is missing.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from circuits.claims.controls import ControlError, parse_layer, register_control

__all__ = ["TARGETS", "derive_mutations", "derive_alternatives", "parse_target", "swap_heads", "uniform_attention",
           "mean_ablate_head", "mean_ablate_mlp", "permute_positions", "randomise_read_in", "rebind",
           "register_model_shape", "model_shape", "SameBindingError"]

TARGETS = {
    "head": ("zero_ablate:{}", "mean_ablate:{}", "swap_head:{}"),
    "ov": ("zero_ablate:{}", "mean_ablate:{}"),
    "qk": ("uniform_attention:{}", "swap_head:{}"),
    "mlp": ("zero_ablate_mlp:{}", "mean_ablate_mlp:{}"),
    # a head's path in a causal-scrubbing hypothesis: dead (its output zeroed in the weights) or swapped
    # with its sibling; weight edits only, so a scrub's cached activations describe the mutant exactly
    "path": ("zero_ablate:{}", "swap_head:{}"),
    "positions": ("permute_positions{}",),
    "read_in": ("randomise_read_in",),
    "model": ("untrained",),
}
_RANGE_RE = re.compile(r"^(\d+)-(\d+)$")


def parse_target(target: str) -> tuple[str, str | None]:
    """``"head:count_head"`` -> ``("head", "count_head")``; ``"positions:1-10"``; ``"read_in"``."""
    if not isinstance(target, str) or not target.strip():
        raise ControlError(f"@pytest.mark.about needs targets like 'head:L2H0', got {target!r}")
    kind, _, arg = target.strip().partition(":")
    if kind not in TARGETS:
        raise ControlError(f"unknown target kind {kind!r} in about({target!r}); known: "
                           + ", ".join(f"{k}:..." if "{}" in TARGETS[k][0] else k for k in TARGETS))
    takes_arg = "{}" in TARGETS[kind][0] and kind != "positions"
    if takes_arg and not arg:
        raise ControlError(f"about({target!r}): {kind} needs a part, e.g. '{kind}:L2H0'"
                           if kind != "mlp" else f"about({target!r}): mlp needs a layer, e.g. 'mlp:L2'")
    if not takes_arg and kind != "positions" and arg:
        raise ControlError(f"about({target!r}): {kind} takes no argument")
    if kind == "positions" and arg and not _RANGE_RE.match(arg):
        raise ControlError(f"about({target!r}): positions take a range like 'positions:1-10'")
    if kind == "mlp":
        parse_layer(arg)
    return kind, arg or None


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


SCOPES = ("model", "layer")


def derive_alternatives(targets: list[str], shape: tuple[int, int] | None, scope: str = "model") -> list[str]:
    """The specificity variants (registered control specs) of a test's ``about`` targets on a model of
    ``shape`` = (n_layers, n_heads): ``rebind:ROLE,LlHh`` for every head of the model (a role; with
    ``scope="layer"``, ``@pytest.mark.about(..., alternatives="layer")``, where the hypothesis names
    the layer, the runs outside the bound head's layer skip themselves), or ``swap_with:LlHh,LlHk``
    for every other head of the layer (an index). Other targets (MLPs named by layer, positions,
    read-in, the whole model) get none here."""
    from circuits.claims.controls import _HEAD_RE

    if scope not in SCOPES:
        raise ControlError(f"about(..., alternatives={scope!r}): expected one of {', '.join(SCOPES)}")
    out: list[str] = []
    if shape is None:
        return out
    n_layers, n_heads = shape
    for target in targets:
        kind, arg = parse_target(target)
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
    return swap_heads(model, first[0], first[1], second[1])


# --- the mutations -----------------------------------------------------------------------------------


def _need(model: Any, what: str, mutation: str) -> None:
    ok = {"attention": lambda m: hasattr(m, "blocks") and hasattr(m.blocks[0], "attn") and hasattr(m.blocks[0].attn, "W_O"),
          "mlp": lambda m: hasattr(m, "blocks") and getattr(m.blocks[0], "mlp", None) is not None,
          "pos": lambda m: hasattr(getattr(m, "pos_embed", None), "W_pos"),
          "embed": lambda m: hasattr(m, "embed")}[what]
    try:
        good = ok(model)
    except (TypeError, IndexError, AttributeError):
        good = False
    if not good:
        needs = {"attention": "blocks[l].attn with W_QKV / W_O (a circuits HookedTransformer)",
                 "mlp": "blocks[l].mlp (a circuits HookedTransformer with MLPs)",
                 "pos": "a learned or sinusoidal positional embedding pos_embed.W_pos",
                 "embed": "an embedding module `embed` (W_E or a vector read-in W_in)"}[what]
        raise ControlError(f"mutation {mutation!r} needs a model with {needs}; got a "
                           f"{type(model).__module__}.{type(model).__qualname__}")


def swap_heads(model: Any, layer: int, head: int, other: int | None = None) -> Any:
    """Exchange every weight of two heads of one layer (Q, K, V and O): the same function, the two
    indices naming each other's circuit."""
    from circuits.analysis.interventions import permute_heads

    _need(model, "attention", "swap_head")
    n = model.cfg.n_heads
    if n < 2:
        raise ControlError(f"swap_head:L{layer}H{head}: layer {layer} has one head, nothing to swap with")
    other = (head + 1) % n if other is None else other
    perm = list(range(n))
    perm[head], perm[other] = other, head
    return permute_heads(model, layer, perm)


def uniform_attention(model: Any, layer: int, head: int) -> Any:
    """The head's queries set to zero: every allowed key gets the same score, so the head attends
    uniformly (its values and output map are kept)."""
    import torch

    _need(model, "attention", "uniform_attention")
    _check_head(model, layer, head)
    new = copy.deepcopy(model)
    with torch.no_grad():
        attn = new.blocks[layer].attn
        attn.W_QKV[0, head].zero_()
        attn.b_QKV[0, head].zero_()
    return new


def _batch_mean(x: Any, pad: Any) -> Any:
    """Mean over the batch at each position, over non-padding rows when a pad mask is known."""
    if pad is None or pad.shape != x.shape[:2]:
        return x.mean(0, keepdim=True).expand_as(x)
    keep = (~pad).to(x.dtype).reshape(*pad.shape, *([1] * (x.ndim - 2)))
    mean = (x * keep).sum(0, keepdim=True) / keep.sum(0, keepdim=True).clamp(min=1)
    return mean.expand_as(x)


def _with_pad_tracker(model: Any) -> dict:
    """A permanent hook on hook_embed that notes which rows are padding (rows whose embedding is the
    pad token's), so batch means skip them; returns the state dict the mean hooks read."""
    state: dict = {"pad": None}
    pad_token = getattr(model.cfg, "pad_token", None)
    if pad_token is None or getattr(model.cfg, "d_input", 0) or "hook_embed" not in model.hook_dict:
        return state
    w_pad = model.embed.W_E[pad_token]

    def note(x, hook):
        state["pad"] = (x == w_pad.to(x.dtype)).all(-1)
        return None

    note.circuits_key = "pad_tracker"

    model.hook_dict["hook_embed"].fns.append(note)
    return state


def mean_ablate_head(model: Any, layer: int, head: int) -> Any:
    """The head's output (its ``hook_z`` slice) replaced by its batch mean at each position."""
    _need(model, "attention", "mean_ablate")
    _check_head(model, layer, head)
    new = copy.deepcopy(model)
    state = _with_pad_tracker(new)

    def replace(z, hook):
        z = z.clone()
        z[:, :, head] = _batch_mean(z[:, :, head], state["pad"])
        return z

    replace.circuits_key = f"mean_ablate:L{layer}H{head}"

    new.hook_dict[f"blocks.{layer}.attn.hook_z"].fns.append(replace)
    return new


def mean_ablate_mlp(model: Any, layer: int) -> Any:
    """The MLP's output replaced by its batch mean at each position."""
    _need(model, "mlp", "mean_ablate_mlp")
    if not 0 <= layer < model.cfg.n_layers:
        raise ControlError(f"mean_ablate_mlp:L{layer}: the model has {model.cfg.n_layers} layers")
    new = copy.deepcopy(model)
    state = _with_pad_tracker(new)
    def replace(x, hook):
        return _batch_mean(x, state["pad"]).clone()

    replace.circuits_key = f"mean_ablate_mlp:L{layer}"
    new.hook_dict[f"blocks.{layer}.hook_mlp_out"].fns.append(replace)
    return new


def permute_positions(model: Any, lo: int | None = None, hi: int | None = None, seed: int = 0) -> Any:
    """The positional embeddings of positions lo..hi (all by default) moved to other positions of
    that range (a seeded derangement: no position keeps its own)."""
    import torch

    _need(model, "pos", "permute_positions")
    n_ctx = model.pos_embed.W_pos.shape[0]
    lo = 0 if lo is None else lo
    hi = n_ctx - 1 if hi is None else hi
    if not 0 <= lo < hi < n_ctx:
        raise ControlError(f"permute_positions:{lo}-{hi}: needs 0 <= a < b < n_ctx = {n_ctx}")
    n = hi - lo + 1
    gen = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=gen)
        if bool((perm != torch.arange(n)).all()):
            break
    new = copy.deepcopy(model)
    with torch.no_grad():
        w = new.pos_embed.W_pos
        w[lo: hi + 1] = w[lo: hi + 1][perm].clone()
    return new


def randomise_read_in(model: Any, seed: int = 0) -> Any:
    """The token embedding (or the vector read-in) replaced by a fresh random initialisation of the
    same module; everything downstream is kept."""
    import torch

    from circuits.analysis.interventions import reinitialize

    _need(model, "embed", "randomise_read_in")
    fresh = reinitialize(model, seed=seed + 1)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for (name, p), (_, q) in zip(new.embed.named_parameters(), fresh.embed.named_parameters()):
            if not p.requires_grad and torch.equal(p, q):
                continue  # a frozen one-hot embedding has nothing to randomise
            p.copy_(q)
    if all(torch.equal(p, q) for p, q in zip(new.embed.parameters(), model.embed.parameters())):
        raise ControlError("randomise_read_in: this model's read-in is fixed (one-hot); it has nothing to randomise")
    return new


def _check_head(model: Any, layer: int, head: int) -> None:
    if not 0 <= layer < model.cfg.n_layers or not 0 <= head < model.cfg.n_heads:
        raise ControlError(f"no head L{layer}H{head}: the model has {model.cfg.n_layers} layers x "
                           f"{model.cfg.n_heads} heads")


# --- registered as controls (the plugin runs a mutation as a control named "mutate:<spec>") ----------


def _heads(fn):
    def apply(model, *heads, seed: int = 0):
        for layer, head in heads:
            model = fn(model, layer, head)
        return model

    return apply


def _layers(fn, name):
    def apply(model, *layers, seed: int = 0):
        if not layers:
            raise ControlError(f"{name} needs a layer, e.g. '{name}:L2'")
        for spec in layers:
            model = fn(model, parse_layer(spec))
        return model

    return apply


def _positions(model, *args, seed: int = 0):
    if not args:
        return permute_positions(model, seed=seed)
    m = _RANGE_RE.match(args[0]) if len(args) == 1 else None
    if not m:
        raise ControlError(f"permute_positions takes one range like 'permute_positions:1-10', got {args}")
    return permute_positions(model, int(m.group(1)), int(m.group(2)), seed=seed)


register_control("swap_head", kind="model", fn=_heads(swap_heads), head_args=True,
                 description="all weights of the head exchanged with the next head of its layer")
register_control("mean_ablate", kind="model", fn=_heads(mean_ablate_head), head_args=True,
                 description="the head's output replaced by its batch mean at each position")
register_control("uniform_attention", kind="model", fn=_heads(uniform_attention), head_args=True,
                 description="the head's queries zeroed: uniform attention over the allowed keys")
register_control("mean_ablate_mlp", kind="model", fn=_layers(mean_ablate_mlp, "mean_ablate_mlp"),
                 description="the MLP's output replaced by its batch mean at each position")
register_control("permute_positions", kind="model", fn=_positions,
                 description="positional embeddings moved to other positions (a derangement)")
register_control("randomise_read_in", kind="model", fn=lambda m, seed=0: randomise_read_in(m, seed=seed),
                 description="the token embedding / vector read-in freshly initialised")

register_control("swap_with", kind="model", fn=_swap_with, head_args=True,
                 description="all weights of two heads of a layer exchanged (a specificity alternative)")
register_control("rebind", kind="data", fn=_rebind_control, accepts=_binds_role,
                 description="a role binding re-pointed at another head (a specificity alternative)")

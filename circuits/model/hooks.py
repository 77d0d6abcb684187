"""Hook points: identity modules named from the module tree, TransformerLens style.

A `HookPoint` is placed on every activation a researcher may want to read or edit. Unlike
`nn.Module.register_forward_hook`, a hook point keeps its hook functions in a plain list and overrides
`__call__`, so an inactive hook point costs one Python call and no torch machinery: the plain forward
stays as fast as a model without hook points (see `benchmarks/bench_forward.py`).

Hook functions follow TransformerLens's signature `fn(activation, hook) -> Tensor | None`; a non-None
return value replaces the activation downstream and must be a tensor of the activation's shape, dtype
and device (anything else raises `HookOutputError` naming the hook point: a broadcastable shape would
otherwise flow on silently, e.g. a batch of 5 becoming 1).

Import order: this module sits below `model` and `cache` (errors -> hooks -> cache -> model), so the
generic `run_with_cache` here returns a plain dict; `HookedTransformer.run_with_cache` wraps it in an
`ActivationCache`.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from circuits.errors import HookNameError, HookOutputError, InputError, did_you_mean

HookFn = Callable[[torch.Tensor, "HookPoint"], Optional[torch.Tensor]]
NamesFilter = Union[None, str, Sequence[str], Callable[[str], bool]]


class HookPoint(nn.Module):
    """Identity on its input unless hook functions are attached; `name` is its path in the model."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str = ""  # filled in by HookedRootModule.setup() from the module tree
        self.fns: list[HookFn] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # bypasses nn.Module.__call__ on purpose
        for fn in self.fns:
            out = fn(x, self)
            if out is not None:
                # checked only when a hook returns something (caching hooks return None): a few
                # attribute compares, nothing on the unhooked path
                if (not isinstance(out, torch.Tensor) or out.shape != x.shape or out.dtype != x.dtype
                        or out.device != x.device):
                    raise HookOutputError(_describe_bad_output(self.name, fn, x, out))
                x = out
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # for completeness (torch.fx, printing)
        return self(x)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, active={len(self.fns)}"


def _describe_bad_output(name: str, fn: HookFn, x: torch.Tensor, out: object) -> str:
    fn_name = getattr(fn, "__qualname__", type(fn).__name__)
    want = f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"
    if isinstance(out, torch.Tensor):
        got = f"shape {tuple(out.shape)}, dtype {out.dtype}, device {out.device}"
    else:
        got = f"a {type(out).__module__}.{type(out).__qualname__}".replace("builtins.", "")
    return (f"hook {fn_name} on {name!r} returned {got}; expected {want} "
            f"(or None to leave the activation unchanged)")


def _finite_checked(fn: HookFn) -> HookFn:
    """`fn`, refusing a returned tensor that holds NaN or inf (HookOutputError naming the hook point)."""
    def checked(x: torch.Tensor, hook: HookPoint) -> Optional[torch.Tensor]:
        out = fn(x, hook)
        if isinstance(out, torch.Tensor) and (out.is_floating_point() or out.is_complex()):
            finite = torch.isfinite(out)
            if not bool(finite.all()):
                bad = int(finite.numel() - finite.sum())
                fn_name = getattr(fn, "__qualname__", type(fn).__name__)
                raise HookOutputError(f"hook {fn_name} on {hook.name!r} returned {bad} non-finite value(s) (NaN or "
                                      f"inf) of {out.numel()} (check_finite=True refuses them)")
        return out
    return checked


class HookedRootModule(nn.Module):
    """Mixin for a root model: finds its hook points by name and runs with hooks or a cache."""

    hook_dict: dict[str, HookPoint]

    def setup_hooks(self) -> None:
        """Name every HookPoint after its path in the module tree; call at the end of __init__."""
        self.hook_dict = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module
        self._mirror_attributes()

    def _mirror_attributes(self) -> None:
        """Copy every submodule and parameter reference into its owner's instance __dict__.

        nn.Module keeps them in `_modules` / `_parameters` and finds them through `__getattr__`, a
        fallback that costs ~0.5 us per access; a forward touches ~100 of them, which alone is several
        percent of a batch-1 forward of a toy model. Plain instance attributes are found ~10x faster.
        nn.Module.__setattr__ drops the mirror when an attribute is reassigned, so it never goes stale
        through normal use; `_apply` (.to(), .double(), ...) may swap parameter objects, so it
        re-mirrors.
        """
        for module in self.modules():
            module.__dict__.update(module._modules)
            module.__dict__.update(module._parameters)
        # the device inputs must be on, kept here so the per-forward input check is one compare
        first = next(self.parameters(), None)
        self.__dict__["param_device"] = first.device if first is not None else torch.device("cpu")

    def _apply(self, fn, *args, **kwargs):
        out = super()._apply(fn, *args, **kwargs)
        self._mirror_attributes()
        return out

    # --- name resolution ---------------------------------------------------------------------------
    def absent_hook_hint(self, name: str) -> str:
        """Why `name` is not a hook point of this model, for the error message ('' = no reason known;
        models override it, e.g. an attention-only model naming its missing MLP hooks)."""
        return ""

    def resolve_hook_names(self, names: NamesFilter) -> list[str]:
        """Turn a filter (None = all, a name, a list of names, or a predicate) into hook names.

        Unknown names raise `HookNameError` with the closest valid names, so a typo never silently
        caches nothing.
        """
        if names is None:
            return list(self.hook_dict)
        if callable(names):
            return [n for n in self.hook_dict if names(n)]
        if isinstance(names, str):
            names = [names]
        out = []
        for n in names:
            if n not in self.hook_dict:
                hint = self.absent_hook_hint(n) or did_you_mean(n, self.hook_dict, cutoff=0.5)
                raise HookNameError(
                    f"unknown hook name {n!r}{hint} (this model has {len(self.hook_dict)} hook points; "
                    f"see model.hook_dict)"
                )
            out.append(n)
        return out

    # --- attaching hooks ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks(self, fwd_hooks: Iterable[tuple[Union[str, Callable[[str], bool]], HookFn]] = (),
              check_finite: bool = False) -> Iterator["HookedRootModule"]:
        """Attach `(name_or_predicate, fn)` pairs for the duration of the block; always detached after,
        also when the block raises. check_finite: a hook returning a tensor with NaN or inf raises
        `HookOutputError` naming the hook point (off by default: NaN / inf flow on as the hook's
        value, as in TransformerLens, and checking costs a reduction per hook call)."""
        attached: list[tuple[HookPoint, HookFn]] = []
        try:
            for name, fn in fwd_hooks:
                targets = self.resolve_hook_names(name)
                if not targets:
                    raise HookNameError(f"hook filter {name!r} matches no hook point")
                if check_finite:
                    fn = _finite_checked(fn)
                for t in targets:
                    hp = self.hook_dict[t]
                    hp.fns.append(fn)
                    attached.append((hp, fn))
            yield self
        finally:
            for hp, fn in reversed(attached):
                hp.fns.remove(fn)

    def reset_hooks(self) -> None:
        for hp in self.hook_dict.values():
            hp.fns.clear()

    def run_with_hooks(self, *args, fwd_hooks=(), check_finite: bool = False, **kwargs):
        """Forward with hooks attached only for this call (check_finite: see `hooks`)."""
        with self.hooks(fwd_hooks, check_finite=check_finite):
            return self(*args, **kwargs)

    def run_with_cache(self, *args, names: NamesFilter = None, names_filter: NamesFilter = None,
                       detach: bool = True, **kwargs) -> tuple[object, dict[str, torch.Tensor]]:
        """Forward once and return (output, {hook name: activation}) for the hook points asked for.

        names (or TransformerLens's spelling, names_filter): None (every hook point), a name, a list
        of names, or a predicate on names. Subclasses wrap the dict in their own cache type.
        """
        return self._run_caching(self._cache_points(names, names_filter), detach, args, kwargs)

    def _cache_points(self, names: NamesFilter, names_filter: NamesFilter) -> list[HookPoint]:
        """The hook points run_with_cache's names / names_filter select (a list keeps its order)."""
        if names_filter is not None:
            if names is not None:
                raise InputError("pass either names= or names_filter= (the same thing, TransformerLens's "
                                 "spelling), not both")
            names = names_filter
        if names is None:  # every hook point: the common case, no per-name lookups
            return list(self.hook_dict.values())
        return [self.hook_dict[n] for n in self.resolve_hook_names(names)]

    def _run_caching(self, points: list[HookPoint], detach: bool, args, kwargs) -> tuple[object, dict[str, torch.Tensor]]:
        """Forward once with a saving hook on each of `points`; returns (output, {name: activation})."""
        store: dict[str, torch.Tensor] = {}

        if detach:
            def save(x: torch.Tensor, hook: HookPoint) -> None:
                store[hook.name] = x.detach() if x.requires_grad else x
        else:
            def save(x: torch.Tensor, hook: HookPoint) -> None:
                store[hook.name] = x

        # attach directly rather than through hooks(): resolving each name again costs ~1 us a hook
        try:
            for hp in points:
                hp.fns.append(save)
            out = self(*args, **kwargs)
        finally:
            for hp in points:
                if hp.fns and hp.fns[-1] is save:
                    hp.fns.pop()
                elif save in hp.fns:
                    hp.fns.remove(save)
        # in hook-point order (the order of `names`), whatever order the forward reached them in
        return out, {hp.name: store[hp.name] for hp in points if hp.name in store}

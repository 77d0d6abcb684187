"""Binding roles to components: which head plays "the count head" in this model.

Hypotheses are phrased about roles; a trained model realises them in whichever head training
picked. `search(model, split, scorer)` binds each role to a component by the scores `scorer`
measures on `split` (the data the search looks at: a claim scored on the same split is evaluated on
what chose it, so pass a held-out split to keep the two apart). Binding is greedy in role order:
each role takes its highest-scoring component not already bound (ties: the first in component
order), so two roles never share a component.

Searches are memoised per (model weights, scorer, split): every test that asks for the roles of a
model gets the same binding, computed once, and a control that only changes data never re-binds.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, Optional

import torch

from circuits.analysis.measures import ModelMemo
from circuits.claims.stats import auroc

Component = Hashable  # e.g. (layer, head)
Scores = Mapping[str, Mapping[Component, float]]  # role -> component -> score (higher = better fit)

_MEMO = ModelMemo()


def heads(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Every (layer, head) of a model, layer-major."""
    return [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]


def bind(scores: Scores) -> dict[str, Component]:
    """Greedy binding in the roles' order: each role gets its best component not yet taken."""
    taken: set = set()
    binding: dict[str, Component] = {}
    for role, by_component in scores.items():
        free = [c for c in by_component if c not in taken]
        if not free:
            raise ValueError(f"no component left to bind role {role!r} (all of {list(by_component)} are taken)")
        binding[role] = max(free, key=lambda c: by_component[c])
        taken.add(binding[role])
    return binding


def separation_scores(values: Mapping[Component, torch.Tensor], targets: Mapping[str, torch.Tensor],
                      where: Optional[torch.Tensor] = None) -> dict[str, dict[Component, float]]:
    """role -> component -> AUROC with which the component's per-example value separates the
    role's positive examples (a bool target per example) from the rest, over the rows in `where`."""
    out: dict[str, dict[Component, float]] = {role: {} for role in targets}
    for comp, v in values.items():
        v = v if where is None else v[where]
        v = v.detach().cpu().numpy()
        for role, target in targets.items():
            t = (target if where is None else target[where]).cpu().numpy()
            out[role][comp] = auroc(v[t], v[~t])
    return out


def search(model: torch.nn.Module, split: Any, scorer: Callable[[torch.nn.Module, Any], Scores],
           key: Optional[Hashable] = None) -> dict[str, Component]:
    """Bind roles on `split`: `bind(scorer(model, split))`, once per (model weights, scorer, split).
    `key` names the split in the memo (default: its identity and length)."""
    if key is None:
        key = (id(split), len(split) if hasattr(split, "__len__") else None)
    memo_key = ("roles", getattr(scorer, "__qualname__", repr(scorer)), key)
    return dict(_MEMO.get(model, memo_key, lambda: bind(scorer(model, split))))


def describe(binding: Mapping[str, Sequence[int]]) -> str:
    """'count_head=L2H0, negative_head=L2H1' for reports and reasons."""
    return ", ".join(f"{role}=L{c[0]}H{c[1]}" if isinstance(c, tuple) and len(c) == 2 else f"{role}={c}"
                     for role, c in binding.items())

"""Subjects for the bracket hypotheses: the published ARENA checkpoint and our own trained models.

A subject bundles a model (after the test's negative control), the heads bound to the roles the
hypotheses talk about, and the evaluation strings. Role bindings are pinned on the ARENA checkpoint
(the seed's heads 2.0 and 2.1) and found by search on our models (`find_roles`), always on the
uncontrolled model so that a control cannot move the binding it is meant to test.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Optional

import pytest
import torch

from circuits import analysis as A
from circuits.model import HookedTransformer
from circuits.stats import auroc
from circuits.tasks import brackets as B

REPO = Path(__file__).resolve().parents[1]
ARENA_DIR = REPO.parent / "shared" / "reference" / "arena-brackets"
ARENA_WEIGHTS = ARENA_DIR / "brackets_model_state_dict.pt"
ARENA_DATA = ARENA_DIR / "brackets_data.json"
N_EVAL = 5000  # the seed analyses the first 5,000 strings of the published data
ARENA_ROLES = {"count_head": (2, 0), "negative_head": (2, 1)}  # the seed's heads 2.0 and 2.1


@lru_cache(maxsize=None)
def reference_data(n: Optional[int] = N_EVAL) -> B.BracketData:
    return B.BracketData.from_reference(ARENA_DATA, n=n)


@dataclass
class Analysis:
    """Everything the claims read, computed once per model on the evaluation strings."""

    cache: object
    r2: float
    direction: torch.Tensor  # unbalanced direction pulled back through the final-LN fit [d_model]
    contributions: torch.Tensor  # [component, batch], balanced mean subtracted
    labels: list
    logits: torch.Tensor  # [batch, 2]


_ANALYSES: "weakref.WeakKeyDictionary[HookedTransformer, Analysis]" = weakref.WeakKeyDictionary()


def analyse(model: HookedTransformer, data: B.BracketData) -> Analysis:
    if model in _ANALYSES:
        return _ANALYSES[model]
    names = A.decomposition_names(model) + [f"blocks.{l}.attn.hook_pattern" for l in range(model.cfg.n_layers)]
    cache = A.run_in_batches(model, data.toks, names=names)
    x, y = A.ln_final_io(cache, pos=0)
    fit, r2 = A.linear_fit(x, y)
    direction = A.pull_back(fit, A.logit_direction(model, 0, 1))  # unbalanced minus balanced logit
    values, labels = A.component_contributions(cache, direction, pos=0)
    values = values - values[:, data.isbal].mean(1, keepdim=True)  # the seed's centring
    logits = A.predict(model, data.toks, lengths=data.lengths + 2)
    result = Analysis(cache, r2, direction, values.float(), labels, logits)
    _ANALYSES[model] = result
    return result


def head_contribution(analysis: Analysis, head: tuple[int, int]) -> torch.Tensor:
    return analysis.contributions[analysis.labels.index(A.head_label(*head))]


def find_roles(model: HookedTransformer, data: B.BracketData) -> dict:
    """Bind roles by search: the count head is the head whose contribution best separates
    total-elevation failures (AUROC among strings starting with "("); the negative head is the other
    head that best separates negative failures."""
    an = analyse(model, data)
    so = data.starts_open
    scores = {}
    for l in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            c = head_contribution(an, (l, h))[so].numpy()
            elev = data.total_elevation_failure[so].numpy()
            neg = data.negative_failure[so].numpy()
            scores[(l, h)] = (auroc(c[elev], c[~elev]), auroc(c[neg], c[~neg]))
    count = max(scores, key=lambda k: scores[k][0])
    negative = max((k for k in scores if k != count), key=lambda k: scores[k][1])
    return {"count_head": count, "negative_head": negative}


@dataclass
class BracketSubject:
    name: str
    model: HookedTransformer  # after the negative control
    roles: dict  # role -> (layer, head), bound on the uncontrolled model
    data: B.BracketData = field(repr=False)

    def head(self, role: str) -> tuple[int, int]:
        return self.roles[role]

    def role_label(self, role: str) -> str:
        return f"{role}={A.head_label(*self.roles[role])}"


class ArenaSubject:
    """Mixin: hypotheses on the published ARENA checkpoint, roles pinned to the seed's heads."""

    @pytest.fixture
    def head_roles(self, arena_model):
        return dict(ARENA_ROLES)

    @pytest.fixture
    def subject(self, arena_model, bracket_data, head_roles, control):
        roles = control.apply_data(dict(head_roles))  # the swap_roles control rebinds them
        return BracketSubject("arena", control.apply_model(arena_model), roles, bracket_data)


class OursSubject:
    """Mixin: the same hypotheses on our own brackets zoo model (reference or --seeds), roles found
    by search on the uncontrolled model."""

    @pytest.fixture
    def head_roles(self, zoo_models, zoo_seed, bracket_data, request):
        base = zoo_models.get(request, "brackets", zoo_seed).model
        return find_roles(base, bracket_data)

    @pytest.fixture
    def subject(self, brackets_model, bracket_data, head_roles, zoo_seed, control):
        name = "ours" if zoo_seed is None else f"ours seed {zoo_seed}"
        return BracketSubject(name, brackets_model, control.apply_data(dict(head_roles)), bracket_data)

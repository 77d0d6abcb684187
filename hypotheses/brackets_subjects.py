"""Subjects for the bracket hypotheses: the published ARENA checkpoint and our own trained models.

A subject bundles a model (after the test's negative control), the heads bound to the roles the
hypotheses talk about, and the evaluation strings. Role bindings are pinned on the ARENA checkpoint
(the seed's heads 2.0 and 2.1) and found by search on our models (`find_roles`, through
`circuits.roles.search`), always on the uncontrolled model so that a control cannot move the binding
it is meant to test. The ARENA checkpoint and strings come from `circuits.reference`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Optional

import pytest
import torch

from circuits import analysis as A
from circuits import roles as R
from circuits.model import HookedTransformer
from circuits.reference import ARENA_ROLES, N_EVAL, arena_data
from circuits.tasks import brackets as B


def reference_data(n: Optional[int] = N_EVAL) -> B.BracketData:
    return arena_data(n)


class Analysis:
    """Everything the claims read about one model on the evaluation strings, each computed on first
    use and then kept: a control that only needs logits never pays for the activation cache."""

    def __init__(self, model: HookedTransformer, data: B.BracketData):
        self.model, self.data = model, data

    @cached_property
    def logits(self) -> torch.Tensor:  # [batch, 2]
        return A.predict(self.model, self.data.toks, lengths=self.data.lengths + 2)

    @cached_property
    def cache(self):
        names = A.decomposition_names(self.model) + [
            f"blocks.{l}.attn.hook_pattern" for l in range(self.model.cfg.n_layers)]
        # every claim here reads position 0 (the read-out) or attention from query 0
        return A.run_in_batches(self.model, self.data.toks, names=names, keep=A.at_position(0),
                                lengths=self.data.lengths + 2)

    @cached_property
    def _fit(self):
        x, y = A.ln_final_io(self.cache, pos=0)
        return A.linear_fit(x, y)

    @property
    def r2(self) -> float:
        return self._fit[1]

    @cached_property
    def direction(self) -> torch.Tensor:
        """The unbalanced-minus-balanced logit direction pulled back through the final-LN fit: [d_model]."""
        return A.pull_back(self._fit[0], A.logit_direction(self.model, 0, 1))

    @cached_property
    def _contributions(self):
        values, labels = A.component_contributions(self.cache, self.direction, pos=0)
        values = values - values[:, self.data.isbal].mean(1, keepdim=True)  # the seed's centring
        return values.float(), labels

    @property
    def contributions(self) -> torch.Tensor:  # [component, batch], balanced mean subtracted
        return self._contributions[0]

    @property
    def labels(self) -> list:
        return self._contributions[1]


_MEMO = A.ModelMemo()  # per model function: the analyses and the 100k predictions


def analyse(model: HookedTransformer, data: B.BracketData) -> Analysis:
    return _MEMO.get(model, ("analysis", id(data), len(data)), lambda: Analysis(model, data))


def predictions_on_all(model: HookedTransformer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(predicted is-balanced, label, count) per distinct string of the full 100k file: half the
    file repeats earlier rows, so each distinct string is classified once and weighted by its count."""
    def compute():
        strs, labels, counts = distinct_reference_strings()
        toks = B.tokenize(strs)
        lengths = torch.tensor([len(s) + 2 for s in strs])
        return A.predict(model, toks, lengths=lengths).argmax(-1).bool(), labels, counts

    return _MEMO.get(model, "predictions_on_all", compute)


@lru_cache(maxsize=1)
def distinct_reference_strings() -> tuple[list, torch.Tensor, torch.Tensor]:
    data = reference_data(None)
    counts: dict[str, int] = {}
    label: dict[str, bool] = {}
    for s, b in zip(data.strs, data.isbal.tolist()):
        counts[s] = counts.get(s, 0) + 1
        label[s] = b
    strs = list(counts)
    return strs, torch.tensor([label[s] for s in strs]), torch.tensor([counts[s] for s in strs], dtype=torch.float64)


def head_contribution(analysis: Analysis, head: tuple[int, int]) -> torch.Tensor:
    return analysis.contributions[analysis.labels.index(A.head_label(*head))]


def find_roles(model: HookedTransformer, data: B.BracketData) -> dict:
    """Bind roles by search on `data`: the count head is the head whose contribution best separates
    total-elevation failures (AUROC among strings starting with "("); the negative head is the other
    head that best separates negative failures. Searched once per model (every test asks)."""
    return R.search(model, data, bracket_role_scores)


def bracket_role_scores(model: HookedTransformer, data: B.BracketData) -> dict:
    """role -> head -> AUROC of the head's contribution along the unbalanced direction."""
    an = analyse(model, data)
    values = {hd: head_contribution(an, hd) for hd in R.heads(model)}
    targets = {"count_head": data.total_elevation_failure, "negative_head": data.negative_failure}
    return R.separation_scores(values, targets, where=data.starts_open)


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

    # hypotheses measured false on our reference model: strict expected failures there (they must keep
    # failing), with the measurement as the reason; on --seeds models they run as ordinary claims
    REFUTED_ON_REFERENCE: dict = {}

    @pytest.fixture
    def subject(self, brackets_model, bracket_data, head_roles, zoo_seed, control, request):
        name = "ours" if zoo_seed is None else f"ours seed {zoo_seed}"
        reason = self.REFUTED_ON_REFERENCE.get(request.function.__name__)
        if reason and zoo_seed is None:
            if not control.is_main:  # a negative control tests a claim that holds; this one does not
                pytest.skip(f"refuted on our reference model (see its main run): {reason}")
            request.applymarker(pytest.mark.xfail(strict=True, reason=f"refuted on our reference model: {reason}"))
        return BracketSubject(name, brackets_model, control.apply_data(dict(head_roles)), bracket_data)

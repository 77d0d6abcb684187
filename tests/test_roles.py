"""circuits.analysis.roles: greedy binding in role order, AUROC scores on a split, one search per model."""

from __future__ import annotations

import pytest
import torch

from circuits.analysis import roles as R
from model_configs import BRACKETS, perturbed_model


def test_bind_is_greedy_in_role_order_and_never_shares_a_component():
    scores = {"count_head": {(0, 0): 0.9, (1, 0): 0.8}, "negative_head": {(0, 0): 0.99, (1, 0): 0.5}}
    assert R.bind(scores) == {"count_head": (0, 0), "negative_head": (1, 0)}
    assert R.bind({"a": {"x": 1.0, "y": 1.0}}) == {"a": "x"}  # ties: the first in component order
    with pytest.raises(ValueError, match="no component left to bind role 'b'"):
        R.bind({"a": {"x": 1.0}, "b": {"x": 2.0}})


def test_separation_scores_are_aurocs_over_the_selected_rows():
    v = torch.tensor([0.0, 1.0, 2.0, 3.0])
    target = torch.tensor([False, False, True, True])
    assert R.separation_scores({"c": v}, {"r": target}) == {"r": {"c": 1.0}}
    assert R.separation_scores({"c": -v}, {"r": target}) == {"r": {"c": 0.0}}
    where = torch.tensor([True, True, True, False])
    assert R.separation_scores({"c": v}, {"r": target}, where=where) == {"r": {"c": 1.0}}


def test_search_runs_the_scorer_once_per_model_and_split():
    model = perturbed_model(BRACKETS)
    calls = []

    def scorer(m, split):
        calls.append(len(split))
        return {"r": {hd: float(hd[0] * 10 + hd[1]) for hd in R.heads(m)}}

    split = list(range(7))
    assert R.search(model, split, scorer) == {"r": (2, 1)}
    assert R.search(model, split, scorer) == {"r": (2, 1)}
    R.search(model, list(range(3)), scorer)
    assert calls == [7, 3]
    assert R.describe({"r": (2, 1)}) == "r=L2H1"

"""The associative-memory claims' hand-written controls, registered once on import.

Model controls break what the claims credit, in the weights (`breaks`): half of the heads removed or
mean-ablated, the heads' W_V/W_O randomised, the unembedding cut to d-1 directions.
Data controls act on what a claim scores, each on one small record that a test passes through
``control.apply_data`` (the record's type is what the control accepts, so a test may pass several):

* `Scored` (the law a claim scores on) -> ``reassign_table``: another table of the same statistics;
* `Predictions` (a model's logits on every context) -> ``oracle_logits``: the law's own log-probabilities;
* `Baseline` (the rank-d optimum) -> ``rank_below``: the rank-(d-1) optimum instead;
* `TargetVectors` (one vector per context and its target) -> ``random_vectors``: random directions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from circuits.claims.controls import register_control
from circuits.tasks.assoc import breaks as B
from circuits.tasks.assoc.experiments import build_law
from circuits.tasks.assoc.laws import Law

__all__ = ["Predictions", "Baseline", "TargetVectors", "Scored", "scored_law"]


@dataclass
class Predictions:
    """A model's logits on every context of a law."""

    logits: torch.Tensor
    law: Law


@dataclass
class Baseline:
    """The rank-d optimum a divergence is compared with, and the rank-(d-1) one beside it."""

    divergence: float
    d: int
    lower_divergence: float  # the rank-(d-1) optimum


@dataclass
class TargetVectors:
    """Vectors (one per context) and the token whose unembedding each should point to."""

    vectors: torch.Tensor  # [n, d]
    unembed: torch.Tensor  # [N, d]
    targets: torch.Tensor  # [n]


@dataclass
class Scored:
    """The law a claim scores a model on, and the seed (from `draws`) a data control re-draws it with."""

    law: Law
    seed: int


def scored_law(control, draws, entry_or_law) -> Law:
    """The law to score on: the entry's own, or under ``reassign_table`` another table of the same
    statistics (next tokens renamed by a derangement drawn from `draws`)."""
    law = entry_or_law if isinstance(entry_or_law, Law) else build_law(entry_or_law)
    return control.apply_data(Scored(law, draws.child("reassign_table").int())).law


def _oracle(p: Predictions, seed: int = 0) -> Predictions:
    return Predictions(p.law.next_token_probs().clamp_min(1e-300).log(), p.law)


def _rank_below(b: Baseline, seed: int = 0) -> Baseline:
    return Baseline(b.lower_divergence, b.d - 1, float("nan"))


def _reassign(s: Scored, seed: int = 0) -> Scored:
    return Scored(B.reassign_table(s.law, torch.Generator().manual_seed(s.seed)), s.seed)


def _random_vectors(tv: TargetVectors, seed: int = 0) -> TargetVectors:
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(tv.vectors.shape, generator=gen, dtype=tv.vectors.dtype)
    return TargetVectors(r * (tv.vectors.norm(dim=-1, keepdim=True) / r.norm(dim=-1, keepdim=True)), tv.unembed,
                         tv.targets)


def _half_heads(mode: str):
    def apply(model, seed: int = 0):
        return B.ablate_heads(model, B.half_of_heads(model.acfg.n_heads), mode)
    return apply


def _randomise_ov(model, seed: int = 0):
    return B.randomise_ov(model, seed=seed)


def _truncate_width(model, seed: int = 0):
    return B.truncate_width(model)


def _accepts(kind: type):
    def accepts(obj) -> bool:
        return isinstance(obj, kind)
    return accepts


register_control("reassign_table", kind="data", fn=_reassign, accepts=_accepts(Scored),
                 description="scored on another association table of the same statistics (every next token renamed by "
                             "a derangement of the vocabulary): every memorised pair replaced")
register_control("ablate_half_heads", kind="model", fn=_half_heads("zero"),
                 description="the first ceil(H/2) heads' outputs removed (W_O zeroed)")
register_control("mean_ablate_half_heads", kind="model", fn=_half_heads("mean"),
                 description="the first ceil(H/2) heads' outputs replaced by their mean over every context")
register_control("randomise_ov", kind="model", fn=_randomise_ov,
                 description="every head's W_V and W_O replaced by Gaussian matrices of the same shape and norm: "
                             "the heads' storage removed")
register_control("truncate_width", kind="model", fn=_truncate_width,
                 description="the unembedding restricted to its top d-1 singular directions (logit rank <= d-1)")
register_control("random_vectors", kind="data", fn=_random_vectors, accepts=_accepts(TargetVectors),
                 description="each context's vector replaced by a random direction of the same norm")
register_control("oracle_logits", kind="data", fn=_oracle, accepts=_accepts(Predictions),
                 description="the law's own log-probabilities instead of the model's logits (no rank limit)")
register_control("rank_below", kind="data", fn=_rank_below, accepts=_accepts(Baseline),
                 description="compare with the rank-(d-1) optimum instead of the rank-d one")

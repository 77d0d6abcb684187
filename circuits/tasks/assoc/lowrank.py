"""The low-rank baseline (the seed's ``Low_rank``): a free embedding per context and an unembedding,
logits W_E[c] W_U^T of rank <= d. ``low_rank_closed_form`` is the truncated SVD of the row-centred
log-probabilities (exact when they have rank <= d), ``fit_low_rank`` minimises the exact divergence
(Adam then L-BFGS, full batch) and ``low_rank_optimum`` returns the best of both: the paper's "optimal
baseline" for Proposition 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from circuits.errors import InputError
from circuits.tasks.assoc.laws import DTYPE, Law, _check_int

# ------------------------------------------------------------------------------------------------
# the low-rank baseline


class LowRank(nn.Module):
    """The seed's Low_rank: one embedding per context and an unembedding; logits of rank <= d."""

    def __init__(self, n_vocab: int, n_ctx: int, d: int, seed: Optional[int] = None, scale: float = 0.1):
        super().__init__()
        self.N, self.S, self.d = _check_int("N", n_vocab), _check_int("S", n_ctx), _check_int("d", d)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.W_E = nn.Parameter(torch.randn(n_vocab ** n_ctx, d, generator=gen, dtype=DTYPE) * scale)  # [N^S, d]
        self.W_U = nn.Parameter(torch.randn(n_vocab, d, generator=gen, dtype=DTYPE) * scale)  # [N, d]

    def context_index(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.ndim != 2 or tokens.shape[1] != self.S:
            raise InputError(f"tokens must be [batch, S={self.S}], got {tuple(tokens.shape)}")
        weights = self.N ** torch.arange(self.S - 1, -1, -1)
        return (tokens.long() * weights).sum(1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.W_E[self.context_index(tokens)] @ self.W_U.t()  # [batch, N]

    def all_logits(self) -> torch.Tensor:
        return self.W_E @ self.W_U.t()  # [N^S, N]


def low_rank_closed_form(law: Law, d: int) -> LowRank:
    """Truncated SVD (weighted by sqrt P(c)) of the row-centred log-probabilities on the support.

    Exact (divergence 0) when the centred log-probability matrix has rank <= d; otherwise a rank-d
    candidate. Needs pi > 0 on every supported context (log 0 has no low-rank approximation).
    """
    _check_int("d", d)
    supp = law.support()
    pi = law.next_token_probs()[supp]
    if (pi <= 0).any():
        raise InputError(f"{law.name}: no closed form, the law has zero next-token probabilities on its support "
                         "(deterministic or sparse conditionals); use fit_low_rank")
    L = pi.log()
    L = L - L.mean(-1, keepdim=True)  # [n, N]: softmax-invariant centring
    w = law.context_probs()[supp].sqrt()[:, None]
    U, s, Vt = torch.linalg.svd(w * L, full_matrices=False)
    k = min(d, s.shape[0])
    model = LowRank(law.N, law.S, d)
    with torch.no_grad():
        model.W_E.zero_()
        model.W_U.zero_()
        model.W_E[supp, :k] = (U[:, :k] * s[:k]) / w
        model.W_U[:, :k] = Vt[:k].t()
    return model


def _distinct_rows(law: Law) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(support, distinct next-token rows [u, N], their total weights [u], row of each supported context).

    Contexts with the same conditional share an optimal embedding (the objective is convex in each
    context's embedding once W_U is fixed), so the fit runs on distinct rows only: exact, and much
    smaller for structured laws (10 rows instead of 100 for the seed's last-position law)."""
    supp = law.support()
    rows, inverse = torch.unique(law.next_token_probs()[supp], dim=0, return_inverse=True)
    weights = torch.zeros(rows.shape[0], dtype=DTYPE).index_add_(0, inverse, law.context_probs()[supp])
    return supp, rows, weights, inverse


def _row_divergence(E: torch.Tensor, U: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor,
                    row_entropy: float) -> torch.Tensor:
    logp = torch.log_softmax(E @ U.t(), -1)
    return -(weights[:, None] * rows * logp).sum() - row_entropy


def fit_low_rank(law: Law, d: int, *, seed: int = 0, steps: int = 2000, lr: float = 0.05, lbfgs_steps: int = 500,
                 init: Optional[LowRank] = None) -> tuple[LowRank, float]:
    """Minimise the exact divergence of a rank-d factorisation (full batch, float64): Adam, then
    L-BFGS. Starts from `init` (e.g. the closed form) or a random factorisation (std 0.5). Returns
    (model, divergence). The problem is not convex: different starts reach different optima."""
    _check_int("d", d)
    supp, rows, weights, inverse = _distinct_rows(law)
    H = law.entropy()
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        first = torch.zeros(rows.shape[0], dtype=torch.long).index_put_((inverse,), torch.arange(len(supp)))
        E = init.W_E.detach()[supp][first].clone()
        U = init.W_U.detach().clone()
    else:
        E = torch.randn(rows.shape[0], d, generator=gen, dtype=DTYPE) * 0.5
        U = torch.randn(law.N, d, generator=gen, dtype=DTYPE) * 0.5
    E.requires_grad_(True)
    U.requires_grad_(True)
    opt = torch.optim.Adam([E, U], lr=lr)
    for _ in range(steps):
        loss = _row_divergence(E, U, rows, weights, H)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if lbfgs_steps:
        lb = torch.optim.LBFGS([E, U], lr=1.0, max_iter=lbfgs_steps, history_size=50, tolerance_grad=1e-12,
                               tolerance_change=1e-15, line_search_fn="strong_wolfe")

        def closure():
            lb.zero_grad()
            value = _row_divergence(E, U, rows, weights, H)
            value.backward()
            return value

        lb.step(closure)
    model = LowRank(law.N, law.S, d)
    with torch.no_grad():
        model.W_E.zero_()
        model.W_E[supp] = E[inverse]
        model.W_U.copy_(U)
        return model, float(law.divergence(model.all_logits()))


@dataclass
class LowRankOptimum:
    divergence: float  # the best rank-d divergence found (the "optimal baseline")
    closed_form: Optional[float]  # divergence of the closed form (None when none exists)
    trained: list  # divergence of each trained start
    model: LowRank


def low_rank_optimum(law: Law, d: int, *, seeds: Sequence[int] = tuple(range(8)), steps: int = 2000,
                     lbfgs_steps: int = 500) -> LowRankOptimum:
    """The optimal rank-d baseline: the best of the closed form (when it exists), a fit started
    from it, and fits from random starts (one per seed)."""
    candidates = []
    closed = None
    try:
        cf = low_rank_closed_form(law, d)
        with torch.no_grad():
            closed = law.divergence(cf.all_logits())
        candidates.append((closed, cf))
        candidates.append(fit_low_rank(law, d, init=cf, steps=steps, lbfgs_steps=lbfgs_steps)[::-1])
    except InputError:
        pass
    trained = []
    for s in seeds:
        model, div = fit_low_rank(law, d, seed=s, steps=steps, lbfgs_steps=lbfgs_steps)
        trained.append(div)
        candidates.append((div, model))
    best = min(candidates, key=lambda c: c[0])
    return LowRankOptimum(best[0], closed, trained, best[1])

"""Associative memory in attention-only transformers (seed 004).

Dana, Pydi & Chevaleyre, "Memorization in Attention-only Transformers" (AISTATS 2025), after Cabannes,
Dohmatob & Bietti, "Scaling Laws for Associative Memories". A model reads a context of S tokens from
a vocabulary of N and predicts the next one; the data is a *law* over sequences of S + 1 tokens.

This module holds the data, the exact quantities the claims compare against, the baselines, a
trainer and the experiments (what is trained, with which recipe, stored where):

Laws (`Law`)
    ``power_unif_law`` (the seed's: each conditional has ``nb_tokens[l]`` non-zero probabilities
    decaying as alpha^rank, on a random permutation of the tokens), ``last_position_law`` (the next
    token is one chosen token with probability p, uniform otherwise), ``rank_d_law`` (next-token
    logits of rank d, or "almost" rank d with a tail of smaller singular values) and
    ``associations`` (deterministic bigrams: N^S contexts, uniform, each with one next token; the
    paper's experiment 1 is N = 50, S = 2).

Exact quantities
    Everything is a finite sum over the N^S contexts, so nothing is estimated by sampling:
    ``Law.entropy`` H(t_{S+1} | t_1..t_S) (the optimal loss), ``Law.random_baseline`` log N - H (the
    divergence of the uniform predictor), ``Law.divergence(logits)`` E_c KL(pi_c || softmax(logits_c))
    and ``Law.accuracy(logits)`` E_c pi_c(argmax logits_c).

Baselines
    ``LowRank`` is the seed's ``Low_rank``: a free embedding per context and an unembedding, logits
    W_E[c] W_U^T of rank <= d. ``low_rank_closed_form`` is the truncated SVD of the row-centred
    log-probabilities (exact, divergence 0, when they have rank <= d; it needs pi > 0 everywhere on
    the support), ``fit_low_rank`` minimises the exact divergence (Adam then L-BFGS, full batch) and
    ``low_rank_optimum`` returns the best of both: the paper's "optimal baseline" for Proposition 1.

Training
    ``train_assoc``: full batch (the exact expected loss over every context, weighted by P(c)) or
    sampled mini-batches like the seed's, Adam, deterministic for a seed. It reuses
    ``circuits.train.TrainResult``; one-layer models train through ``assoc_model.table_logits``.

Experiments
    ``Experiment`` ties a model config, a law spec and a recipe; ``load_experiment`` returns the
    trained model from a committed reference (``fixtures/models/assoc_*``), else from the
    content-addressed store (``ModelStore.get_or_create``), training it once.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..assoc_model import AssocConfig, AssocTransformer, all_contexts, build_model, table_logits
from ..errors import InputError
from ..train import TrainResult

DATA_VERSION = "assoc-law-1"  # bump when a law constructor changes what a seed produces
TRAIN_CODE_VERSION = "assoc-train-1"  # bump when train_assoc changes what training produces
REFERENCE_DIR = Path(__file__).resolve().parents[2] / "fixtures" / "models"
DTYPE = torch.float64  # laws and exact quantities are computed in float64


# ------------------------------------------------------------------------------------------------
# laws


@dataclass
class Law:
    """P(t_1) P(t_2 | t_1) ... P(t_{S+1} | t_1..t_S) over tokens 0..N-1.

    ``conditionals[i]`` has shape [N] * (i + 1): the distribution of token i + 1 given the previous
    ones (the seed's ``pi`` list). Rows of contexts with probability 0 may be anything normalised.
    """

    conditionals: tuple
    name: str = ""
    spec: dict = field(default_factory=dict)  # how it was made (JSON-able), for model-store keys

    def __post_init__(self) -> None:
        conds = tuple(torch.as_tensor(c, dtype=DTYPE) for c in self.conditionals)
        if not conds:
            raise InputError("a law needs at least one conditional")
        N = conds[0].shape[0]
        for i, c in enumerate(conds):
            if tuple(c.shape) != (N,) * (i + 1):
                raise InputError(f"conditional {i} has shape {tuple(c.shape)}, expected {(N,) * (i + 1)}")
            if not torch.isfinite(c).all() or (c < 0).any():
                raise InputError(f"conditional {i} has negative or non-finite probabilities")
            sums = c.sum(-1)
            if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
                worst = float((sums - 1).abs().max())
                raise InputError(f"conditional {i} is not normalised (a row sums to 1 {worst:+.2e})")
        self.conditionals = conds

    @property
    def N(self) -> int:
        return self.conditionals[0].shape[0]

    @property
    def S(self) -> int:
        """Context length: the model reads S tokens and predicts token S + 1."""
        return len(self.conditionals) - 1

    def context_probs(self) -> torch.Tensor:
        """P(t_1..t_S) for every context, flat in `all_contexts` order: [N^S]."""
        p = torch.ones((), dtype=DTYPE)
        for c in self.conditionals[:-1]:
            p = p.unsqueeze(-1) * c  # [N] * (i + 1)
        return p.reshape(-1)

    def next_token_probs(self) -> torch.Tensor:
        """pi(. | c) for every context c: [N^S, N]."""
        return self.conditionals[-1].reshape(-1, self.N)

    def contexts(self) -> torch.Tensor:
        """Every context: [N^S, S] (row i is i in base N)."""
        return all_contexts(self.N, self.S)

    def support(self) -> torch.Tensor:
        """Indices (into `contexts()`) of the contexts with positive probability: [n]."""
        return torch.nonzero(self.context_probs() > 0).squeeze(1)

    def entropy(self) -> float:
        """H(t_{S+1} | t_1..t_S) in nats: the smallest expected loss any predictor can reach."""
        pi = self.next_token_probs()
        h = -torch.special.xlogy(pi, pi).sum(-1)  # [N^S]
        return float((self.context_probs() * h).sum())

    optimal_loss = entropy

    def random_baseline(self) -> float:
        """Divergence of the uniform predictor: log N - H."""
        return math.log(self.N) - self.entropy()

    def _check_logits(self, logits: torch.Tensor) -> torch.Tensor:
        if not isinstance(logits, torch.Tensor) or logits.shape != (self.N ** self.S, self.N):
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise InputError(f"logits must be [N^S, N] = [{self.N ** self.S}, {self.N}] in all_contexts order, "
                             f"got {got}")
        return logits.to(DTYPE)

    def expected_loss(self, logits: torch.Tensor) -> float:
        """E_c E_{y ~ pi_c} [-log softmax(logits_c)_y] (rows outside the support are ignored)."""
        logits = self._check_logits(logits)
        w, pi = self.context_probs(), self.next_token_probs()
        keep = w > 0
        logp = torch.log_softmax(logits[keep], -1)
        return float(-(w[keep, None] * pi[keep] * logp).sum())

    def divergence(self, logits: torch.Tensor) -> float:
        """E_c KL(pi_c || softmax(logits_c)) = expected loss - H (>= 0)."""
        return self.expected_loss(logits) - self.entropy()

    def accuracy(self, logits: torch.Tensor) -> float:
        """E_c pi_c(argmax logits_c): the expected accuracy on a sampled next token."""
        logits = self._check_logits(logits)
        pred = logits.argmax(-1)  # [N^S]
        hit = self.next_token_probs().gather(1, pred[:, None]).squeeze(1)
        return float((self.context_probs() * hit).sum())

    @property
    def is_deterministic(self) -> bool:
        """Every supported context has a single possible next token."""
        pi = self.next_token_probs()[self.support()]
        return bool((pi.max(-1).values == 1).all())

    def targets(self) -> torch.Tensor:
        """The most likely next token of every context: [N^S] (the target of a deterministic law)."""
        return self.next_token_probs().argmax(-1)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        """n sequences of S + 1 tokens: [n, S + 1] (the seed's generate_data, with an explicit seed)."""
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InputError(f"n must be a positive integer, got {n!r}")
        gen = torch.Generator().manual_seed(seed)
        toks = torch.multinomial(self.conditionals[0], n, replacement=True, generator=gen)[:, None]
        for c in self.conditionals[1:]:
            rows = c[tuple(toks.t())]  # [n, N]
            toks = torch.cat([toks, torch.multinomial(rows, 1, generator=gen)], 1)
        return toks


def _check_int(name: str, v, lo: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise InputError(f"{name} must be an integer >= {lo}, got {v!r}")
    return v


def _random_rows(base: torch.Tensor, n_rows: int, gen: torch.Generator) -> torch.Tensor:
    """n_rows copies of the distribution `base` [N], each on an independent random permutation."""
    perms = torch.rand(n_rows, base.shape[0], generator=gen).argsort(-1)  # [n_rows, N]
    return base[perms]


def _supports(nb_tokens: Sequence[int], N: int, gen: torch.Generator) -> list:
    """The seed's prior conditionals: level i is uniform on min(nb_tokens[i], N) random tokens."""
    conds = []
    for i, k in enumerate(nb_tokens):
        _check_int(f"nb_tokens[{i}]", k)
        base = torch.zeros(N, dtype=DTYPE)
        base[: min(k, N)] = 1.0 / min(k, N)
        conds.append(_random_rows(base, N ** i, gen).reshape((N,) * (i + 1)))
    return conds


def power_unif_law(alphas: Sequence[float], nb_tokens: Sequence[int], N: int, seed: int = 0) -> Law:
    """The seed's law: conditional i gives the j-th token of a random permutation weight alpha_i^j
    for j < nb_tokens[i] (zero beyond), normalised. alpha = 1 is uniform on nb_tokens[i] tokens;
    nb_tokens[-1] = 1 makes the last token a deterministic function of the context."""
    _check_int("N", N)
    if len(alphas) != len(nb_tokens) or len(alphas) < 2:
        raise InputError(f"alphas and nb_tokens need the same length >= 2, got {len(alphas)} and {len(nb_tokens)}")
    gen = torch.Generator().manual_seed(seed)
    conds = []
    for i, (alpha, k) in enumerate(zip(alphas, nb_tokens)):
        _check_int(f"nb_tokens[{i}]", k)
        if not (isinstance(alpha, (int, float)) and alpha > 0 and math.isfinite(alpha)):
            raise InputError(f"alphas[{i}] must be a positive number, got {alpha!r}")
        base = torch.tensor([float(alpha) ** j for j in range(N)], dtype=DTYPE)
        base[min(k, N):] = 0
        base = base / base.sum()
        conds.append(_random_rows(base, N ** i, gen).reshape((N,) * (i + 1)))
    spec = {"kind": "power_unif", "alphas": [float(a) for a in alphas], "nb_tokens": list(nb_tokens), "N": N,
            "seed": seed, "version": DATA_VERSION}
    return Law(tuple(conds), f"power_unif(alphas={list(alphas)}, nb_tokens={list(nb_tokens)}, N={N})", spec)


def last_position_law(nb_tokens: Sequence[int], N: int, k: float, p: float, seed: int = 0) -> Law:
    """Contexts as the seed's (uniform on nb_tokens[i] random tokens per level); the next token is a
    chosen token with probability p, every other with (1 - p) / (N - 1). The chosen token is drawn
    with probability proportional to (1 - j / N)^k over token j (k = 0: uniform)."""
    _check_int("N", N, 2)
    if not 0 < p < 1:
        raise InputError(f"p must be in (0, 1), got {p!r}")
    gen = torch.Generator().manual_seed(seed)
    conds = _supports(nb_tokens, N, gen)
    n_ctx = N ** len(nb_tokens)
    meta = torch.tensor([(1 - j / N) ** k for j in range(N)], dtype=DTYPE)
    choice = torch.multinomial(meta / meta.sum(), n_ctx, replacement=True, generator=gen)  # [N^S]
    last = torch.full((n_ctx, N), (1 - p) / (N - 1), dtype=DTYPE)
    last[torch.arange(n_ctx), choice] = p
    conds.append(last.reshape((N,) * (len(nb_tokens) + 1)))
    spec = {"kind": "last_position", "nb_tokens": list(nb_tokens), "N": N, "k": float(k), "p": float(p),
            "seed": seed, "version": DATA_VERSION}
    return Law(tuple(conds), f"last_position(N={N}, k={k}, p={p})", spec)


def rank_d_law(nb_tokens: Sequence[int], N: int, d: int, seed: int = 0, scale: float = 1.0, tail: float = 0.0,
               axis_aligned: bool = False) -> Law:
    """Next-token logits U diag(s) V^T over the N^S contexts with s_i = scale for i < d and
    s_i = scale * tail beyond (tail = 0: exactly rank d, the seed's gen_d_law without its bias;
    tail > 0: "almost rank d", the seed's almost_rank_d). U has orthonormal columns (a random
    N^S x N Gaussian's), V is random orthogonal, or the identity with axis_aligned=True. Logits are
    multiplied by sqrt(N^S) so each row has entries of order `scale`."""
    _check_int("N", N, 2)
    _check_int("d", d)
    if d > N:
        raise InputError(f"d={d} exceeds N={N}")
    gen = torch.Generator().manual_seed(seed)
    conds = _supports(nb_tokens, N, gen)
    n_ctx = N ** len(nb_tokens)
    U, _ = torch.linalg.qr(torch.randn(n_ctx, N, generator=gen, dtype=DTYPE))  # [N^S, N]
    V = torch.eye(N, dtype=DTYPE) if axis_aligned else torch.linalg.qr(torch.randn(N, N, generator=gen, dtype=DTYPE))[0]
    s = torch.full((N,), float(scale) * float(tail), dtype=DTYPE)
    s[:d] = float(scale)
    logits = (U * s) @ V.t() * math.sqrt(n_ctx)  # [N^S, N]
    conds.append(torch.softmax(logits, -1).reshape((N,) * (len(nb_tokens) + 1)))
    spec = {"kind": "rank_d", "nb_tokens": list(nb_tokens), "N": N, "d": d, "seed": seed, "scale": float(scale),
            "tail": float(tail), "axis_aligned": bool(axis_aligned), "version": DATA_VERSION}
    return Law(tuple(conds), f"rank_d(N={N}, d={d}, tail={tail})", spec)


def associations(N: int, S: int = 2, seed: int = 0) -> Law:
    """Deterministic associations: the N^S contexts are uniform and each has one next token, drawn
    uniformly (N = 50, S = 2 is the paper's experiment 1: N^2 = 2500 bigram pairs)."""
    _check_int("N", N, 2)
    _check_int("S", S)
    gen = torch.Generator().manual_seed(seed)
    conds = [torch.full((N,) * (i + 1), 1.0 / N, dtype=DTYPE) for i in range(S)]
    target = torch.randint(0, N, (N ** S,), generator=gen)
    last = torch.zeros(N ** S, N, dtype=DTYPE)
    last[torch.arange(N ** S), target] = 1.0
    conds.append(last.reshape((N,) * (S + 1)))
    spec = {"kind": "associations", "N": N, "S": S, "seed": seed, "version": DATA_VERSION}
    return Law(tuple(conds), f"associations(N={N}, S={S})", spec)


def empirical_law(base: dict, n: int, seed: int = 0) -> Law:
    """The empirical distribution of n sequences sampled from the law `base` (a law spec): what a
    model trained for epochs on a fixed sampled dataset sees, and what its training accuracy is
    measured against (the paper's experiment-1 numbers are accuracies on such a training set).
    Prefixes that were never sampled get uniform continuations (they have probability 0)."""
    _check_int("n", n)
    law = make_law(base)
    toks = law.sample(n, seed)  # [n, S + 1]
    N, conds = law.N, []
    for i in range(law.S + 1):
        flat = torch.zeros(N ** (i + 1), dtype=DTYPE)
        index = torch.zeros(n, dtype=torch.long)
        for j in range(i + 1):
            index = index * N + toks[:, j]
        flat.index_add_(0, index, torch.ones(n, dtype=DTYPE))
        counts = flat.reshape(-1, N)  # [N^i, N]
        totals = counts.sum(-1, keepdim=True)
        rows = torch.where(totals > 0, counts / totals.clamp_min(1), torch.full_like(counts, 1.0 / N))
        conds.append(rows.reshape((N,) * (i + 1)))
    spec = {"kind": "empirical", "base": dict(base), "n": n, "seed": seed, "version": DATA_VERSION}
    return Law(tuple(conds), f"empirical({n} samples of {law.name}, seed {seed})", spec)


LAWS: dict[str, Callable[..., Law]] = {
    "power_unif": power_unif_law, "last_position": last_position_law, "rank_d": rank_d_law,
    "associations": associations, "empirical": empirical_law,
}


def make_law(spec: dict) -> Law:
    """Rebuild a law from its `spec` (what `Law.spec` holds)."""
    if not isinstance(spec, dict) or spec.get("kind") not in LAWS:
        raise InputError(f"a law spec needs 'kind' in {sorted(LAWS)}, got {spec!r}")
    if spec.get("version", DATA_VERSION) != DATA_VERSION:
        raise InputError(f"law spec version {spec.get('version')!r} != this code's {DATA_VERSION!r}")
    args = {k: v for k, v in spec.items() if k not in ("kind", "version")}
    return LAWS[spec["kind"]](**args)


def capacity_bound(N: int, H: int, d_head: int, d: int, n_assoc: Optional[int] = None) -> float:
    """Corollary 2's accuracy lower bound for deterministic associations: an AoT with H heads of
    width d_h and embedding width d memorises at least H d_h + d of the n_assoc (default N^2, the
    bigram pairs) equally likely associations, and guesses the rest (1 / N each):
    1/N + (1 - 1/N) * min(1, (H d_h + d) / n_assoc)."""
    n = N ** 2 if n_assoc is None else _check_int("n_assoc", n_assoc)
    return 1 / N + (1 - 1 / N) * min(1.0, (H * d_head + d) / n)


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


# ------------------------------------------------------------------------------------------------
# training


@dataclass
class AssocRecipe:
    """How a model of the family is trained (Adam; deterministic for a seed)."""

    steps: int = 2000
    lr: float = 1e-3
    batch_size: int = 0  # 0 = full batch: the exact expected loss over all contexts (weights P(c));
    #                      > 0 = that many contexts sampled from the law per step, as the seed
    loss: str = "next_token"  # "next_token": CE on the (sampled or expected) next token; "divergence": KL to pi
    betas: tuple = (0.9, 0.999)  # torch's Adam defaults, as the seed
    schedule: str = "constant"  # "constant" (the seed's notebook), "cosine" or "linear" (the paper's
    #                             sweeps: LinearLR), both ending at final_lr_frac * lr
    final_lr_frac: float = 0.05
    eval_every: int = 100
    threads: int = 1

    def __post_init__(self) -> None:
        _check_int("steps", self.steps)
        _check_int("batch_size", self.batch_size, 0)
        _check_int("eval_every", self.eval_every)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise InputError(f"lr must be positive, got {self.lr!r}")
        if self.loss not in ("next_token", "divergence"):
            raise InputError(f"loss must be 'next_token' or 'divergence', got {self.loss!r}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise InputError(f"schedule must be 'constant', 'cosine' or 'linear', got {self.schedule!r}")
        if not (isinstance(self.final_lr_frac, (int, float)) and 0 < self.final_lr_frac <= 1):
            raise InputError(f"final_lr_frac must be in (0, 1], got {self.final_lr_frac!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        if self.schedule == "constant":  # no end point: keeps the keys of constant-rate models unchanged
            del d["final_lr_frac"]
        return d


def scheduled_lr(recipe: AssocRecipe, step: int) -> float:
    """The learning rate of `step` (0-based) under the recipe's schedule."""
    end, t = recipe.final_lr_frac, step / recipe.steps
    if recipe.schedule == "cosine":
        return recipe.lr * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t)))
    if recipe.schedule == "linear":
        return recipe.lr * (1 - (1 - end) * t)
    return recipe.lr


def context_logits(model: nn.Module, law: Law) -> torch.Tensor:
    """The model's logits on every context of the law: [N^S, N] (with gradients)."""
    if isinstance(model, LowRank):
        return model.all_logits()
    if isinstance(model, AssocTransformer) and model.acfg.n_layers == 1:
        try:
            return table_logits(model)
        except InputError:
            pass
    return model(law.contexts())


@torch.no_grad()
def evaluate(model: nn.Module, law: Law) -> dict:
    """Exact metrics over the law: divergence, expected loss, accuracy."""
    was = model.training
    model.eval()
    logits = context_logits(model, law).to(DTYPE)
    model.train(was)
    loss = law.expected_loss(logits)
    return {"divergence": loss - law.entropy(), "loss": loss, "accuracy": law.accuracy(logits)}


def train_assoc(model: nn.Module, law: Law, recipe: AssocRecipe, seed: int,
                progress: Optional[Callable[[int, int, dict], None]] = None) -> TrainResult:
    """Train `model` in place on `law`; returns circuits.train.TrainResult (history of exact metrics)."""
    if getattr(model, "acfg", None) is not None and (model.acfg.d_vocab != law.N or model.acfg.n_ctx != law.S):
        raise InputError(f"model reads {model.acfg.n_ctx} tokens of {model.acfg.d_vocab}, the law has "
                         f"contexts of {law.S} tokens of {law.N}")
    old = torch.get_num_threads()
    torch.set_num_threads(recipe.threads or old)
    try:
        return _train(model, law, recipe, seed, progress)
    finally:
        torch.set_num_threads(old)


def _train(model, law, recipe, seed, progress) -> TrainResult:
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    result = TrainResult()
    if not params:  # everything frozen (the seed's "nothing trained" freezer): evaluate only
        model.eval()
        result.final = {"step": 0, **evaluate(model, law)}
        result.final["acc"] = result.final["accuracy"]
        result.history.append(dict(result.final))
        return result
    opt = torch.optim.Adam(params, lr=recipe.lr, betas=tuple(recipe.betas))
    dtype = params[0].dtype
    w = law.context_probs().to(dtype)  # [N^S]
    pi = law.next_token_probs().to(dtype)  # [N^S, N]
    keep = torch.nonzero(w > 0).squeeze(1)
    entropy = law.entropy()
    start = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        lr = scheduled_lr(recipe, step)
        for g in opt.param_groups:
            g["lr"] = lr
        logits = context_logits(model, law)  # [N^S, N]
        if recipe.batch_size:  # sampled contexts, as the seed's data loader (with replacement)
            idx = torch.multinomial(w, recipe.batch_size, replacement=True, generator=gen)
            logp = torch.log_softmax(logits[idx], -1)
            if recipe.loss == "next_token":
                y = torch.multinomial(pi[idx], 1, generator=gen).squeeze(1)
                loss = F.nll_loss(logp, y)
            else:
                loss = -(pi[idx] * logp).sum(-1).mean()
        else:
            logp = torch.log_softmax(logits[keep], -1)
            loss = -(w[keep, None] * pi[keep] * logp).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % recipe.eval_every == 0 or step + 1 == recipe.steps:
            row = {"step": step + 1, "loss": loss.item() - (entropy if recipe.loss == "divergence" else 0.0),
                   "lr": lr, "elapsed": round(time.perf_counter() - start, 3), **evaluate(model, law)}
            row["acc"] = row["accuracy"]
            result.history.append(row)
            if progress:
                progress(step + 1, recipe.steps, row)
    model.eval()
    result.steps = recipe.steps
    result.wall_time = time.perf_counter() - start
    result.final = dict(result.history[-1])
    return result


# ------------------------------------------------------------------------------------------------
# experiments: what is trained, how, and where the weights live


@dataclass(frozen=True)
class Experiment:
    """A model of the family trained on a law with a recipe; `spec(seed)` is its model-store key."""

    name: str  # prefix of the reference checkpoint names: fixtures/models/<name>_s<seed>.*
    config: AssocConfig  # its seed is replaced by the model seed
    law: str  # the law spec as canonical JSON (hashable, nests); `law_spec` gives the dict
    recipe: AssocRecipe
    description: str = ""

    @classmethod
    def make(cls, name: str, config: AssocConfig, law: dict, recipe: AssocRecipe, description: str = "") -> "Experiment":
        return cls(name, config, json.dumps(law, sort_keys=True), recipe, description)

    @property
    def law_spec(self) -> dict:
        return json.loads(self.law)

    def build_law(self) -> Law:
        return make_law(self.law_spec)

    def spec(self, seed: int) -> dict:
        return {
            "kind": "assoc_model",
            "name": self.name,
            "config": replace(self.config, seed=seed).to_dict(),
            "law": self.law_spec,
            "train": self.recipe.to_dict(),
            "seed": seed,
            "train_code": TRAIN_CODE_VERSION,
            "torch": torch.__version__.split("+")[0],
        }

    def reference_name(self, seed: int) -> str:
        return f"{self.name}_s{seed}"

    def train(self, seed: int, progress=None) -> tuple[AssocTransformer, dict]:
        law = self.build_law()
        model = build_model(replace(self.config, seed=seed))
        result = train_assoc(model, law, self.recipe, seed=seed, progress=progress)
        card = {"metrics": result.final, "history": result.history, "steps": result.steps,
                "wall_time": round(result.wall_time, 3), "description": self.description}
        return model, card


@dataclass
class LoadedAssoc:
    model: AssocTransformer
    card: dict
    source: str  # "reference" | "cache" | "trained"
    experiment: Experiment
    seed: int

    def info(self) -> dict:
        """What the report records about this model (circuits.pytest_plugin.note_model)."""
        from ..zoo import model_info

        return model_info(self.experiment.name, self.seed, self.card, self.source)


def _load_or_build(spec: dict, ref_name: str, build, *, retrain: bool, store, reference_dir: Path):
    """(state, card, source): the committed reference when it exists (and matches `spec`), else the
    model store (built once, under its file lock). A reference made from another spec is an error
    (StaleCheckpointError names the fields that changed)."""
    from ..store import MissingCheckpointError, ModelStore, load_reference

    if not retrain:
        try:
            state, card = load_reference(reference_dir, ref_name, spec)
            return state, card, "reference"
        except MissingCheckpointError:
            pass
    store = store or ModelStore()
    state, card, created = store.get_or_create(spec, build)
    return state, card, "trained" if created else "cache"


def load_experiment(exp: Experiment, seed: int = 0, *, retrain: bool = False, store=None,
                    reference_dir: Path = REFERENCE_DIR, progress=None) -> LoadedAssoc:
    """The trained model of `exp` for `seed`: reference checkpoint, else store, else trained now."""
    spec = exp.spec(seed)

    def build():
        model, card = exp.train(seed, progress)
        return model.state_dict(), card

    state, card, source = _load_or_build(spec, exp.reference_name(seed), build, retrain=retrain, store=store,
                                         reference_dir=reference_dir)
    model = build_model(replace(exp.config, seed=seed))
    model.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return LoadedAssoc(model.eval(), card, source, exp, seed)


def load_low_rank_optimum(law_spec: dict, d: int, *, restarts: int = 16, name: Optional[str] = None,
                          retrain: bool = False, store=None, reference_dir: Path = REFERENCE_DIR) -> tuple[LowRank, dict]:
    """`low_rank_optimum` cached like a model: (best LowRank, card with divergence / closed_form / trained)."""
    law = make_law(law_spec)
    spec = {"kind": "low_rank_optimum", "law": law_spec, "d": d, "restarts": restarts, "steps": 2000,
            "lbfgs_steps": 500, "train_code": TRAIN_CODE_VERSION, "torch": torch.__version__.split("+")[0]}

    def build():
        t0 = time.perf_counter()
        opt = low_rank_optimum(law, d, seeds=tuple(range(restarts)))
        return opt.model.state_dict(), {"divergence": opt.divergence, "closed_form": opt.closed_form,
                                        "trained": opt.trained, "wall_time": round(time.perf_counter() - t0, 3)}

    ref = name or f"assoc_lowrank_{law_spec['kind']}_d{d}"
    state, card, _ = _load_or_build(spec, ref, build, retrain=retrain, store=store, reference_dir=reference_dir)
    model = LowRank(law.N, law.S, d)
    model.load_state_dict(state)
    return model, card


# --- the seed's experiments -----------------------------------------------------------------------

# Experiment 1 of the paper (its Figure "Scaling law for N=50, d=d_h=10"), as the authors' code ran it
# (experiments.ipynb / train.py of github.com/leodana2000/Transformer_Attentional_Memory): each of the
# N^2 = 2,500 pairs (t1, t2) gets a uniformly random next token; a fixed training set of 16,384
# sampled sequences; Adam, 64 epochs x 64 batches of 256 (4,096 steps), the rate falling linearly
# from 1e-2 to 5e-4 (their LinearLR's factors); positions enter the attention inputs only. Their
# accuracy is the *training* accuracy (argmax on the training batches), i.e. accuracy under the
# training set's empirical law, which weights each pair by how often it was sampled: a model that
# memorises the frequent pairs first scores above its share of distinct pairs (the uniform-law
# accuracy is ~0.05-0.08 lower in the middle of the curve; the claims' notes give it).
PAPER_EXP1 = {1: 0.1298125, 6: 0.324265625, 11: 0.50625, 16: 0.6851640625, 21: 0.860796875, 26: 0.9633671875,
              31: 0.9973515625}  # Data_exp_1_10.csv of the paper's repository (mean of 5 runs)
EXP1_HEADS = tuple(PAPER_EXP1)
EXP1_DEFAULT_SEEDS = (0,)
EXP1_FULL_SEEDS = (0, 1, 2, 3, 4)  # the paper averaged 5 repetitions (same training set, new models)
EXP1_TABLE = {"kind": "associations", "N": 50, "S": 2, "seed": 0, "version": DATA_VERSION}
EXP1_LAW = {"kind": "empirical", "base": EXP1_TABLE, "n": 16_384, "seed": 0, "version": DATA_VERSION}
EXP1_RECIPE = AssocRecipe(steps=4096, lr=1e-2, batch_size=256, loss="next_token", schedule="linear",
                          final_lr_frac=0.05, eval_every=256)


def exp1(H: int, d: int = 10, d_head: int = 10) -> Experiment:
    cfg = AssocConfig(d_vocab=50, n_ctx=2, d_model=d, n_heads=H, d_head=d_head, pos_in_residual=False)
    return Experiment.make(f"assoc_exp1_d{d}_H{H:02d}", cfg, EXP1_LAW, EXP1_RECIPE,
                           f"paper experiment 1: N=50 bigram associations (16,384 sampled), d={d}, d_h={d_head}, H={H}")


# The seed's superposition / Proposition 1 setting: N = 10, the next token is one chosen token with
# probability 0.95 (last_position_law with k = 0), d = d_h = 5; trained full batch on the exact loss.
SUPER_LAW = {"kind": "last_position", "nb_tokens": [10, 10], "N": 10, "k": 0.0, "p": 0.95, "seed": 0,
             "version": DATA_VERSION}
SUPER_RECIPE = AssocRecipe(steps=5000, lr=1e-3, batch_size=0, loss="next_token", eval_every=250)


def superposition_model(H: int) -> Experiment:
    cfg = AssocConfig(d_vocab=10, n_ctx=2, d_model=5, n_heads=H, d_head=5)
    return Experiment.make(f"assoc_super_H{H:02d}", cfg, SUPER_LAW, SUPER_RECIPE,
                           f"last-position law N=10 p=0.95, d=d_h=5, H={H}")


# The seed's freezing cell: N = 10 deterministic bigrams (power_unif_law([1,1,1], [N, N, 1])), d = 5,
# 20 heads of width 5; Adam lr 1e-3 on 5,000 batches of 1,024 sequences.
FREEZE_LAW = {"kind": "power_unif", "alphas": [1.0, 1.0, 1.0], "nb_tokens": [10, 10, 1], "N": 10, "seed": 0,
              "version": DATA_VERSION}
FREEZE_RECIPE = AssocRecipe(steps=5000, lr=1e-3, batch_size=1024, loss="next_token", eval_every=250)
FREEZERS = {"none": (), "train_O_only": ("E", "pos", "QKV", "U"), "freeze_O": ("O",),
            "all": ("E", "pos", "QKV", "O", "U")}


def freezing_model(freezer: str) -> Experiment:
    cfg = AssocConfig(d_vocab=10, n_ctx=2, d_model=5, n_heads=20, d_head=5, freeze=FREEZERS[freezer])
    return Experiment.make(f"assoc_freeze_{freezer}", cfg, FREEZE_LAW, FREEZE_RECIPE,
                           f"N=10 bigrams, d=5, 20 heads, frozen: {FREEZERS[freezer] or 'nothing'}")


# The seed's skip-connection cell: N = 100, 40 x 40 input pairs each with one next token
# (power_unif_law([1,1,1], [40, 40, 1])), d = 10, 10 heads of width 10, with and without the residual
# connection around the heads; Adam lr 1e-3 on 5,000 batches of 1,024 sequences.
SKIP_LAW = {"kind": "power_unif", "alphas": [1.0, 1.0, 1.0], "nb_tokens": [40, 40, 1], "N": 100, "seed": 0,
            "version": DATA_VERSION}
SKIP_RECIPE = AssocRecipe(steps=5000, lr=1e-3, batch_size=1024, loss="next_token", eval_every=250)


SKIP_SEEDS = (0, 1)


def skip_model(residual: bool) -> Experiment:
    cfg = AssocConfig(d_vocab=100, n_ctx=2, d_model=10, n_heads=10, d_head=10, residual=residual)
    return Experiment.make(f"assoc_skip_{'residual' if residual else 'no_residual'}", cfg, SKIP_LAW, SKIP_RECIPE,
                           f"N=100, 1600 associations, d=10, 10 heads, residual={residual}")


def reference_experiments() -> list[tuple[Experiment, int]]:
    """Every (experiment, seed) whose checkpoint is committed under fixtures/models/."""
    out = [(exp1(H), s) for H in EXP1_HEADS for s in EXP1_DEFAULT_SEEDS]
    out += [(superposition_model(H), 0) for H in (5, 20)]
    out += [(freezing_model(f), 0) for f in FREEZERS]
    out += [(skip_model(r), s) for r in (True, False) for s in SKIP_SEEDS]
    return out


def named_experiments() -> dict[str, Experiment]:
    """Every experiment with a committed reference, by name (what `python -m circuits` lists)."""
    return {exp.name: exp for exp, _ in reference_experiments()}


def get_experiment(name: str) -> Experiment:
    exps = named_experiments()
    if name not in exps:
        from ..errors import UnknownModelError, did_you_mean

        raise UnknownModelError(f"unknown associative-memory experiment {name!r}{did_you_mean(name, exps)}")
    return exps[name]


def write_references(pairs: Optional[Sequence[tuple[Experiment, int]]] = None, reference_dir: Path = REFERENCE_DIR,
                     log=print) -> None:
    """Train (or take from the store) and write the committed reference checkpoints."""
    from ..store import ModelStore, save_reference

    store = ModelStore()
    for exp, seed in pairs or reference_experiments():
        loaded = load_experiment(exp, seed, retrain=True, store=store)
        save_reference(reference_dir, exp.reference_name(seed), loaded.model.state_dict(), loaded.card)
        log(f"{exp.reference_name(seed)}: {loaded.source}, {loaded.card.get('wall_time')} s, "
            f"{ {k: round(v, 4) for k, v in loaded.card['metrics'].items() if isinstance(v, float)} }")
    for law, d in ((SUPER_LAW, 5), (SUPER_LAW, 4)):
        model, card = load_low_rank_optimum(law, d, retrain=True, store=store)
        save_reference(reference_dir, f"assoc_lowrank_{law['kind']}_d{d}", model.state_dict(), card)
        log(f"low-rank {law['kind']} d={d}: divergence {card['divergence']:.5f}, {card.get('wall_time')} s")


if __name__ == "__main__":  # python -m circuits.tasks.assoc_memory: refresh the committed references
    torch.set_num_threads(1)
    write_references()

"""Laws over token sequences and the exact quantities the associative-memory claims compare against.

``power_unif_law`` (the seed's: each conditional has ``nb_tokens[l]`` non-zero probabilities decaying
as alpha^rank, on a random permutation of the tokens), ``last_position_law`` (the next token is one
chosen token with probability p, uniform otherwise), ``rank_d_law`` (next-token logits of rank d, or
"almost" rank d), ``associations`` (deterministic bigrams: N^S contexts, uniform, each with one next
token; the paper's experiment 1 is N = 50, S = 2) and ``empirical_law`` (a fixed sampled training set).

Everything is a finite sum over the N^S contexts, so nothing is estimated by sampling:
``Law.entropy`` H(t_{S+1} | t_1..t_S) (the optimal loss), ``Law.random_baseline`` log N - H,
``Law.divergence(logits)`` E_c KL(pi_c || softmax(logits_c)) and ``Law.accuracy(logits)``
E_c pi_c(argmax logits_c). ``capacity_bound`` is Corollary 2's accuracy lower bound.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from circuits.tasks.assoc.model import all_contexts
from circuits.errors import InputError

DATA_VERSION = "assoc-law-1"  # bump when a law constructor changes what a seed produces
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
    conds = _empirical_conditionals(json.dumps(base, sort_keys=True), n, seed)
    spec = {"kind": "empirical", "base": dict(base), "n": n, "seed": seed, "version": DATA_VERSION}
    return Law(tuple(c.clone() for c in conds), f"empirical({n} samples of {law.name}, seed {seed})", spec)


@functools.lru_cache(maxsize=16)
def _empirical_conditionals(base_json: str, n: int, seed: int) -> tuple:
    """The counting behind `empirical_law`, once per (base, n, seed) and process: sampling 262,144
    sequences of N = 70 takes ~3 s, and every entry of a grid shares one law (callers get clones)."""
    law = make_law(json.loads(base_json))
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
    return tuple(conds)


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

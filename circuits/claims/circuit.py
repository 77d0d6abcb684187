"""Claims about circuits in the field's vocabulary, each with an interval.

Notation: ``m(C)`` is the task metric (a per-example number, averaged over examples) of the model
with every edge outside circuit C patched (``circuits.analysis.circuit.run_circuit``); ``N`` is the full
circuit (the model), ``∅`` the empty one.

* **Faithfulness** (MIB, Mueller et al. 2025):  ``f(C) = (m(C) - m(∅)) / (m(N) - m(∅))``.
  1 = the circuit does what the model does, 0 = no better than the fully ablated model. With
  ``reference=`` another model, ``m(N)`` and ``m(∅)`` come from it and ``m(C)`` from the model
  given: the share of the reference model's performance that the circuit recovers *in the model as
  it is* (under a mutation that breaks a part the circuit uses, it falls; the ratio of a broken
  model to itself would not).
* **MIB curve, CPR, CMD**: for an edge ranking, ``C_k`` = the top ``k`` percent of edges,
  ``k in MIB_PERCENTS = {0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100}``; then

      CPR = ∫ f(C_k) dk          (higher is better)
      CMD = ∫ |1 - f(C_k)| dk    (lower is better)

  over k as a fraction of the edges (0.001 .. 1), by the trapezoidal rule on those points. ``C_k``
  has ``round(k * n_edges)`` edges (0 for the smallest k on a small graph: f = 0 there).
* **Completeness**: the complement of C (every edge C leaves out) has ``f ≈ 0``.
* **Equivalence** (circuitry, Shi et al. 2024, stated as an interval test): the whole 95% interval
  of ``f(C)`` lies within ``1 ± eps`` (two one-sided tests at 2.5% each).
* **Minimality** (circuitry, per edge): for each edge e of C the knockout effect
  ``δ_i(e) = |m_i(C) - m_i(C \\ e)|`` per example is compared with ``τ``, the ``q``-quantile of the
  same effect of random edges r outside C added to it, ``mean_i |m_i(C ∪ r) - m_i(C)|``; a
  one-sided t-test over examples of ``mean δ(e) > τ`` gives p_e, and the p-values of all edges are
  corrected by **Holm's** step-down method (family-wise error at α). circuitry's own test is a
  binomial test without correction; ours corrects for testing every edge.
* **Sufficiency** (circuitry): C's faithfulness against N random circuits of the same size, the
  claim on the share of them that C beats (Clopper-Pearson interval over the N draws).

Intervals over examples are percentile bootstraps with the examples resampled together across the
circuits compared (paired), so the noise of the data set is in the interval, not only the draws'.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from circuits.analysis.circuit import Ablation, Circuit, CircuitError, Graph, ablated_outputs, ranking, run_circuit
from circuits.claims.stats import DEFAULT_RESAMPLES, Estimate, bootstrap_ci

__all__ = ["MIB_PERCENTS", "Metric", "logit_margin", "log_prob", "Evaluator", "faithfulness", "faithfulness_stat", "cpr_stat",
           "cmd_stat", "MIBCurve", "mib_curve", "holm", "MinimalityResult", "minimality", "SufficiencyResult",
           "sufficiency", "claim_faithfulness", "claim_completeness", "claim_equivalence", "claim_minimality",
           "claim_sufficiency", "claim_cpr_cmd", "curve_figure", "about", "circuit_without"]

MIB_PERCENTS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100)
Metric = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits [batch, vocab], labels [batch]) -> [batch]


def logit_margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """m_i = logit of the right class minus the largest other logit (the logit difference for two
    classes): [batch]."""
    labels = labels.long()[:, None]
    right = logits.gather(-1, labels)[:, 0]  # [batch]
    other = logits.scatter(-1, labels, float("-inf")).amax(-1)  # [batch]
    return right - other


logit_margin.__name__ = "logit margin"


def log_prob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """m_i = log-probability of the right class (minus the cross-entropy): [batch]."""
    return logits.log_softmax(-1).gather(-1, labels.long()[:, None])[:, 0]


log_prob.__name__ = "log-prob of the label"


def about(edges: Sequence[str]) -> list[str]:
    """``@pytest.mark.about`` targets for a circuit written as edge names, without a model (at import
    time): ``head:LlHh`` for every head it names, ``mlp:Ll`` for every MLP."""
    import re

    out: list[str] = []
    for text in edges:
        for part in re.split(r"->", text):
            name = part.strip().rsplit(".", 1)[0] if re.search(r"\.[qkv]$", part.strip()) else part.strip()
            m = re.match(r"^(?:L(\d+)H(\d+)|(\d+)\.(\d+))$", name)
            if m:
                l, h = (m.group(1), m.group(2)) if m.group(1) is not None else (m.group(3), m.group(4))
                t = f"head:L{int(l)}H{int(h)}"
            else:
                m = re.match(r"^(?:MLP(\d+)|L(\d+)\.mlp)$", name, re.IGNORECASE)
                t = f"mlp:L{int(m.group(1) or m.group(2))}" if m else None
            if t and t not in out:
                out.append(t)
    return out


# --- evaluation ------------------------------------------------------------------------------------------


class Evaluator:
    """Per-example metric values of circuits on one data set, one ablation and one metric; the
    ablated sender outputs are computed once, and each circuit's values are kept (by edge set)."""

    def __init__(self, model, x: torch.Tensor, labels: torch.Tensor, ablation: Ablation, metric: Metric = logit_margin,
                 batch_size: int = 1000):
        if not isinstance(labels, torch.Tensor) or labels.shape[:1] != x.shape[:1]:
            got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise CircuitError(f"labels must be a tensor with one row per input ({x.shape[0]}), got {got}")
        self.model, self.x, self.labels, self.ablation, self.metric = model, x, labels, ablation, metric
        self.graph = Graph.of(model)
        self.batch_size = batch_size
        with torch.no_grad():
            self.ablated = ablated_outputs(model, x, ablation)  # [senders, batch or 1, pos, d_model]
        self._memo: dict[frozenset, np.ndarray] = {}

    def batches(self):
        """(rows, inputs, labels, ablated outputs) per batch, rows sorted by length and trailing
        columns that are padding in every row of the batch cut off. Exact: padding is masked out of
        every attention row, so a real position never reads a pad position (and resampled rows keep
        their corrupted input's length too)."""
        pad = self.model.cfg.pad_token if not self.model.cfg.d_input else None
        n, P = self.x.shape[0], self.x.shape[1]
        if pad is None:
            order, lengths = torch.arange(n), torch.full((n,), P)
        else:
            real = self.x != pad  # [batch, pos]
            if self.ablated.shape[1] > 1 and self.ablation.reference is not None:
                real = real | (self.ablation.reference != pad)
            lengths = torch.where(real.any(1), P - real.flip(1).long().argmax(1), torch.ones(n, dtype=torch.long))
            order = torch.argsort(lengths, stable=True)
        for s in range(0, n, self.batch_size):
            rows = order[s: s + self.batch_size]
            width = int(lengths[rows].max())
            abl = self.ablated[..., :width, :]
            abl = abl if abl.shape[1] == 1 else abl[:, rows]
            yield rows, self.x[rows, :width], self.labels[rows], abl

    def values(self, circuit: Circuit) -> np.ndarray:
        """m_i(C) for every example: [n] float64."""
        key = circuit.edges
        if key not in self._memo:
            out = torch.empty(self.x.shape[0], dtype=torch.float64)
            with torch.no_grad():
                for rows, x, labels, abl in self.batches():
                    out[rows] = self.metric(run_circuit(self.model, x, circuit, abl), labels).double().cpu()
            self._memo[key] = out.numpy()
        return self._memo[key]

    def full(self) -> np.ndarray:
        return self.values(Circuit.full(self.graph))

    def empty(self) -> np.ndarray:
        return self.values(Circuit.empty(self.graph))


def faithfulness_stat(c, n, e, axis: int = -1):
    """(mean c - mean e) / (mean n - mean e), vectorised over leading axes."""
    c, n, e = (np.asarray(a, dtype=np.float64) for a in (c, n, e))
    with np.errstate(all="ignore"):
        return (c.mean(axis) - e.mean(axis)) / (n.mean(axis) - e.mean(axis))


faithfulness_stat.__name__ = "faithfulness"


def _check_range(full: np.ndarray, empty: np.ndarray, what: str) -> None:
    gap = float(full.mean() - empty.mean())
    if not math.isfinite(gap) or abs(gap) < 1e-9 * max(1.0, abs(float(full.mean()))):
        raise CircuitError(f"{what}: m(full) - m(empty) = {gap:.3g}: the ablation leaves the metric unchanged, "
                           "so faithfulness is undefined (choose a metric or ablation that the model's "
                           "mechanism moves)")


def faithfulness(evaluator: Evaluator, circuit: Circuit, reference: Optional[Evaluator] = None,
                 seed: int = 0, n_resamples: int = DEFAULT_RESAMPLES) -> Estimate:
    """f(C) with a paired percentile bootstrap over examples (see the module docstring)."""
    ref = reference or evaluator
    c, n, e = evaluator.values(circuit), ref.full(), ref.empty()
    _check_range(n, e, f"faithfulness of {circuit.name!r}")
    return bootstrap_ci((c, n, e), faithfulness_stat, paired=True, method="percentile", seed=seed,
                        n_resamples=n_resamples)


# --- MIB curve -----------------------------------------------------------------------------------------


def _trapz(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Trapezoidal area of y [..., K] over x [K]."""
    dx = np.diff(x)
    return ((y[..., 1:] + y[..., :-1]) * 0.5 * dx).sum(-1)


def _curve_points(samples, axis: int = -1) -> np.ndarray:
    """f(C_k) [..., K] from (c_1..c_K, n, e), each [..., n_examples]."""
    *cs, n, e = (np.asarray(a, dtype=np.float64) for a in samples)
    with np.errstate(all="ignore"):
        denom = n.mean(axis) - e.mean(axis)
        return np.stack([(c.mean(axis) - e.mean(axis)) / denom for c in cs], -1)


def _make_area_stat(fractions: np.ndarray, kind: str):
    def stat(*samples, axis=-1):
        f = _curve_points(samples, axis)
        return _trapz(f if kind == "CPR" else np.abs(1.0 - f), fractions)

    stat.__name__ = kind
    return stat


def cpr_stat(f: np.ndarray, fractions: np.ndarray) -> float:
    """CPR = trapezoidal area under f over the edge fractions."""
    return float(_trapz(np.asarray(f, dtype=np.float64), np.asarray(fractions, dtype=np.float64)))


def cmd_stat(f: np.ndarray, fractions: np.ndarray) -> float:
    """CMD = trapezoidal area under |1 - f| over the edge fractions."""
    return float(_trapz(np.abs(1.0 - np.asarray(f, dtype=np.float64)), np.asarray(fractions, dtype=np.float64)))


@dataclass
class MIBCurve:
    percents: tuple
    sizes: list  # edges in C_k
    f: np.ndarray  # [K] point estimates
    f_lo: np.ndarray  # [K] 95% percentile bootstrap
    f_hi: np.ndarray
    cpr: Estimate
    cmd: Estimate
    method: str = ""


def mib_curve(evaluator: Evaluator, scores: torch.Tensor, percents: Sequence[float] = MIB_PERCENTS,
              method: str = "", seed: int = 0, n_resamples: int = 1000) -> MIBCurve:
    """f(C_k) for the top-k% edges of ``scores`` and CPR / CMD with paired bootstrap intervals."""
    graph = evaluator.graph
    percents = tuple(float(p) for p in percents)
    if not percents or any(not 0 < p <= 100 for p in percents) or list(percents) != sorted(percents):
        raise CircuitError(f"MIB percents must increase within (0, 100], got {percents}")
    order = ranking(graph, scores)
    sizes = [int(round(p / 100 * len(graph.edges))) for p in percents]
    cs = [evaluator.values(Circuit(graph, frozenset(graph.edges[i] for i in order[:k]), f"top {p}%"))
          for k, p in zip(sizes, percents)]
    n, e = evaluator.full(), evaluator.empty()
    _check_range(n, e, "MIB curve")
    samples = (*cs, n, e)
    fractions = np.array(percents) / 100.0
    f = _curve_points(samples)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(n), (n_resamples, len(n)))  # [resamples, examples]
    boot = _curve_points(tuple(s[idx] for s in samples))  # [resamples, K]
    lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
    cpr = bootstrap_ci(samples, _make_area_stat(fractions, "CPR"), paired=True, method="percentile", seed=seed,
                       n_resamples=n_resamples)
    cmd = bootstrap_ci(samples, _make_area_stat(fractions, "CMD"), paired=True, method="percentile", seed=seed,
                       n_resamples=n_resamples)
    return MIBCurve(percents, sizes, f, lo, hi, cpr, cmd, method)


def curve_figure(curves: Sequence[MIBCurve], title: str = ""):
    """The faithfulness curves f(C_k) against k (log axis) with their 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for c in curves:
        label = f"{c.method or 'ranking'}: CPR {c.cpr.point:.3f}, CMD {c.cmd.point:.3f}"
        ax.plot(c.percents, c.f, marker="o", label=label)
        ax.fill_between(c.percents, c.f_lo, c.f_hi, alpha=0.2)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("edges kept (% of the graph)")
    ax.set_ylabel("faithfulness f(C_k)")
    ax.set_title(title or "MIB faithfulness curve")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# --- minimality and sufficiency --------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control), in the input order."""
    p = np.asarray(p_values, dtype=np.float64)
    m = len(p)
    order = np.argsort(p, kind="stable")
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


@dataclass
class MinimalityResult:
    edges: list  # the circuit's edges, as names
    effects: np.ndarray  # [edges] mean |m_i(C) - m_i(C \ e)|
    tau: float  # the q-quantile of random edges' effects
    random_effects: np.ndarray
    p: np.ndarray  # one-sided t-test p-values
    p_holm: np.ndarray
    alpha: float
    q: float

    @property
    def not_necessary(self) -> list:
        return [e for e, p in zip(self.edges, self.p_holm) if p > self.alpha]


def minimality(evaluator: Evaluator, circuit: Circuit, n_random: int = 40, q: float = 0.9, alpha: float = 0.05,
               seed: int = 0) -> MinimalityResult:
    """Per-edge knockout against random edges added to the circuit (see the module docstring)."""
    from scipy import stats as st

    if not len(circuit):
        raise CircuitError(f"minimality of {circuit.name!r}: the circuit has no edges")
    graph = evaluator.graph
    outside = [e for e in graph.edges if e not in circuit.edges]
    if not outside:
        raise CircuitError(f"minimality of {circuit.name!r}: every edge is in the circuit, no random edges to compare")
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(outside), size=min(n_random, len(outside)), replace=False)
    base = evaluator.values(circuit)
    random_effects = np.array([np.abs(evaluator.values(Circuit(graph, circuit.edges | {outside[i]})) - base).mean()
                               for i in picks])
    tau = float(np.quantile(random_effects, q))
    edges = circuit.sorted_edges()
    per_example = [np.abs(base - evaluator.values(circuit.without(e))) for e in edges]
    effects = np.array([d.mean() for d in per_example])
    p = []
    for d in per_example:
        if np.ptp(d) == 0:  # a constant effect: no noise, the comparison is exact
            p.append(0.0 if d[0] > tau else 1.0)
        else:
            p.append(float(st.ttest_1samp(d, tau, alternative="greater").pvalue))
    p = np.array(p)
    return MinimalityResult([f"{s} -> {r}" for s, r in edges], effects, tau, random_effects, p, holm(p), alpha, q)


@dataclass
class SufficiencyResult:
    f_circuit: float
    f_random: np.ndarray  # [n_random]
    share_beaten: Estimate


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy.stats import beta

    a = (1 - level) / 2
    lo = 0.0 if k == 0 else float(beta.ppf(a, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - a, k + 1, n - k))
    return lo, hi


def sufficiency(evaluator: Evaluator, circuit: Circuit, n_random: int = 100, seed: int = 0,
                reference: Optional[Evaluator] = None) -> SufficiencyResult:
    """C's faithfulness against random circuits of its size (drawn uniformly among the graph's edges)."""
    graph = evaluator.graph
    ref = reference or evaluator
    n, e = ref.full(), ref.empty()
    _check_range(n, e, f"sufficiency of {circuit.name!r}")
    f_c = float(faithfulness_stat(evaluator.values(circuit), n, e))
    rng = np.random.default_rng(seed)
    f_r = []
    for _ in range(n_random):
        pick = rng.choice(len(graph.edges), size=len(circuit), replace=False)
        rand = Circuit(graph, frozenset(graph.edges[i] for i in pick), "random")
        f_r.append(float(faithfulness_stat(evaluator.values(rand), n, e)))
    f_r = np.array(f_r)
    k = int((f_r < f_c).sum())
    lo, hi = clopper_pearson(k, n_random)
    est = Estimate(k / n_random, lo, hi, 0.95, "Clopper-Pearson", n_random, "share of random circuits beaten")
    return SufficiencyResult(f_c, f_r, est)


# --- claims -----------------------------------------------------------------------------------------------


def _note(circuit: Circuit, evaluator: Evaluator) -> str:
    return (f"circuit {circuit.name!r} ({len(circuit)} of {len(evaluator.graph.edges)} edges), "
            f"{evaluator.ablation.describe()}, metric {getattr(evaluator.metric, '__name__', 'metric')}")


def claim_faithfulness(claim, evaluator: Evaluator, circuit: Circuit, at_least: float,
                       reference: Optional[Evaluator] = None, name: Optional[str] = None) -> Estimate:
    """Claim f(C) >= at_least on the bootstrap interval's lower bound."""
    est = faithfulness(evaluator, circuit, reference, seed=claim.draws_seed)
    claim.at_least(name or f"faithfulness of {circuit.name}", est, at_least, note=_note(circuit, evaluator))
    return est


def claim_completeness(claim, evaluator: Evaluator, circuit: Circuit, at_most: float,
                       reference: Optional[Evaluator] = None, name: Optional[str] = None) -> Estimate:
    """Claim f(complement of C) <= at_most on the interval's upper bound: without C the task is gone."""
    comp = circuit.complement()
    est = faithfulness(evaluator, comp, reference, seed=claim.draws_seed)
    claim.at_most(name or f"faithfulness of the complement of {circuit.name}", est, at_most,
                  note=_note(comp, evaluator))
    return est


def claim_equivalence(claim, evaluator: Evaluator, circuit: Circuit, eps: float,
                      reference: Optional[Evaluator] = None, name: Optional[str] = None) -> Estimate:
    """Claim the whole 95% interval of f(C) lies in 1 ± eps."""
    est = faithfulness(evaluator, circuit, reference, seed=claim.draws_seed)
    claim.close_to(name or f"{circuit.name} is equivalent to the model", est, 1.0, atol=eps,
                   note=_note(circuit, evaluator) + "; two one-sided tests at 2.5%")
    return est


def claim_minimality(claim, evaluator: Evaluator, circuit: Circuit, alpha: float = 0.05, q: float = 0.9,
                     n_random: int = 40, name: Optional[str] = None) -> MinimalityResult:
    """Claim every edge of C is necessary: its knockout effect exceeds the q-quantile of random edges',
    Holm-corrected over the circuit's edges at family-wise level alpha (the largest adjusted p-value
    <= alpha)."""
    res = minimality(evaluator, circuit, n_random=n_random, q=q, alpha=alpha, seed=claim.draws_seed)
    worst = int(np.argmax(res.p_holm))
    detail = (f"Holm-corrected over {len(res.edges)} edges; tau = {res.tau:.4g} ({q:.0%} quantile of "
              f"{len(res.random_effects)} random edges' effects); weakest edge {res.edges[worst]} "
              f"(effect {res.effects[worst]:.4g}); not necessary: {res.not_necessary or 'none'}")
    claim.at_most(name or f"largest Holm-adjusted p of an edge of {circuit.name}", float(res.p_holm[worst]), alpha,
                  note=_note(circuit, evaluator) + "; " + detail)
    return res


def claim_sufficiency(claim, evaluator: Evaluator, circuit: Circuit, at_least: float = 0.9, n_random: int = 100,
                      reference: Optional[Evaluator] = None, name: Optional[str] = None) -> SufficiencyResult:
    """Claim C beats at least ``at_least`` of random circuits of its size (Clopper-Pearson lower bound)."""
    res = sufficiency(evaluator, circuit, n_random=n_random, seed=claim.draws_seed, reference=reference)
    claim.at_least(name or f"share of random {len(circuit)}-edge circuits {circuit.name} beats", res.share_beaten,
                   at_least, note=_note(circuit, evaluator) + f"; f(C) = {res.f_circuit:.3f}, random circuits' "
                   f"median {np.median(res.f_random):.3f}, max {res.f_random.max():.3f}")
    return res


def claim_cpr_cmd(claim, curve: MIBCurve, cpr_at_least: Optional[float] = None, cmd_at_most: Optional[float] = None,
                  label: str = "") -> None:
    """Claims on CPR (lower bound) and CMD (upper bound) of one ranking's MIB curve."""
    what = label or curve.method or "ranking"
    note = "f(C_k) at k% = " + ", ".join(f"{p:g}: {v:.3f}" for p, v in zip(curve.percents, curve.f))
    if cpr_at_least is not None:
        claim.at_least(f"CPR of {what}", curve.cpr, cpr_at_least, note=note)
    if cmd_at_most is not None:
        claim.at_most(f"CMD of {what}", curve.cmd, cmd_at_most, note=note)


# --- a specificity control: the claim pointed at a circuit that lacks a part ------------------------------


def circuit_without(circuit: Circuit, *nodes: str, seed: int = 0) -> Circuit:
    """The circuit with every edge from or into the named components removed."""
    if not nodes:
        raise CircuitError("circuit_without needs components, e.g. 'circuit_without:L2H1'")
    drop = set()
    for n in nodes:
        drop.update(["logits"] if n.strip().lower() == "logits" else circuit.graph.node(n, "sender"))
    edges = frozenset(e for e in circuit.edges if e[0] not in drop and e[1].split(".")[0] not in drop)
    # the same name: a control run's claims must carry the main run's names to be compared with them
    return Circuit(circuit.graph, edges, circuit.name)


def _register() -> None:
    from circuits.claims.controls import register_control

    register_control("circuit_without", kind="data", fn=circuit_without, accepts=lambda obj: isinstance(obj, Circuit),
                     description="the circuit a claim names, with every edge of the given components removed")


_register()

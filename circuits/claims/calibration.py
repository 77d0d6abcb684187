"""Calibration of the claims' decision rules: how often a claim passes when the true value sits
exactly at its threshold.

A decision rule with a 95% two-sided interval decides ``at_least`` on the lower bound, so a claim
whose population value equals its threshold should pass at most 2.5% of the time (the nominal
level); ``close_to`` / ``between`` on an interval likewise pass at most 2.5% of the time with the
true value on the edge of the tolerance. Each :class:`Rule` here simulates one claim, with data
drawn from a population whose value is known in closed form, and calls the very functions the
claims call (``Claims.at_least`` on ``Claims.sample``, ``stats.auroc_ci``, ``scrub.scrub_claim`` on
a ``ScrubResult`` built by ``scrub.scrub_result``); :func:`pass_rate` runs it over many seeds and
gives a Wilson interval for the rate. ``tests/test_calibration.py`` checks each rule with 200 seeds;
``scripts/calibrate.py`` writes the README's table with more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from circuits.claims.core import Claims
from circuits.claims.stats import auroc_ci, spearman

__all__ = ["Rule", "Rate", "wilson", "pass_rate", "rules", "point_close_to"]


@dataclass(frozen=True)
class Rate:
    """``passed`` of ``seeds`` trials passed; ``lo``/``hi``: the Wilson interval of the rate."""

    passed: int
    seeds: int
    lo: float
    hi: float

    @property
    def rate(self) -> float:
        return self.passed / self.seeds

    def __str__(self) -> str:
        return f"{self.rate:.2%} [{self.lo:.2%}, {self.hi:.2%}] ({self.passed}/{self.seeds})"


def wilson(passed: int, seeds: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% two-sided by default)."""
    p = passed / seeds
    centre = (p + z * z / (2 * seeds)) / (1 + z * z / seeds)
    half = z * math.sqrt(p * (1 - p) / seeds + z * z / (4 * seeds * seeds)) / (1 + z * z / seeds)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Rule:
    """One decision rule, simulated at its threshold.

    ``trial(seed)`` draws a data set from the population with generator ``seed`` (the bootstrap's
    resampling seed is the seed too, as ``--draws-seed`` changes both) and returns whether the
    claim passed. ``nominal``: the rule's largest allowed pass rate at the threshold."""

    name: str
    nominal: float
    n: str  # the sample size(s), as shown in the table
    population: str  # the simulated population and its known value
    trial: Callable[[int], bool]


def pass_rate(rule: Rule, seeds: int, first_seed: int = 0) -> Rate:
    passed = sum(bool(rule.trial(s)) for s in range(first_seed, first_seed + seeds))
    return Rate(passed, seeds, *wilson(passed, seeds))


def _claims(seed: int) -> Claims:
    return Claims(raise_on_failure=False, draws_seed=seed)


# --- the rules ---------------------------------------------------------------------------------------


def mean_at_least(n: int, method: str, dist: str = "normal", n_resamples: int = 2000) -> Rule:
    """``claim.at_least(claim.sample(x), mu)`` with the population mean exactly ``mu``."""
    mu = 1.0

    def trial(seed: int) -> bool:
        g = np.random.default_rng([seed, 1])
        x = mu + (g.normal(size=n) if dist == "normal" else 1.0 - g.exponential(size=n))  # left tail long
        c = _claims(seed)
        return c.at_least("mean", c.sample(x, np.mean, method=method, n_resamples=n_resamples), mu).passed

    pop = "N(1, 1)" if dist == "normal" else "2 - Exp(1) (skewed; the long tail towards the threshold)"
    return Rule(f"at_least on claim.sample mean ({_mean_method(method)}, lower bound)", 0.025, str(n),
                f"{pop}, mean 1 = threshold", trial)


def _mean_method(method: str) -> str:
    """The interval a mean gets when ``method`` is asked (stats.bootstrap_ci: the studentized one)."""
    return f"studentized; {method} asked" if method in ("BCa", "percentile") else method


def mean_at_most(n: int, method: str, n_resamples: int = 1000) -> Rule:
    """``claim.at_most(claim.sample(x), mu)``, x ~ Exp(1) (right-skewed, like losses): mean 1."""

    def trial(seed: int) -> bool:
        g = np.random.default_rng([seed, 2])
        x = g.exponential(size=n)
        c = _claims(seed)
        return c.at_most("mean", c.sample(x, np.mean, method=method, n_resamples=n_resamples), 1.0).passed

    return Rule(f"at_most on claim.sample mean ({_mean_method(method)}, upper bound)", 0.025, str(n),
                "Exp(1) (skewed, like losses), mean 1 = threshold", trial)


def close_to_interval(n: int, method: str = "BCa") -> Rule:
    """``claim.close_to(claim.sample(x), 0, atol=1)`` with the mean at the tolerance's edge (1)."""

    def trial(seed: int) -> bool:
        g = np.random.default_rng([seed, 3])
        x = 1.0 + g.normal(size=n)
        c = _claims(seed)
        return c.close_to("mean", c.sample(x, np.mean, method=method), 0.0, atol=1.0).passed

    return Rule(f"close_to on claim.sample mean ({_mean_method(method)}, whole interval)", 0.025, str(n),
                "N(1, 1): mean on the edge of 0 ± 1", trial)


def point_close_to(n: int) -> Rule:
    """``claim.close_to(mean(x), 0, atol=0.2)`` on a bare sample mean: no interval, so at the edge it
    passes about half the time. Not calibrated: a sampled value must be given as an Estimate."""

    def trial(seed: int) -> bool:
        x = 0.2 + np.random.default_rng([seed, 4]).normal(size=n)
        return _claims(seed).close_to("mean", float(np.mean(x)), 0.0, atol=0.2).passed

    return Rule("close_to on a bare sample mean (no interval)", 0.025, str(n), "N(0.2, 1): mean on the edge of 0 ± 0.2",
                trial)


def auroc_at_least(n: int, method: str = "BCa", threshold: float = 0.9, n_resamples: int = 400) -> Rule:
    """``claim.at_least(auroc_ci(pos, neg), t)``, pos ~ N(d, 1), neg ~ N(0, 1), AUROC = Phi(d/sqrt 2) = t."""
    from scipy.stats import norm

    d = math.sqrt(2) * norm.ppf(threshold)

    def trial(seed: int) -> bool:
        g = np.random.default_rng([seed, 5])
        est = auroc_ci(d + g.normal(size=n), g.normal(size=n), method=method, n_resamples=n_resamples, seed=seed)
        return _claims(seed).at_least("auroc", est, threshold).passed

    return Rule(f"at_least on auroc_ci ({method}, lower bound)", 0.025, f"{n} + {n}",
                f"N(d, 1) vs N(0, 1), AUROC {threshold} = threshold", trial)


def spearman_at_least(n: int, method: str, threshold: float = 0.8, n_resamples: int = 2000) -> Rule:
    """``claim.at_least(claim.sample((x, y), spearman, paired=True), t)`` on a bivariate normal with
    Spearman's rho exactly t (Pearson r = 2 sin(pi t / 6))."""
    r = 2 * math.sin(math.pi * threshold / 6)

    def trial(seed: int) -> bool:
        g = np.random.default_rng([seed, 6])
        x = g.normal(size=n)
        y = r * x + math.sqrt(1 - r * r) * g.normal(size=n)
        c = _claims(seed)
        est = c.sample((x, y), spearman, paired=True, method=method, n_resamples=n_resamples)
        return c.at_least("rho", est, threshold).passed

    return Rule(f"at_least on claim.sample spearman ({method}, lower bound; {n_resamples} resamples asked)", 0.025,
                str(n),
                f"bivariate normal, Spearman rho {threshold} = threshold", trial)


def scrub_losses(seed: int, n: int, draws: int, recovered: float) -> tuple[np.ndarray, np.ndarray]:
    """Simulated scrubbing losses [draws, n] (scrubbed, baseline) with population fraction recovered
    ``1 - E[scrubbed] / E[baseline]`` equal to ``recovered``: each example has its own mean losses
    (the data set's sampling), each draw multiplies them by independent noise (the resampling)."""
    g = np.random.default_rng([seed, 7])
    base = g.gamma(2.0, 0.35, size=n)  # per-example mean baseline loss, E = 0.7
    scrubbed = (1 - recovered) * base * g.gamma(4.0, 0.25, size=n)  # E = (1 - recovered) * 0.7
    return scrubbed * g.gamma(2.0, 0.5, size=(draws, n)), base * g.gamma(2.0, 0.5, size=(draws, n))


def scrub_at_least(n: int, draws: int, threshold: float = 0.85) -> Rule:
    """``scrub.scrub_claim`` on a ``ScrubResult`` from simulated losses whose population fraction
    recovered is exactly the threshold."""
    def trial(seed: int) -> bool:
        from circuits.analysis.scrub import scrub_claim, scrub_result  # torch: only when this rule runs

        s, b = scrub_losses(seed, n, draws, threshold)
        result = scrub_result("sim", 0.05, s, b, seed=seed)
        return scrub_claim(_claims(seed), "sim", result, threshold).passed

    return Rule("scrub_claim: fraction recovered (lower bound)", 0.025, f"{n} examples x {draws} draws",
                f"simulated per-example losses, recovered {threshold} = threshold", trial)


def scrub_on_losses(name: str, scrubbed: np.ndarray, baseline: np.ndarray, n: int, draws: int) -> Rule:
    """``scrub.scrub_claim`` on losses measured on a real model, taken as the population: ``scrubbed``
    and ``baseline`` [population draws, population examples]. Each trial draws ``n`` examples (with
    replacement) and ``draws`` of the population's draws, and claims the population's own fraction
    recovered ``1 - mean(scrubbed) / mean(baseline)`` as its threshold."""
    threshold = float(1 - scrubbed.mean() / baseline.mean())

    def trial(seed: int) -> bool:
        from circuits.analysis.scrub import scrub_claim, scrub_result

        g = np.random.default_rng([seed, 8])
        rows = g.choice(scrubbed.shape[0], draws, replace=False)
        cols = g.integers(0, scrubbed.shape[1], n)
        result = scrub_result("model", 0.0, scrubbed[np.ix_(rows, cols)], baseline[np.ix_(rows, cols)], seed=seed)
        return scrub_claim(_claims(seed), "model", result, threshold).passed

    return Rule("scrub_claim: fraction recovered (lower bound)", 0.025, f"{n} examples x {draws} draws",
                f"{name}: recovered {threshold:.4f} = threshold", trial)


def rules(scale: int = 1) -> list[Rule]:
    """The rules of the README's table (``scale`` > 1 adds larger samples)."""
    out = [
        mean_at_least(20, "BCa"), mean_at_least(20, "BCa", "skewed"), mean_at_most(30, "percentile"),
        mean_at_least(50, "BCa", "skewed"), mean_at_most(100, "percentile"),
        close_to_interval(30), auroc_at_least(50, "BCa"), auroc_at_least(50, "percentile"),
        spearman_at_least(60, "BCa"), spearman_at_least(60, "BCa", n_resamples=400),  # 2000 drawn: BCA_MIN_RESAMPLES
        spearman_at_least(60, "percentile"), scrub_at_least(500, 5),
    ]
    if scale > 1:
        out += [mean_at_least(200, "BCa"), mean_at_most(300, "percentile"), auroc_at_least(300, "BCa"),
                spearman_at_least(200, "percentile", n_resamples=400), scrub_at_least(2000, 5)]
    return out

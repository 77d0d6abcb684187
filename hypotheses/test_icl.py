"""Hypothesis (seed 003): a GPT-2-style model with a linear read-in, shown per test point the
predictions of two ridge regressors (lambda = 0.1 and 0.8) and the true y, chooses in context which
predictor to trust for the last, hidden y.

* Performance: its test MSE is below that of each fixed ridge predictor (the 95% CI of the paired
  difference lies below 0), within 10% of the oracle that picks the better predictor per sequence
  by looking at the answer, and above the noise floor mean((0.8 a)^2) (no leak of the target).
* Mechanism: the running difference of the two predictors' squared errors over the context is
  linearly decodable from the residual stream at the last position (held-out r^2 of a linear
  probe; controls: the same probe on an untrained model, and on shuffled targets).
* The seed's attention clustering, as a tool and a claim: the last position's attention rows of
  each head, clustered by KMeans with k chosen by silhouette, are explained by the inputs: a linear
  classifier on the inputs predicts the cluster better (cross-validated) than on shuffled inputs.
  A stronger reading, that such input-explained clusters are a product of training, is refuted: an
  untrained model's near-uniform attention clusters just as predictably (kept as a strict xfail).
* Found on the way (not in the issue): much of the model's gain over the ridges is not selection.
  Its departure from ridge lambda=0.1 tracks the mean residual of that ridge over the context: the
  ridges' fitted intercept errs by an amount shared by all 21 test points, which the context reveals.

The reference checkpoint is trained for ~2 minutes on one CPU thread (4,000 steps of 64 sequences);
the seed project's published numbers come from a long GPU run with alphas (0.1, 0.5), so they are
quoted in notes for scale, never as thresholds. Thresholds sit below what the reference shows, with
room for retrained seeds, and above what every control reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from circuits import analysis as A
from circuits.controls import register_control
from circuits.interventions import reinitialize
from circuits.stats import pearson
from circuits.tasks import icl

N_EVAL = 20_000  # held-out sequences for the performance claims (fresh seed, not a training seed)
EVAL_SEED = 3_003_003
N_PROBE = 20_000  # sequences for the probes (half fit the probe, half score it)
N_CLUSTER = 1_000  # sequences whose last-position attention rows are clustered
ORACLE_MARGIN = 0.10  # mse(model) <= (1 + margin) * mse(oracle)
PROBE_R2_MIN = 0.15  # held-out r^2 of the running-error-difference probe (CI lower bound)
WINSOR = (1.0, 99.0)  # percentiles the probe's target is clipped to (its kurtosis is ~40: see the test)
CLUSTER_GAIN_MIN = 0.08  # cv accuracy on the inputs minus on shuffled inputs (CI lower bound)
UNTRAINED_GAIN_MAX = 0.05  # the refuted reading: an untrained model's clusters would stay below this
RESAMPLES = 1000


@pytest.fixture(scope="module")
def icl_eval() -> icl.ICLData:
    return icl.generate(N_EVAL, EVAL_SEED)


# --- what the claims are computed on ------------------------------------------------------------------
@dataclass
class Predictions:
    """A predictor's outputs on the evaluation set, next to the targets they are scored against."""

    values: torch.Tensor  # [n] float64
    targets: torch.Tensor  # [n] float64

    def sq_errors(self) -> np.ndarray:
        return ((self.values - self.targets) ** 2).numpy()


def _leak_target(p: Predictions, seed: int = 0) -> Predictions:
    return Predictions(p.targets.clone(), p.targets)


register_control("leak_target", kind="data", fn=_leak_target, replace=True,
                 accepts=lambda obj: isinstance(obj, Predictions),
                 description="predictions replaced by the targets themselves (a predictor that sees the answer)")


@dataclass
class ProbeData:
    features: torch.Tensor  # [n, d_model] residual stream at the last position
    targets: torch.Tensor  # [n] running error difference (permuted by shuffle_labels)


@dataclass
class ClusterData:
    features: np.ndarray  # [n, N * 3] the inputs of each sequence, flattened
    labels: np.ndarray  # [n] cluster of the sequence's last-position attention row (shuffle_labels permutes)


_MEMO = A.ModelMemo()  # per model function (the untrained control rebuilds the same model each time)


def last_position_run(model, data: icl.ICLData) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [n], last-position residuals [n_layers + 1, n, d_model]) of one run over `data`."""
    def compute():
        resid, out = icl.last_position_residuals(model, data.inputs, with_outputs=True)
        return out[:, 0].double(), resid

    return _MEMO.get(model, ("last_position_run", id(data)), compute)


def predictions(model, data: icl.ICLData) -> Predictions:
    return Predictions(last_position_run(model, data)[0], data.ys[:, -1])


def _gain(real, shuffled, axis=-1):
    return np.mean(real, axis=axis) - np.mean(shuffled, axis=axis)


def _ratio_minus_one(a, b, axis=-1):
    return np.mean(a, axis=axis) / np.mean(b, axis=axis) - 1.0


@dataclass
class HeadClusters:
    label: str
    rows: np.ndarray  # [n, key_pos] attention of the last position
    mean_pattern: np.ndarray  # [query_pos, key_pos] mean attention pattern
    clusters: np.ndarray  # [n]
    k: int
    silhouette: float
    correct: np.ndarray  # [n] cross-validated classifier on the inputs right?
    correct_shuffled: np.ndarray  # [n] the same on row-shuffled inputs
    majority: float

    @property
    def gain(self) -> float:
        return float(self.correct.mean() - self.correct_shuffled.mean())

    def describe(self) -> str:
        return (f"{self.label}: k={self.k} silhouette={self.silhouette:.2f} cv acc {self.correct.mean():.3f} "
                f"vs shuffled inputs {self.correct_shuffled.mean():.3f} (majority {self.majority:.3f})")


def _flat_inputs(data: icl.ICLData) -> np.ndarray:
    return data.inputs.reshape(len(data), -1).double().numpy()  # [n, N * 3]


def _shuffle_rows(x: np.ndarray) -> np.ndarray:
    return x[np.random.default_rng(0).permutation(len(x))]


def head_clusters(model, data: icl.ICLData) -> list[HeadClusters]:
    """The seed's attention clustering for every head, on the last position's attention rows."""
    return _MEMO.get(model, ("head_clusters", id(data)), lambda: _head_clusters(model, data))


def _head_clusters(model, data: icl.ICLData) -> list[HeadClusters]:
    sub = data.subset(slice(0, N_CLUSTER))
    features = _flat_inputs(sub)
    shuffled = _shuffle_rows(features)
    cache = A.run_in_batches(model, sub.inputs, names=lambda n: n.endswith("attn.hook_pattern"))
    out = []
    for l in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"]  # [n, head, query, key]
        for h in range(model.cfg.n_heads):
            rows = pattern[:, h, -1].double().numpy()
            labels, k, scores = icl.cluster_rows(rows)
            correct, majority = icl.cluster_probe(features, labels)
            correct_shuffled, _ = icl.cluster_probe(shuffled, labels)
            out.append(HeadClusters(A.head_label(l, h), rows, pattern[:, h].mean(0).numpy(), labels, k,
                                    scores[k], correct, correct_shuffled, majority))
    return out


# --- claims ------------------------------------------------------------------------------------------------
@pytest.mark.controls("untrained")
def test_beats_both_fixed_ridges_and_nears_the_oracle(icl_model, icl_eval, claim, control, figures):
    err = predictions(icl_model, icl_eval).sq_errors()
    ridge = icl_eval.ridge_sq_errors().numpy()
    oracle = icl_eval.oracle_sq_errors().numpy()
    for j, lam in enumerate(icl_eval.lambdas):
        diff = claim.sample(err - ridge[:, j], np.mean, n_resamples=RESAMPLES)
        claim.at_most(f"mse(model) - mse(ridge lambda={lam})", diff, 0.0,
                      note=f"model {err.mean():.4f}, ridge {ridge[:, j].mean():.4f} (published for alphas "
                           f"(0.1, 0.5): transformer {icl.PUBLISHED['transformer']}, ridges {icl.PUBLISHED['ridge']})")
    ratio = claim.sample((err, oracle), _ratio_minus_one, paired=True, n_resamples=RESAMPLES)
    claim.at_most("mse(model) / mse(oracle) - 1", ratio, ORACLE_MARGIN,
                  note=f"oracle {oracle.mean():.4f}; in-context selector {icl_eval.selector_sq_errors().mean():.4f}; "
                       f"published ratio {icl.PUBLISHED['transformer'] / icl.PUBLISHED['oracle'] - 1:.3f}; "
                       + _by_alpha(predictions(icl_model, icl_eval), icl_eval))
    if control.is_main:
        figures.add("mse vs context length", lambda: _mse_vs_context(icl_model, icl_eval),
                    caption="MSE on the hidden y when the model sees only the last c context tokens (the rest "
                            "masked from attention; 1,000 sequences); the ridges and the oracle do not use the context")


@pytest.mark.controls("leak_target")
def test_mse_is_above_the_noise_floor(icl_model, icl_eval, claim, control):
    p = control.apply_data(predictions(icl_model, icl_eval))
    floor = icl_eval.noise_floor()
    excess = claim.sample(p.sq_errors() - floor, np.mean, n_resamples=RESAMPLES)
    claim.at_least("mse(model) - noise floor mean((0.8 a)^2)", excess, 0.0, note=f"noise floor {floor:.4f}")


@pytest.mark.controls("untrained", "shuffle_labels")
def test_running_error_difference_is_linearly_decodable(icl_model, icl_eval, claim, control, figures):
    """The target, sum over the 20 context tokens of (squared error of ridge 0.1 - of ridge 0.8), is
    heavy-tailed (kurtosis ~40 on the evaluation set), so a plain r^2 is decided by the top 1% of
    rows; the claim probes it clipped to its 1st-99th percentiles (still the same linear quantity),
    and the note gives the unclipped r^2 by depth too."""
    sub = icl_eval.subset(slice(0, N_PROBE))
    resid = last_position_run(icl_model, icl_eval)[1][:, :N_PROBE]  # [layer + 1, n, d_model]
    raw = sub.running_error_difference().numpy()
    target = torch.from_numpy(np.clip(raw, *np.percentile(raw, WINSOR)))
    per_layer = [icl.probe_r2(resid[l], target) for l in range(resid.shape[0])]
    per_layer_raw = [icl.probe_r2(resid[l], raw) for l in range(resid.shape[0])]
    data = control.apply_data(ProbeData(resid[-1], target))
    pred, y = icl.probe_heldout(data.features, data.targets)
    estimate = claim.sample((pred, y), icl.r2, paired=True, method="percentile", n_resamples=RESAMPLES)
    claim.at_least("probe r2(running error difference | final residual, last position)", estimate, PROBE_R2_MIN,
                   note="held-out r^2 by depth (resid_pre 0, 1, 2, final): clipped target "
                        + ", ".join(f"{v:.3f}" for v in per_layer) + "; unclipped "
                        + ", ".join(f"{v:.3f}" for v in per_layer_raw))
    if control.is_main:
        figures.add("probe", lambda: _probe_figure(per_layer, pred, y),
                    caption="linear probe for the summed squared-error difference (lambda 0.1 minus lambda 0.8) "
                            "over the context (clipped to its 1st-99th percentiles), from the last position's "
                            "residual stream")


@dataclass
class CorrectionPairs:
    values: np.ndarray  # [n] the model's output minus ridge lambda=0.1's prediction
    labels: np.ndarray  # [n] mean residual of ridge lambda=0.1 over the context (permuted by shuffle_labels)


@pytest.mark.controls("untrained", "shuffle_labels")
def test_model_corrects_the_ridges_offset_from_the_context(icl_model, icl_eval, claim, control):
    """Found while checking the selection story, not asked by the issue: where the model departs from
    ridge lambda=0.1 tracks the mean residual of that ridge over the 20 context points. The ridges fit
    an intercept from 21 noisy points (as sklearn does), and that intercept's error is shared by every
    test point of the sequence, so the context's mean residual reveals it; a shrunk correction
    (predict yhat + 0.5 * mean residual) alone beats both ridges (see the note)."""
    p = predictions(icl_model, icl_eval)
    y1 = icl_eval.preds[:, :, 0]
    correction = (p.values - y1[:, -1]).numpy()
    offset = (icl_eval.ys[:, :-1] - y1[:, :-1]).mean(1).numpy()
    pairs = control.apply_data(CorrectionPairs(correction, offset))
    estimate = claim.sample((pairs.values, pairs.labels), pearson, paired=True, n_resamples=RESAMPLES)
    half = ((y1[:, -1] + 0.5 * torch.from_numpy(offset) - icl_eval.ys[:, -1]) ** 2).mean()
    claim.at_least("pearson(model - ridge 0.1, mean context residual of ridge 0.1)", estimate, 0.5,
                   note=f"mse of ridge 0.1 + 0.5 * mean context residual: {float(half):.4f}; model "
                        f"{p.sq_errors().mean():.4f}; " + _by_alpha(p, icl_eval))


def _by_alpha(p: Predictions, data: icl.ICLData) -> str:
    err, ridge = p.sq_errors(), data.ridge_sq_errors().numpy()
    parts = []
    for a in data.lambdas:
        rows = (data.alphas == a).numpy()
        parts.append(f"a={a}: model {err[rows].mean():.4f}, ridges "
                     + "/".join(f"{v:.4f}" for v in ridge[rows].mean(0)))
    return "; ".join(parts)


def _bind_cluster_head(model, data) -> HeadClusters:
    """Role by search: the head whose clusters the inputs explain best, on the uncontrolled model."""
    return max(head_clusters(model, data), key=lambda c: c.gain)


@pytest.mark.controls("shuffle_labels")
def test_attention_clusters_are_explained_by_the_inputs(icl_model, icl_eval, claim, control, figures):
    heads = head_clusters(icl_model, icl_eval)
    best = _bind_cluster_head(icl_model, icl_eval)
    sub = icl_eval.subset(slice(0, N_CLUSTER))
    data = control.apply_data(ClusterData(_flat_inputs(sub), best.clusters))
    correct, _ = icl.cluster_probe(data.features, data.labels)
    correct_shuffled, _ = icl.cluster_probe(_shuffle_rows(data.features), data.labels)
    gain = claim.sample((correct, correct_shuffled), _gain, paired=True, n_resamples=RESAMPLES)
    claim.at_least("bound head: cv accuracy(inputs) - cv accuracy(shuffled inputs)", gain, CLUSTER_GAIN_MIN,
                   note=f"bound head {best.label}; all heads: " + "; ".join(c.describe() for c in heads))
    if control.is_main:
        figures.add("attention clusters", lambda: _cluster_figure(heads, sub),
                    caption="per head: mean attention pattern, and the last position's attention rows sorted by "
                            "KMeans cluster (k by silhouette; white lines separate clusters)")


@pytest.mark.xfail(strict=True, reason="refuted: an untrained model's (near-uniform) last-position attention "
                   "rows also fall into clusters a linear classifier on the inputs predicts far better than "
                   "on shuffled inputs, so input-explained clusters alone are no sign of a learned mechanism")
def test_input_explained_clusters_are_a_product_of_training(icl_model, icl_eval, claim):
    untrained = reinitialize(icl_model, seed=0)
    best = max(head_clusters(untrained, icl_eval), key=lambda c: c.gain)
    gain = claim.sample((best.correct, best.correct_shuffled), _gain, paired=True, n_resamples=RESAMPLES)
    claim.at_most("untrained, best head: cv accuracy(inputs) - cv accuracy(shuffled inputs)", gain,
                  UNTRAINED_GAIN_MAX, note=f"untrained best head {best.label}")


# --- figures -----------------------------------------------------------------------------------------------
def _mse_vs_context(model, data: icl.ICLData, n: int = 1000):
    sub = data.subset(slice(0, n))
    contexts = [0, 1, 2, 3, 4, 6, 8, 12, 16, 20]
    target = sub.ys[:, -1]
    model_mse = [float(((icl.predict_with_context(model, sub.inputs, c).double() - target) ** 2).mean())
                 for c in contexts]
    selector = [float(sub.selector_sq_errors(c).mean()) for c in contexts]
    ridge = sub.ridge_sq_errors().mean(0)
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(contexts, model_mse, "o-", color="tab:purple", label="model", ms=3)
    ax.plot(contexts, selector, "--", color="tab:gray", label="in-context selector (smaller summed error)")
    for j, (lam, colour) in enumerate(zip(sub.lambdas, ("tab:blue", "tab:orange"))):
        ax.axhline(float(ridge[j]), color=colour, lw=1.2, label=f"ridge lambda={lam}")
    ax.axhline(float(sub.oracle_sq_errors().mean()), color="tab:green", lw=1.2, label="oracle (best of two on the target)")
    ax.axhline(sub.noise_floor(), color="black", lw=0.8, ls=":", label="noise floor")
    ax.set_xlabel("visible context tokens")
    ax.set_ylabel("MSE on the hidden y")
    top = max(float(ridge.max()), *model_mse[len(contexts) // 4:]) * 1.08
    ax.set_ylim(sub.noise_floor() * 0.9, top)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _probe_figure(per_layer, pred, y):
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    a.bar(range(len(per_layer)), per_layer, color="tab:purple")
    a.set_xticks(range(len(per_layer)), [f"resid_pre {l}" for l in range(len(per_layer) - 1)] + ["final"], fontsize=8)
    a.set_ylabel("held-out r^2")
    b.scatter(y, pred, s=3, alpha=0.3)
    lim = np.percentile(np.abs(y), 99)
    b.plot([-lim, lim], [-lim, lim], color="black", lw=0.8)
    b.set_xlim(-lim, lim)
    b.set_ylim(-lim, lim)
    b.set_xlabel("summed error difference over the context")
    b.set_ylabel("probe prediction (final residual)")
    fig.tight_layout()
    return fig


def _cluster_figure(heads: list[HeadClusters], sub: icl.ICLData):
    fig, axes = plt.subplots(2, len(heads), figsize=(2.3 * len(heads), 5.2))
    for j, c in enumerate(heads):
        n = c.rows.shape[1]
        order = np.argsort(c.clusters, kind="stable")
        ax = axes[0, j]
        ax.set_title(c.label, fontsize=9)
        ax.imshow(c.mean_pattern, cmap="viridis", aspect="auto")
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
        ax = axes[1, j]
        ax.imshow(c.rows[order], cmap="magma", aspect="auto", interpolation="nearest")
        for boundary in np.flatnonzero(np.diff(c.clusters[order])):
            ax.axhline(boundary + 0.5, color="white", lw=0.8)
        ax.set_title(f"k={c.k}, sil {c.silhouette:.2f}\nacc {c.correct.mean():.2f} vs {c.correct_shuffled.mean():.2f}",
                     fontsize=7)
        ax.set_xlabel("key (last query)", fontsize=7)
        ax.set_xticks([0, n - 1])
        ax.set_yticks([])
        for a in axes[:, j]:
            a.tick_params(labelsize=6)
    fig.tight_layout()
    return fig


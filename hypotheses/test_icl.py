"""Hypothesis (seed 003): a GPT-2-style model with a linear read-in, shown per test point the
predictions of two ridge regressors (lambda = 0.1 and 0.8) and the true y, chooses in context which
predictor to trust for the last, hidden y.

* Performance (about the whole model): its test MSE is below that of each fixed ridge predictor
  (the 95% CI of the paired difference lies below 0) and within 10% of the oracle that picks the
  better predictor per sequence by looking at the answer; it removes a share in (0, 1) of the better
  fixed ridge's excess over the noise floor mean((0.8 a)^2) (above 0: it beats the ridge; below 1: no
  leak of the target). Targeted control: ``foreign_context`` (every sequence shown another
  sequence's context, so nothing it infers in context fits its own query).
* Mechanism (about the read-in): the running difference of the two predictors' squared errors over
  the context is linearly decodable from the last position's final residual BETTER than from the
  same network with a fresh random read-in (3 seeds) or an untrained network: the claim is the
  held-out r^2 minus the best of those four comparators, CI lower bound above 0. Mutation
  ``randomise_read_in``; targeted control ``hide_context_answers`` (the read-in's y column zeroed).
* Found on the way: the model's departure from ridge lambda=0.1 tracks that ridge's mean residual
  over the context (its intercept's error is shared by all 21 test points, which the context reveals).
* The seed's attention clustering: the last position's attention rows of a head, clustered by KMeans
  (k by silhouette), predicted from the inputs by a linear classifier better than from shuffled
  inputs. Claimed as a product of training: the bound head's gain must exceed that of the same head
  in an untrained model and with a randomised read-in. REFUTED (a known failure): untrained heads
  cluster at least as predictably.

Binding (cluster head): the ``cluster_binding`` fixture runs once per session on the UNMUTATED model,
on a search split (sequences 0..999 of a fresh cluster seed), scanning the 6 heads for the largest
gain over the comparators; the test scores that head on the disjoint held-out split (1000..1999) with
a Bonferroni-corrected CI (level 1 - 0.05/6). ``head_roles`` exposes it as ``cluster_head``, so the
``qk:cluster_head`` mutations (uniform_attention, swap_head) hit the bound head.

Comparator seeds are never the mutations' own (the mutations use seed 0), so a mutant never ties with
its own comparator. Every random choice a claim makes (probe split, KMeans/CV seeds, shuffled rows,
bootstrap) comes from the ``draws`` fixture (the binding: from --circuits-draws-seed via ``circuits_options.shared_draws``).

Mutations tried by hand (reference checkpoint; MSE on the 20k evaluation set, probe on its first 10k,
point values): randomise_read_in: MSE - ridge 0.1 +4.79, share -54, offset pearson 0.02, probe gain
-0.093 (all red). permute_positions (all 21): MSE - ridge +0.705, share -8.0, pearson 0.09 (red);
probe gain +0.018 (r^2 0.137 vs best comparator 0.119: the read-in claim does not name positions).
zero_ablate:L2H0: MSE - ridge 0.1 +0.004, oracle ratio 0.123 > 0.10, pearson 0.36 (red; "beats
ridge 0.8" still holds, -0.006). zero_ablate / mean_ablate:L0H1 (the bound cluster head): MSE,
share and pearson unchanged (0.124, 0.70) and probe gain +0.046/+0.049: the model's output does not
use the cluster head, consistent with the refuted cluster reading. swap_head:L0H0: identical
function, every value unchanged (as it must be: no claim here names an L0 head by index).
foreign_context: MSE - ridges +0.013/+0.002, oracle ratio 0.156, share -0.145, pearson -0.006 (red).
hide_context_answers: probe gain -0.17 (red). Untrained: MSE - ridge +4.87, share -55, pearson 0.03.
Cluster claim (known failure): held-out gain of L0H1 over the comparators -0.077 [-0.129, -0.020]
(model 0.41, untrained 0.46, random read-in 0.19-0.23); over --circuits-draws-seed 0..4, -0.065 .. -0.082.

The reference checkpoint is trained for ~2 minutes on one CPU thread (4,000 steps of 64 sequences);
the seed project's published numbers come from a long GPU run with alphas (0.1, 0.5), so they are
quoted in notes for scale, never as thresholds.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from circuits.analysis import measures as A
from circuits.analysis.interventions import randomise_read_in, reinitialize
from circuits.claims.controls import register_control
from circuits.claims.stats import pearson
from circuits.tasks import icl

N_EVAL = 20_000  # held-out sequences for the performance claims (fresh seed, not a training seed)
EVAL_SEED = 3_003_003
N_PROBE = 10_000  # sequences for the probes (half fit the probe, half score it)
N_CLUSTER = 1_000  # sequences per cluster split (search, then held-out)
CLUSTER_SEED = 3_003_004  # the cluster splits' own sequences
ORACLE_MARGIN = 0.10  # mse(model) <= (1 + margin) * mse(oracle)
WINSOR = (1.0, 99.0)  # percentiles the probe's target is clipped to (its kurtosis is ~40: see the test)
RESAMPLES = 1000
N_HEADS_SCANNED = 6  # 3 layers x 2 heads: the cluster binding's candidates
BINDING_LEVEL = 1 - 0.05 / N_HEADS_SCANNED  # Bonferroni over the heads scanned
# What an untrained network and a random read-in give, for the probe and cluster claims. Seeds differ
# from the mutations' (seed 0) so a mutant is never compared with itself.
COMPARATORS = (("untrained (seed 1)", lambda m: reinitialize(m, seed=1)),
               *((f"random read-in (seed {s})", lambda m, s=s: randomise_read_in(m, seed=s)) for s in (1, 2, 3)))
CLUSTER_COMPARATORS = COMPARATORS[:2]  # clustering is ~20x a probe's cost: one of each kind

KNOWN_FAILURES = {
    "test_attention_clusters_are_a_product_of_training": (
        "refuted: the hypothesis reads the seed's input-explained attention clusters as a learned mechanism, so the "
        "bound head's gain (held-out, Bonferroni over 6 heads) should exceed the same head's in an untrained network "
        "and with a random read-in; untrained heads cluster at least as predictably (near-uniform rows)"),
}


@pytest.fixture(scope="module")
def icl_eval() -> icl.ICLData:
    return icl.generate(N_EVAL, EVAL_SEED)


def _data_key(data: icl.ICLData) -> str:
    """Memo key of a data set by content (an id() could be reused once a control's copy is freed)."""
    return hashlib.sha1(data.inputs.numpy().tobytes()).hexdigest()


# --- controls written for this hypothesis ------------------------------------------------------------
@dataclass
class Predictions:
    """A predictor's outputs on the evaluation set, next to the targets they are scored against."""

    values: torch.Tensor  # [n] float64
    targets: torch.Tensor  # [n] float64

    def sq_errors(self) -> np.ndarray:
        return ((self.values - self.targets) ** 2).numpy()


def _leak_target(p: Predictions, seed: int = 0) -> Predictions:
    return Predictions(p.targets.clone(), p.targets)


register_control("leak_target", kind="data", fn=_leak_target,
                 accepts=lambda obj: isinstance(obj, Predictions),
                 description="predictions replaced by the targets themselves (a predictor that sees the answer)")
register_control("foreign_context", kind="data", fn=lambda d, seed=0: d.with_foreign_context(1),
                 accepts=lambda obj: isinstance(obj, icl.ICLData),
                 description="every sequence shown the context tokens of the next sequence (its own query kept)")


def hide_context_answers(model, seed: int = 0):
    """The read-in's y column zeroed: every y reads as 0, so no context answer reaches the model."""
    new = copy.deepcopy(model)
    with torch.no_grad():
        new.embed.W_in[-1].zero_()
    return new


register_control("hide_context_answers", kind="model", fn=hide_context_answers,
                 description="the read-in's y column zeroed (the model cannot see any context answer)")


# --- what the claims are computed on ------------------------------------------------------------------
_MEMO = A.ModelMemo()  # per model function (the untrained control rebuilds the same model each time)


def last_position_run(model, data: icl.ICLData) -> tuple[torch.Tensor, torch.Tensor]:
    """(outputs [n], last-position residuals [n_layers + 1, n, d_model]) of one run over `data`."""
    def compute():
        resid, out = icl.last_position_residuals(model, data.inputs, with_outputs=True)
        return out[:, 0].double(), resid

    return _MEMO.get(model, ("last_position_run", _data_key(data)), compute)


def predictions(model, data: icl.ICLData) -> Predictions:
    return Predictions(last_position_run(model, data)[0], data.ys[:, -1])


def _ratio_minus_one(a, b, axis=-1):
    return np.mean(a, axis=axis) / np.mean(b, axis=axis) - 1.0


def _share_of_excess(model_err, ridge1_err, ridge2_err, floor, axis=-1):
    """(better fixed ridge's mse - model's) / (better fixed ridge's mse - noise floor)."""
    best = np.minimum(np.mean(ridge1_err, axis=axis), np.mean(ridge2_err, axis=axis))
    return (best - np.mean(model_err, axis=axis)) / (best - np.mean(floor, axis=axis))


def _r2_over_comparators(*arrays, axis=-1):
    """r^2 of the first predictions minus the best r^2 of the others; the targets come last."""
    *preds, y = arrays
    scores = [icl.r2(p, y, axis=axis) for p in preds]
    return scores[0] - np.max(np.stack(scores[1:]), axis=0)


def _gain_over_comparators(*arrays, axis=-1):
    """(accuracy on inputs - on shuffled inputs) of the first pair minus the best of the other pairs."""
    gains = [np.mean(arrays[i], axis=axis) - np.mean(arrays[i + 1], axis=axis) for i in range(0, len(arrays), 2)]
    return gains[0] - np.max(np.stack(gains[1:]), axis=0)


# --- performance: about the whole model ---------------------------------------------------------------------
@pytest.mark.about("model")
@pytest.mark.controls("foreign_context")
def test_beats_both_fixed_ridges_and_nears_the_oracle(icl_model, icl_eval, claim, control, figures):
    data = control.apply_data(icl_eval)
    err = predictions(icl_model, data).sq_errors()
    ridge = data.ridge_sq_errors().numpy()
    oracle = data.oracle_sq_errors().numpy()
    for j, lam in enumerate(data.lambdas):
        diff = claim.sample(err - ridge[:, j], np.mean, n_resamples=RESAMPLES)
        claim.at_most(f"mse(model) - mse(ridge lambda={lam})", diff, 0.0,
                      note=f"model {err.mean():.4f}, ridge {ridge[:, j].mean():.4f} (published for alphas "
                           f"(0.1, 0.5): transformer {icl.PUBLISHED['transformer']}, ridges {icl.PUBLISHED['ridge']})")
    ratio = claim.sample((err, oracle), _ratio_minus_one, paired=True, n_resamples=RESAMPLES)
    claim.at_most("mse(model) / mse(oracle) - 1", ratio, ORACLE_MARGIN,
                  note=f"oracle {oracle.mean():.4f}; in-context selector {data.selector_sq_errors().mean():.4f}; "
                       f"published ratio {icl.PUBLISHED['transformer'] / icl.PUBLISHED['oracle'] - 1:.3f}; "
                       + _by_alpha(predictions(icl_model, data), data))
    if control.is_main:
        figures.add("mse vs context length", lambda: _mse_vs_context(icl_model, icl_eval),
                    caption="MSE on the hidden y when the model sees only the last c context tokens (the rest "
                            "masked from attention; 1,000 sequences); the ridges and the oracle do not use the context")


@pytest.mark.about("model")
@pytest.mark.controls("leak_target", "foreign_context")
def test_removes_part_of_the_ridges_excess_over_the_noise_floor(icl_model, icl_eval, claim, control):
    """Above 0: the model beats the better fixed ridge; below 1: it does not beat the noise floor
    mean((0.8 a)^2), which only a leak of the target could (the model never sees x)."""
    data = control.apply_data(icl_eval)
    p = control.apply_data(predictions(icl_model, data))
    ridge = data.ridge_sq_errors().numpy()
    floor = ((data.noise_scale * data.alphas) ** 2).numpy()
    share = claim.sample((p.sq_errors(), ridge[:, 0], ridge[:, 1], floor), _share_of_excess, paired=True,
                         method="percentile", n_resamples=RESAMPLES)
    claim.between("share of the better ridge's excess mse over the noise floor that the model removes", share,
                  0.0, 1.0, note=f"model {p.sq_errors().mean():.4f}, ridges " + "/".join(f"{v:.4f}" for v in ridge.mean(0))
                  + f", noise floor {floor.mean():.4f}")


@pytest.mark.about("model")
@pytest.mark.controls("foreign_context", "shuffle_labels")
def test_model_corrects_the_ridges_offset_from_the_context(icl_model, icl_eval, claim, control):
    """Found while checking the selection story, not asked by the issue: where the model departs from
    ridge lambda=0.1 tracks the mean residual of that ridge over the 20 context points. The ridges fit
    an intercept from 21 noisy points (as sklearn does), and that intercept's error is shared by every
    test point of the sequence, so the context's mean residual reveals it; a shrunk correction
    (predict yhat + 0.5 * mean residual) alone beats both ridges (see the note). Threshold 0.5: the
    correction must explain most of the departure's spread (r >= 0.5, r^2 >= 0.25)."""
    data = control.apply_data(icl_eval)
    p = predictions(icl_model, data)
    y1 = data.preds[:, :, 0]
    correction = (p.values - y1[:, -1]).numpy()
    offset = (data.ys[:, :-1] - y1[:, :-1]).mean(1).numpy()  # the sequence's own context, which foreign_context hides
    labels = control.apply_labels(offset)  # shuffle_labels permutes them
    estimate = claim.sample((correction, labels), pearson, paired=True, n_resamples=RESAMPLES)
    half = ((y1[:, -1] + 0.5 * torch.from_numpy(offset) - data.ys[:, -1]) ** 2).mean()
    claim.at_least("pearson(model - ridge 0.1, mean context residual of ridge 0.1)", estimate, 0.5,
                   note=f"mse of ridge 0.1 + 0.5 * mean context residual: {float(half):.4f}; model "
                        f"{p.sq_errors().mean():.4f}; " + _by_alpha(p, data))


def _by_alpha(p: Predictions, data: icl.ICLData) -> str:
    err, ridge = p.sq_errors(), data.ridge_sq_errors().numpy()
    parts = []
    for a in data.lambdas:
        rows = (data.alphas == a).numpy()
        parts.append(f"a={a}: model {err[rows].mean():.4f}, ridges "
                     + "/".join(f"{v:.4f}" for v in ridge[rows].mean(0)))
    return "; ".join(parts)


# --- mechanism: about the read-in -------------------------------------------------------------------------
# The gain is already over the best wrong alternative (untrained / random read-ins, the same rows): a lower
# bound above 0 is "beats it, intervals separated". Positions are not a wrong alternative here: the running
# error difference is a sum over the context, which no order changes, and a position-permuted network keeps
# it (probe gain 0.076 with the mutation permute_positions against 0.073 trained; issue 30's +0.018 was
# another permutation); so `positions` is not what the claim is about.
MIN_PROBE_GAIN = 0.0


@pytest.mark.about("read_in")
@pytest.mark.controls("hide_context_answers", "shuffle_labels")
def test_running_error_difference_is_decodable_beyond_random_features(icl_model, icl_eval, claim, control,
                                                                      draws, figures):
    """The target, sum over the 20 context tokens of (squared error of ridge 0.1 - of ridge 0.8), is
    heavy-tailed (kurtosis ~40), so a plain r^2 is decided by the top 1% of rows; the claim probes it
    clipped to its 1st-99th percentiles (still the same linear quantity). A random read-in feeding the
    trained network, or an untrained network, already carries some of it (random features of the
    context): the claim is the r^2 beyond the best of those comparators, all probed on the same rows
    with the same held-out split, so the bootstrap is paired."""
    sub = icl_eval.subset(slice(0, N_PROBE))
    raw = sub.running_error_difference().numpy()
    clipped = torch.from_numpy(np.clip(raw, *np.percentile(raw, WINSOR)))
    resid = last_position_run(icl_model, sub)[1]  # [layer + 1, n, d_model]
    targets = control.apply_labels(clipped)  # shuffle_labels permutes them
    split = draws.child("probe split").int()
    pred, y = icl.probe_heldout(resid[-1], targets, seed=split)
    scores, preds = [float(icl.r2(pred, y))], [pred]
    for _, build in COMPARATORS:
        p_c, y_c = icl.probe_heldout(last_position_run(build(icl_model), sub)[1][-1], targets, seed=split)
        assert np.array_equal(y_c, y)  # the same held-out rows: the bootstrap below pairs them
        scores.append(float(icl.r2(p_c, y)))
        preds.append(p_c)
    gain = claim.sample((*preds, y), _r2_over_comparators, paired=True, method="percentile", n_resamples=RESAMPLES)
    per_layer = [icl.probe_r2(resid[l], targets, seed=split) for l in range(resid.shape[0])]
    claim.at_least("probe r2(running error difference | final residual) - best r2 of untrained / random read-ins",
                   gain, MIN_PROBE_GAIN,
                   note=f"held-out r^2 (n={len(y)} of {N_PROBE}): model {scores[0]:.3f}; "
                        + ", ".join(f"{name} {v:.3f}" for (name, _), v in zip(COMPARATORS, scores[1:]))
                        + "; model by depth (resid_pre 0, 1, 2, final) " + ", ".join(f"{v:.3f}" for v in per_layer))
    if control.is_main:
        figures.add("probe", lambda: _probe_figure(per_layer, pred, y),
                    caption="linear probe for the summed squared-error difference (lambda 0.1 minus lambda 0.8) "
                            "over the context (clipped to its 1st-99th percentiles), from the last position's "
                            "residual stream")


# --- the seed's attention clustering: about the bound head's attention ------------------------------------
@dataclass
class HeadClusters:
    label: str
    rows: np.ndarray  # [n, key_pos] attention of the last position
    clusters: np.ndarray  # [n]
    k: int
    correct: np.ndarray  # [n] cross-validated classifier on the inputs right?
    correct_shuffled: np.ndarray  # [n] the same on row-shuffled inputs

    @property
    def gain(self) -> float:
        return float(self.correct.mean() - self.correct_shuffled.mean())


def head_clusters(model, data: icl.ICLData, heads, seed: int) -> dict:
    """The seed's clustering of the last position's attention rows for the given heads {(l, h): HeadClusters}.
    A head whose rows do not split into >= 2 clusters of >= 5 rows (uniform attention) has no clusters
    to explain: gain 0."""
    def compute():
        rng = np.random.default_rng(seed)
        features = data.inputs.reshape(len(data), -1).double().numpy()  # [n, N * 3]
        shuffled = features[rng.permutation(len(features))]
        cache = A.run_in_batches(model, data.inputs, names=lambda n: n.endswith("attn.hook_pattern"))
        out = {}
        for l, h in heads:
            rows = cache[f"blocks.{l}.attn.hook_pattern"][:, h, -1].double().numpy()
            labels, k = np.zeros(len(rows), dtype=np.int64), 1
            if np.ptp(rows, axis=0).max() > 1e-6:
                labels, k, _ = icl.cluster_rows(rows, seed=seed % 2**31)
            counts = np.bincount(labels)
            if (counts > 0).sum() < 2 or counts[counts > 0].min() < 5:
                none = np.zeros(len(rows))
                out[(l, h)] = HeadClusters(A.head_label(l, h), rows, labels, k, none, none)
                continue
            correct, _ = icl.cluster_probe(features, labels, seed=seed % 2**31)
            correct_shuffled, _ = icl.cluster_probe(shuffled, labels, seed=seed % 2**31)
            out[(l, h)] = HeadClusters(A.head_label(l, h), rows, labels, k, correct, correct_shuffled)
        return out

    return _MEMO.get(model, ("head_clusters", _data_key(data), tuple(heads), seed), compute)


@dataclass
class ClusterBinding:
    head: tuple  # (layer, head)
    label: str
    note: str


def _cluster_splits():
    data = icl.generate(2 * N_CLUSTER, CLUSTER_SEED)
    return data.subset(slice(0, N_CLUSTER)), data.subset(slice(N_CLUSTER, 2 * N_CLUSTER))


@pytest.fixture(scope="session")
def cluster_binding(request, zoo_models, zoo_seed, circuits_options) -> ClusterBinding:
    """The cluster head, bound once on the UNMUTATED model on the search split: the head whose gain most
    exceeds the comparators' same head. Mutation runs reuse this binding."""
    model = zoo_models.get(request, "icl", zoo_seed).model
    search, _ = _cluster_splits()
    seed = circuits_options.shared_draws("test_icl.py::cluster_binding").int()
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    assert len(heads) == N_HEADS_SCANNED
    own = head_clusters(model, search, heads, seed)
    others = [head_clusters(build(model), search, heads, seed) for _, build in CLUSTER_COMPARATORS]
    over = {hd: own[hd].gain - max(o[hd].gain for o in others) for hd in heads}
    best = max(heads, key=lambda hd: over[hd])
    note = (f"bound {A.head_label(*best)} on the search split (n={N_CLUSTER}, seed {CLUSTER_SEED}) among "
            f"{len(heads)} heads by gain over the comparators: "
            + ", ".join(f"{A.head_label(*hd)} {own[hd].gain:.3f} ({over[hd]:+.3f})" for hd in heads))
    return ClusterBinding(best, A.head_label(*best), note)


@pytest.fixture(scope="session")
def head_roles(cluster_binding) -> dict:
    return {"cluster_head": cluster_binding.head}


@pytest.mark.about("qk:cluster_head")
@pytest.mark.controls("shuffle_labels")
def test_attention_clusters_are_a_product_of_training(icl_model, cluster_binding, claim, control, draws, figures):
    _, heldout = _cluster_splits()
    seed = draws.child("clusters").int()
    # the binding goes through the control: a specificity variant (rebind) points the role at another head
    hd = control.apply_data({"cluster_head": cluster_binding.head})["cluster_head"]
    if hd != cluster_binding.head:
        cluster_binding = ClusterBinding(hd, A.head_label(*hd), f"REBOUND to {A.head_label(*hd)} (specificity "
                                         f"variant); {cluster_binding.note}")
    own = head_clusters(icl_model, heldout, [hd], seed)[hd]
    # shuffle_labels permutes the bound head's cluster labels: the inputs can no longer explain them
    clusters = control.apply_labels(own.clusters)
    correct, correct_shuffled = own.correct, own.correct_shuffled
    if clusters is not own.clusters and (np.bincount(clusters) > 0).sum() >= 2:
        features = heldout.inputs.reshape(len(heldout), -1).double().numpy()
        shuffled = features[np.random.default_rng(seed).permutation(len(features))]
        correct, _ = icl.cluster_probe(features, clusters, seed=seed % 2**31)
        correct_shuffled, _ = icl.cluster_probe(shuffled, clusters, seed=seed % 2**31)
    others = [(name, head_clusters(build(icl_model), heldout, [hd], seed)[hd]) for name, build in CLUSTER_COMPARATORS]
    arrays = [correct, correct_shuffled]
    for _, o in others:
        arrays += [o.correct, o.correct_shuffled]
    if control.is_main:
        figures.add("attention clusters", lambda: _cluster_figure(icl_model, heldout, seed),
                    caption="per head: mean attention pattern, and the last position's attention rows sorted by "
                            "KMeans cluster (k by silhouette; white lines separate clusters), held-out split")
    gain = claim.sample(tuple(arrays), _gain_over_comparators, paired=True, method="percentile",
                        level=BINDING_LEVEL, n_resamples=RESAMPLES)
    claim.at_least(f"cluster head {cluster_binding.label}: cv accuracy gain (inputs - shuffled inputs) over the best "
                   "of untrained / random read-in", gain, 0.0,
                   note=f"{cluster_binding.note}; scored on the held-out split (n={N_CLUSTER}), CI level "
                        f"{BINDING_LEVEL:.4f} (Bonferroni over {N_HEADS_SCANNED} heads); held-out gains: model "
                        f"{np.mean(correct) - np.mean(correct_shuffled):.3f} (k={own.k}), "
                        + ", ".join(f"{name} {o.gain:.3f} (k={o.k})" for name, o in others))



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


def _cluster_figure(model, data: icl.ICLData, seed: int):
    heads = [(l, h) for l in range(model.cfg.n_layers) for h in range(model.cfg.n_heads)]
    clusters = head_clusters(model, data, heads, seed)
    fig, axes = plt.subplots(1, len(heads), figsize=(2.3 * len(heads), 3.2))
    for ax, hd in zip(axes, heads):
        c = clusters[hd]
        order = np.argsort(c.clusters, kind="stable")
        ax.imshow(c.rows[order], cmap="magma", aspect="auto", interpolation="nearest")
        for boundary in np.flatnonzero(np.diff(c.clusters[order])):
            ax.axhline(boundary + 0.5, color="white", lw=0.8)
        ax.set_title(f"{c.label}: k={c.k}\nacc {c.correct.mean():.2f} vs {c.correct_shuffled.mean():.2f}", fontsize=7)
        ax.set_xlabel("key (last query)", fontsize=7)
        ax.set_xticks([0, c.rows.shape[1] - 1])
        ax.set_yticks([])
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    return fig

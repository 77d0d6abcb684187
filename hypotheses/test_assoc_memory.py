"""Hypotheses (seed 004): attention-only transformers as associative memories (Dana, Pydi & Chevaleyre,
"Memorization in Attention-only Transformers", AISTATS 2025; after Cabannes, Dohmatob & Bietti).

The model is T(t) = W_U (e(t_S) + pos_S + sum_h W_O^h W_V^h A^h(t)): one layer of H parallel heads of
width d_h on embeddings of width d, no LayerNorm, no biases (`circuits.tasks.assoc.model`). Data are laws over
token sequences (`circuits.tasks.assoc_memory`); every divergence and accuracy is an exact sum over all
contexts, not a sample estimate.

* Proposition 1 (rank bound). The logits are W_U times a d-vector, so over all contexts they have rank
  <= d: no AoT of width d has a smaller divergence than the best rank-d factorisation of the conditional
  log-probabilities (the seed's `Low_rank`, its "optimal baseline"). On the seed's last-position law
  (N = 10, next token = a chosen one with probability 0.95, d = d_h = 5) the 20-head model's divergence
  is not below the rank-5 optimum (best of 16 restarts; 2% allowed for the optimiser's error), gets
  within 10% of it, and goes below the rank-4 optimum (the model uses all its width). The random
  baseline log N - H(pi) = 1.994 nats is what a uniform prediction scores; training ends below 5% of it.
* Experiment 1 (scaling with heads; N = 50 bigram associations, d = d_h = 10, trained as the authors'
  code trained it: a fixed set of 16,384 sampled pairs, Adam 1e-2 falling linearly to 5e-4 over 4,096
  batches of 256). The paper's numbers are training accuracies (accuracy under the training set's
  empirical law, each pair weighted by its count), and so are ours. Its accuracies (0.13 at H = 1 ...
  0.96 at H = 26, 0.997 at H = 31) are reproduced within +-0.05 at every H of the default grid (seed
  0); `--circuits-full-sweep` averages five models per H as the paper did. The slope before saturation (the
  paper's fit: points up to the first accuracy above 0.95) matches the paper's 0.034 per head within
  0.005, and the fit is linear (r^2 >= 0.95). Found on the way: under the seed notebook's recipe
  (Adam 1e-3, fresh samples) and scored on the whole table, our curve ran 0.06-0.12 below the paper's
  in the middle; the two differences are the scoring (training-set weights: +0.05-0.08) and the rate.
* Corollary 2 (capacity lower bound): accuracy >= 1/N + (1 - 1/N)(H d_h + d)/n for every trained model
  on deterministic associations (n = N^2 bigram pairs, or the 1,600 pairs of the skip-connection law).
* Freezing (the seed's cell: N = 10 bigrams, d = d_h = 5, 20 heads, H d_h + d = 105 >= N^2 = 100).
  Freezing W_O and training the rest memorises all 100 pairs. Training W_O alone (embeddings, Q/K/V
  and unembedding frozen at their random initialisation, as in the theory's construction) learns only
  a little: above chance, but the hypothesis that it memorises is refuted under this recipe (strict
  expected failure: accuracy 0.19).
* Skip connection (the seed's cell: N = 100, 1,600 pairs, d = d_h = 10, 10 heads): dropping the
  residual connection around the heads leaves memorisation about unchanged (mean accuracy difference
  over two seeds within +-0.05; measured +0.004, the seeds disagree on its sign).
* Superposition (the seed's last cells; last-position law, d = 5 < N = 10): in the rank-5 optimum each
  context's embedding points towards the unembedding of its likely next token, and so does the trained
  transformer's final residual; the ten unembeddings share five dimensions (figures: W_U W_U^T, the
  context Grams, the cosines).

Every model is an ordinary zoo entry (`circuits.tasks.assoc.experiments`; `python -m circuits list`),
loaded through the zoo's session loader: committed references (`fixtures/models/assoc_*`, `python -m
circuits.tasks.assoc` rewrites them) for a few points per experiment; `--circuits-retrain` trains them afresh
into the run directory; `--circuits-full-sweep` trains every grid point with seeds 0-4 (the paper averaged five)
into the model store once and compares the means with the paper's curves.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from circuits.plugin.pytest_plugin import get_plugin
from circuits.tasks import assoc as A
from circuits.tasks.assoc import figures as F
from circuits.tasks.assoc.controls import Baseline, Predictions, TargetVectors, scored_law
from circuits.tasks.assoc.model import table_logits
from circuits.zoo.registry import LoadedModel

PROP1_TOLERANCE = 0.02  # relative: restarts of the rank-d fit land within ~5%, the best two within ~0.5%
PAPER_TOLERANCE = 0.05  # the issue's +-0.05 per point
SLOPE_TOLERANCE = 0.005  # per head
SKIP_TOLERANCE = 0.05  # |accuracy(no residual) - accuracy(residual)|, mean over seeds 0 and 1


# --- models ---------------------------------------------------------------------------------------


class Models:
    """The zoo's session loader (`zoo_models`: each (name, seed) loaded once per run, from its reference,
    the store, or trained, and noted for the report), addressed by zoo entry."""

    def __init__(self, zoo_models):
        self.zoo_models = zoo_models

    def get(self, request: pytest.FixtureRequest, entry, seed: int = 0) -> LoadedModel:
        return self.zoo_models.get(request, entry.name, seed)

    def low_rank(self, request: pytest.FixtureRequest, law_spec: dict, d: int) -> tuple:
        """(the rank-d optimum of the law, its card with `divergence`)."""
        loaded = self.zoo_models.get(request, A.low_rank_name(law_spec, d), 0)
        return loaded.model, loaded.card


@pytest.fixture
def assoc(zoo_models) -> Models:
    return Models(zoo_models)


def exp1_seeds(config: pytest.Config, full: bool) -> tuple:
    options = get_plugin(config).options
    if options.seeds:
        return tuple(options.seeds)
    return A.EXP1_FULL_SEEDS if full else A.EXP1_DEFAULT_SEEDS


def logits_of(model) -> torch.Tensor:
    with torch.no_grad():
        return table_logits(model).double()


# The hand-written controls (`circuits.tasks.assoc.controls`, registered on import) break what the claims
# credit in the weights; every claim about the heads is also `about("attn:L0")`: the plugin's derived
# mutations remove all heads or replace them by their mean, which the model makes in its weights
# (`AssocTransformer.weight_mutation`), the only form `table_logits`, the exact evaluation, sees.
HEADS = pytest.mark.about("attn:L0")


# --- Proposition 1 and the baselines ----------------------------------------------------------------


def _prop1_inputs(assoc, request, H: int):
    exp = A.superposition_model(H)
    loaded = assoc.get(request, exp)
    law = A.build_law(exp)
    d = exp.config.d_model
    _, top = assoc.low_rank(request, A.SUPER_LAW, d)
    _, below = assoc.low_rank(request, A.SUPER_LAW, d - 1)
    return loaded, law, Baseline(top["divergence"], d, below["divergence"])


@pytest.mark.about(none="Proposition 1: a bound every width-d model obeys, so no mutation of the model can break "
                        "it; its controls are what escapes the bound (the law's own logits, the rank-(d-1) optimum)")
@pytest.mark.controls("oracle_logits", "rank_below")
def test_divergence_is_not_below_the_low_rank_optimum(assoc, request, claim, control):
    loaded, law, baseline = _prop1_inputs(assoc, request, 20)
    preds = control.apply_data(Predictions(logits_of(loaded.model), law))
    baseline = control.apply_data(baseline)
    divergence = law.divergence(preds.logits)
    claim.at_least("divergence - low-rank optimum", divergence - baseline.divergence,
                   -PROP1_TOLERANCE * baseline.divergence,
                   note=f"divergence {divergence:.5f}; rank-{baseline.d} optimum {baseline.divergence:.5f} "
                        f"(allowed {PROP1_TOLERANCE:.0%} below it for the optimiser's error)")


@HEADS
@pytest.mark.controls("randomise_ov", "ablate_half_heads", "mean_ablate_half_heads", "reassign_table")
def test_trained_model_approaches_the_low_rank_optimum(assoc, request, claim, control, figures, draws):
    """What gets the model near the optimum is what its heads stored: with their W_V/W_O randomised,
    half of them removed or replaced by their mean, or scored on another table, it must not get there."""
    loaded, law, baseline = _prop1_inputs(assoc, request, 20)
    model = control.apply_model(loaded.model)
    divergence = scored_law(control, draws, law).divergence(logits_of(model))
    claim.at_most("divergence / rank-d optimum", divergence / baseline.divergence, 1.10,
                  note=f"{divergence:.5f} / {baseline.divergence:.5f}")
    if control.is_main:
        small = assoc.get(request, A.superposition_model(5))
        figures.add("learning dynamics", lambda: F.learning_dynamics(law, baseline, [small, loaded]),
                    caption="divergence during training against the random baseline log N - H(pi) and the "
                            "optimal rank-5 baseline (the seed's first figure)")


@HEADS
@pytest.mark.controls("randomise_ov", "ablate_half_heads", "mean_ablate_half_heads", "reassign_table")
def test_training_beats_the_random_baseline(assoc, request, claim, control, draws):
    loaded, law, _ = _prop1_inputs(assoc, request, 20)
    model = control.apply_model(loaded.model)
    divergence = scored_law(control, draws, law).divergence(logits_of(model))
    random = law.random_baseline()
    assert random == pytest.approx(math.log(law.N) - law.entropy())
    claim.at_most("divergence / (log N - H)", divergence / random, 0.05,
                  note=f"divergence {divergence:.4f}, random baseline log N - H = {random:.4f}")


@HEADS
@pytest.mark.controls("truncate_width", "randomise_ov")
def test_the_model_uses_its_whole_width(assoc, request, claim, control):
    """Below the rank-(d-1) optimum: a width-d model that used fewer directions could not get there.
    The targeted control takes one direction away (W_U restricted to its top d-1 singular directions):
    by Proposition 1 the truncated model cannot go below the rank-(d-1) optimum."""
    loaded, law, baseline = _prop1_inputs(assoc, request, 20)
    divergence = law.divergence(logits_of(control.apply_model(loaded.model)))
    claim.at_most("divergence / rank-(d-1) optimum", divergence / baseline.lower_divergence, 0.8,
                  note=f"{divergence:.5f} / {baseline.lower_divergence:.5f}")


# --- experiment 1: scaling with heads --------------------------------------------------------------


def _exp1_accuracy(assoc, request, control, draws, H: int, seeds) -> tuple[float, list]:
    accs = []
    law = scored_law(control, draws, A.exp1(H))
    for s in seeds:
        model = control.apply_model(assoc.get(request, A.exp1(H), s).model)
        accs.append(law.accuracy(logits_of(model)))
    return float(np.mean(accs)), accs


def _exp1_note(assoc, request, H: int, seeds, accs: list) -> str:
    table = A.make_law(A.EXP1_TABLE)  # every pair once: what a model would score on the whole table
    on_table = [table.accuracy(logits_of(assoc.get(request, A.exp1(H), s).model)) for s in seeds]
    return (f"training-set accuracy, seeds {list(seeds)}: {[round(a, 4) for a in accs]}; paper {A.PAPER_EXP1[H]}; "
            f"on the whole table of 2,500 pairs: {[round(a, 4) for a in on_table]}")


HEAD_CONTROLS = ("ablate_half_heads", "mean_ablate_half_heads", "randomise_ov", "reassign_table")


@HEADS
@pytest.mark.parametrize("H", A.EXP1_HEADS)
@pytest.mark.controls(*HEAD_CONTROLS)
def test_exp1_accuracy_matches_the_paper(H, assoc, request, claim, control, draws):
    """The accuracy the H heads reach: half of them removed (or replaced by their mean), their W_V/W_O
    randomised, or the model scored on another table of the same statistics must miss the paper."""
    seeds = exp1_seeds(request.config, full=False)
    acc, accs = _exp1_accuracy(assoc, request, control, draws, H, seeds)
    claim.close_to("accuracy", acc, A.PAPER_EXP1[H], atol=PAPER_TOLERANCE,
                   note=_exp1_note(assoc, request, H, seeds, accs))


@HEADS
@pytest.mark.full_sweep
@pytest.mark.parametrize("H", A.EXP1_HEADS)
@pytest.mark.controls(*HEAD_CONTROLS)
def test_exp1_accuracy_matches_the_paper_five_repetitions(H, assoc, request, claim, control, draws):
    """The paper's grid: every H, mean of five repetitions (seeds 0-4; the same training set)."""
    if not get_plugin(request.config).options.full_sweep:
        pytest.skip("the full sweep runs with --circuits-full-sweep")
    seeds = exp1_seeds(request.config, full=True)
    acc, accs = _exp1_accuracy(assoc, request, control, draws, H, seeds)
    claim.close_to("accuracy", acc, A.PAPER_EXP1[H], atol=PAPER_TOLERANCE,
                   note=_exp1_note(assoc, request, H, seeds, accs))


def linear_before_saturation(H: list, acc: list) -> tuple[float, float, float, int]:
    """The paper's fit: least squares on the points up to (and including) the first accuracy above
    0.95. Returns (slope, intercept, r^2, number of points)."""
    n = next((i + 1 for i, a in enumerate(acc) if a > 0.95), len(acc))
    x, y = np.asarray(H[:n], float), np.asarray(acc[:n], float)
    slope, intercept = np.polyfit(x, y, 1)
    resid = y - (slope * x + intercept)
    r2 = 1 - float((resid ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))
    return float(slope), float(intercept), r2, n


@HEADS
@pytest.mark.controls(*HEAD_CONTROLS)
def test_exp1_accuracy_grows_linearly_with_heads(assoc, request, claim, control, figures, draws):
    """The slope per head is what each added head stores: with half of every model's heads removed
    (or replaced by their mean), their W_V/W_O randomised or another table scored, the curve is flat
    and neither the slope nor a good linear fit (r^2 of a flat, noisy curve) survives."""
    full = get_plugin(request.config).options.full_sweep
    seeds = exp1_seeds(request.config, full=full)
    heads = list(A.EXP1_HEADS)
    ours = [_exp1_accuracy(assoc, request, control, draws, H, seeds) for H in heads]
    means = [m for m, _ in ours]
    paper = [A.PAPER_EXP1[H] for H in heads]
    slope, intercept, r2, n = linear_before_saturation(heads, means)
    p_slope, _, p_r2, p_n = linear_before_saturation(heads, paper)
    # the claim is linear *growth*: a falling line (the reassigned table's score falls as the heads
    # memorise more of the original pairs, r^2 0.96) is no evidence for it
    r2 = r2 if slope > 0 else 0.0
    claim.close_to("slope before saturation (per head)", slope, p_slope, atol=SLOPE_TOLERANCE,
                   note=f"ours {slope:.4f} on {n} points, paper {p_slope:.4f} on {p_n} points")
    claim.at_least("r^2 of the linear fit (0 unless it rises)", r2, 0.95, note=f"paper's points: r^2 = {p_r2:.3f}")
    if control.is_main:
        table = A.make_law(A.EXP1_TABLE)
        on_table = [float(np.mean([table.accuracy(logits_of(assoc.get(request, A.exp1(H), s).model)) for s in seeds]))
                    for H in heads]
        figures.add("accuracy against heads",
                    lambda: F.scaling_figure(heads, ours, paper, slope, intercept, n, seeds, on_table, PAPER_TOLERANCE),
                    caption="experiment 1 (N = 50, d = d_h = 10): our accuracy per H (dots: seeds) against the "
                            "paper's points, its +-0.05 band, the linear fit before saturation and Corollary 2's "
                            "lower bound; orange: the same models scored on all 2,500 pairs equally")


# --- Corollary 2: the capacity lower bound ----------------------------------------------------------


def _bound_configs(config: pytest.Config, full: bool) -> list:
    seeds = exp1_seeds(config, full)  # --circuits-seeds picks them, as for experiment 1 and the sweep plan
    configs = [pytest.param(A.exp1(H), s, id=f"exp1-H{H}-seed{s}") for H in A.EXP1_HEADS for s in seeds]
    # fully trained models only: the bound says what a trained AoT reaches, not a partly frozen one
    # (W_O alone stays far below it: see test_training_W_O_alone_memorises)
    configs += [pytest.param(A.freezing_model(f), 0, id=f"freeze-{f}") for f in ("none", "freeze_O")]
    configs += [pytest.param(A.skip_model(r), 0, id=f"skip-residual={r}") for r in (True, False)]
    # the paper's other sweeps: the reference points, or every grid point and seed with --circuits-full-sweep
    for exp, (grid, make) in SWEEPS.items():
        for x in (grid if full else REFERENCE_POINTS[exp]):
            configs += [pytest.param(make(x), s, id=f"{exp}-{x}-seed{s}") for s in seeds]
    return configs


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    full = get_plugin(metafunc.config).options.full_sweep
    if "sweep_point" in metafunc.fixturenames:  # (experiment, x): the paper-comparison claims
        points = [(exp, x) for exp, (grid, _) in SWEEPS.items() for x in (grid if full else REFERENCE_POINTS[exp])]
        metafunc.parametrize("sweep_point", points, ids=[f"{e}-{x}" for e, x in points])
    if metafunc.function.__name__ == "test_capacity_lower_bound":
        metafunc.parametrize("exp, seed", _bound_configs(metafunc.config, full))


@HEADS
@pytest.mark.controls("reassign_table", "randomise_ov")
def test_capacity_lower_bound(exp, seed, assoc, request, claim, control, draws):
    """Corollary 2's bound counts what the heads (H d_h) and the residual (d) can store. Controls: the
    heads' W_V/W_O randomised (their storage removed) and another table scored (the memorised pairs
    replaced). Where H d_h is small the bound is below what the residual alone reaches from the last
    token's statistics, so the randomised heads still clear it: those runs are KNOWN_FAILURES entries
    (the bound there is too weak to show the heads' storage)."""
    law = A.build_law(exp)
    assert law.is_deterministic
    cfg = exp.config
    n_assoc = len(law.support())
    bound = A.capacity_bound(law.N, cfg.n_heads, cfg.d_head, cfg.d_model, n_assoc)
    model = control.apply_model(assoc.get(request, exp, seed).model)
    acc = scored_law(control, draws, law).accuracy(logits_of(model))
    claim.at_least("accuracy", acc, bound,
                   note=f"bound 1/N + (1 - 1/N)(H d_h + d)/n with N={law.N}, H={cfg.n_heads}, d_h={cfg.d_head}, "
                        f"d={cfg.d_model}, n={n_assoc}")


# --- experiments 2, 3, 5 and 6: the paper's other sweeps ---------------------------------------------

# experiment -> (the paper's grid, x -> zoo entry); the paper's numbers per x
SWEEPS = {
    "exp2": (tuple(A.PAPER_EXP2), A.exp2),
    "exp3": (tuple(A.PAPER_EXP3), A.exp3),
    "exp5_attn": (A.EXP5_HEADS, lambda H: A.exp5("attn", H)),
    "exp5_mlp": (A.EXP5_HEADS, lambda H: A.exp5("mlp", H)),
    "exp6": (A.EXP6_HEADS, A.exp6),
}
PAPER = {"exp2": A.PAPER_EXP2, "exp3": A.PAPER_EXP3, "exp5_attn": A.PAPER_EXP5_ATTN, "exp5_mlp": A.PAPER_EXP5_MLP,
         "exp6": A.PAPER_EXP6}
# default runs: committed references only (exp 3's d = 10 is exp 2's d_h = 10 model: same config, law, recipe)
REFERENCE_POINTS = {"exp2": A.EXP2_REFERENCE_POINTS, "exp3": A.EXP3_REFERENCE_POINTS,
                    "exp5_attn": A.EXP5_REFERENCE_POINTS, "exp5_mlp": A.EXP5_REFERENCE_POINTS,
                    "exp6": A.EXP6_REFERENCE_POINTS}
# experiment 6: the paper averaged 20 runs of N = 10 models, whose single-seed spread is wide (0.28 / 0.70
# on seed 0 at H = 1 / 9 against the mean 0.33 / 0.63): one seed is compared with 0.1, five with 0.05
EXP6_ONE_SEED_TOLERANCE = 0.10


def circuits_sweep_plan(options, items) -> list:
    """``--circuits-full-sweep``: every grid point of the experiments the selected tests name (``exp1`` ...
    ``exp6`` in a test's name or id) with its seeds, trained in parallel by the sweep runner before the
    first test (the plugin calls this after collection); ``-k exp6`` trains experiment 6's grid only."""
    if not options.full_sweep:
        return []
    seeds = tuple(options.seeds or ()) or A.EXP1_FULL_SEEDS  # no --circuits-seeds: None
    named = {e for e in ("exp1", "exp2", "exp3", "exp5", "exp6") if any(e in item.name for item in items)}
    names = [A.exp1(H).name for H in A.EXP1_HEADS] if "exp1" in named else []
    names += [_sweep_entry(exp, x).name for exp, (grid, _) in SWEEPS.items() if exp[:4] in named for x in grid]
    return [(name, seeds) for name in dict.fromkeys(names)]


def _sweep_entry(exp: str, x: int):
    if exp == "exp3" and x == 10 and x not in A.EXP3_REFERENCE_POINTS:
        return A.exp2(10)
    return SWEEPS[exp][1](x)


def _sweep_seeds(config) -> tuple:
    return exp1_seeds(config, full=get_plugin(config).options.full_sweep)


def _mean_accuracy(assoc, request, control, entry, seeds, draws=None) -> tuple[float, list]:
    law = A.build_law(entry) if draws is None else scored_law(control, draws, entry)
    models = [assoc.get(request, entry, s).model for s in seeds]
    accs = [law.accuracy(logits_of(control.apply_model(m) if control is not None else m)) for m in models]
    return float(np.mean(accs)), accs


@HEADS
@pytest.mark.controls(*HEAD_CONTROLS)
def test_sweep_accuracy_matches_the_paper(sweep_point, assoc, request, claim, control, draws):
    """Each point of experiments 2, 3, 5, 6 against the paper's mean (training-set accuracy, as theirs),
    with the head controls of experiment 1 (for experiment 5's MLP points "half the heads" is its one
    head, which the MLP reads through). Where the paper's point is near what a model without working
    heads scores (experiment 2 at d_h = 1: 0.08), the head controls stay inside the tolerance: those
    runs are KNOWN_FAILURES entries; the reassigned table still fails there."""
    exp, x = sweep_point
    seeds = _sweep_seeds(request.config)
    acc, accs = _mean_accuracy(assoc, request, control, _sweep_entry(exp, x), seeds, draws)
    tol = EXP6_ONE_SEED_TOLERANCE if exp == "exp6" and len(seeds) < 5 else PAPER_TOLERANCE
    claim.close_to("accuracy", acc, PAPER[exp][x], atol=tol,
                   note=f"{_sweep_entry(exp, x).name}, seeds {list(seeds)}: {[round(a, 4) for a in accs]}")


def _curve(assoc, request, control, exp: str, xs) -> list:
    seeds = _sweep_seeds(request.config)
    return [_mean_accuracy(assoc, request, control, _sweep_entry(exp, x), seeds)[0] for x in xs]


def _points(request, exp: str) -> tuple:
    return SWEEPS[exp][0] if get_plugin(request.config).options.full_sweep else REFERENCE_POINTS[exp]


@HEADS
@pytest.mark.controls("ablate_half_heads", "mean_ablate_half_heads", "randomise_ov")
def test_exp2_accuracy_grows_with_head_width(assoc, request, claim, control):
    """Experiment 2 (N = 50, d = 10, H = 20): from the smallest to the largest d_h the accuracy gains
    at least what Corollary 2's bound gains (H (d_h' - d_h) more associations memorised). Controls:
    half the heads removed or replaced by their mean, or every head's W_V/W_O randomised, at every point."""
    xs = _points(request, "exp2")
    acc = _curve(assoc, request, control, "exp2", xs)
    gain_bound = A.capacity_bound(50, 20, xs[-1], 10) - A.capacity_bound(50, 20, xs[0], 10)
    claim.at_least(f"accuracy(d_h={xs[-1]}) - accuracy(d_h={xs[0]})", acc[-1] - acc[0], gain_bound,
                   note=f"accuracies {dict(zip(xs, [round(a, 4) for a in acc]))}; paper "
                        f"{ {x: round(A.PAPER_EXP2[x], 4) for x in xs} }; the bound gains {gain_bound:.4f}")


def _convexity(xs, ys) -> tuple[float, float]:
    """(how far the middle point lies below the chord of the end points, as a fraction of the rise;
    the same for y = x^2): 0 for a straight line."""
    x0, xm, x1 = xs[0], xs[len(xs) // 2], xs[-1]
    y0, ym, y1 = ys[0], ys[len(xs) // 2], ys[-1]
    t = (xm - x0) / (x1 - x0)
    gap = (y0 + t * (y1 - y0) - ym) / (y1 - y0) if y1 - y0 > 2 * PAPER_TOLERANCE else 0.0
    quad = (x0 ** 2 + t * (x1 ** 2 - x0 ** 2) - xm ** 2) / (x1 ** 2 - x0 ** 2)
    return gap, quad


@HEADS
@pytest.mark.controls("ablate_half_heads", "mean_ablate_half_heads", "randomise_ov")
def test_exp2_growth_is_roughly_quadratic(assoc, request, claim, control):
    """The paper: accuracy ~ a d_h^2 + b at this size (EXP_2.py's quadratic regression). Claimed: the
    middle point lies below the chord of the end points by at least half of what a parabola gives
    (a straight line gives 0; the paper's own points: 0.16 of the rise for a parabola's 0.20). A curve
    that rises by less than twice the per-point tolerance has no shape to judge and scores 0 (else the
    ratio of two noise-sized differences decides): the head controls leave such curves."""
    xs = _points(request, "exp2")
    if len(xs) < 3:
        pytest.skip(f"needs three d_h points (references: {xs})")
    acc = _curve(assoc, request, control, "exp2", xs)
    gap, quad = _convexity(xs, acc)
    paper_gap, _ = _convexity(xs, [A.PAPER_EXP2[x] for x in xs])
    claim.at_least("middle point below the chord (fraction of the rise)", gap, quad / 2,
                   note=f"parabola {quad:.3f}, straight line 0, paper's points {paper_gap:.3f}; d_h {list(xs)}")


def _exp3_points(request) -> tuple:
    xs = _points(request, "exp3")
    return tuple(sorted(set(xs) | {10}))  # d = d_h is where the paper's curve bends


@HEADS
@pytest.mark.controls("ablate_half_heads", "mean_ablate_half_heads", "randomise_ov")
def test_exp3_accuracy_grows_with_d_up_to_d_head(assoc, request, claim, control):
    """Experiment 3 (N = 50, H = 20, d_h = 10): below d = d_h the residual width limits what the heads
    store. Claimed: from the smallest d to d = d_h = 10 the accuracy rises by more than twice the
    per-point tolerance (0.1), so the rise is not noise."""
    xs = [x for x in _exp3_points(request) if x <= 10]
    if len(xs) < 2:
        pytest.skip(f"needs a point below d = 10 (references: {xs})")
    acc = _curve(assoc, request, control, "exp3", xs)
    claim.at_least(f"accuracy(d=10) - accuracy(d={xs[0]})", acc[-1] - acc[0], 2 * PAPER_TOLERANCE,
                   note=f"{dict(zip(xs, [round(a, 4) for a in acc]))}; paper { {x: round(A.PAPER_EXP3[x], 4) for x in xs} }")


def plateau_share(acc_low: float, acc_mid: float, acc_high: float) -> float:
    """The share of the rise from the smallest to the largest d that is reached at d = d_h; 0 when the
    curve rises by less than twice the per-point tolerance (no rise, so no plateau after one)."""
    rise = acc_high - acc_low
    return (acc_mid - acc_low) / rise if rise > 2 * PAPER_TOLERANCE else 0.0


@HEADS
@pytest.mark.controls("ablate_half_heads", "mean_ablate_half_heads", "randomise_ov")
def test_exp3_accuracy_plateaus_above_d_head(assoc, request, claim, control):
    """Above d = d_h the paper's curve is flat (0.81 at d = 10 ... 0.81 at d = 15): the heads' d_h-wide
    bottleneck, not the residual, is the limit. The claim used to be "the change from d = 10 to the
    largest d is within 0.05", which no control can refute: a model with broken heads is flat too (so
    is an untrained one). Reconsidered as what the paper's figure shows, a rise that stops at d = d_h:
    the share of the rise from the smallest to the largest d that is already reached at d = 10 is
    within 0.9-1.1 (the paper's points: 0.99). Broken heads leave no rise, and the claim fails."""
    xs = _exp3_points(request)
    if xs[0] >= 10 or xs[-1] <= 10:
        pytest.skip(f"needs points below and above d = 10 (references: {xs})")
    lo, hi = xs[0], xs[-1]
    acc = dict(zip([lo, 10, hi], _curve(assoc, request, control, "exp3", [lo, 10, hi])))
    share = plateau_share(acc[lo], acc[10], acc[hi])
    paper = plateau_share(A.PAPER_EXP3[lo], A.PAPER_EXP3[10], A.PAPER_EXP3[hi])
    claim.between(f"share of the d={lo}..{hi} rise reached at d=10", share, 0.9, 1.1,
                  note=f"{ {x: round(a, 4) for x, a in acc.items()} }; paper {paper:.3f} "
                       f"({ {x: round(A.PAPER_EXP3[x], 4) for x in (lo, 10, hi)} })")


@pytest.mark.about("mlp:L0")
def test_exp5_mlp_stores_more_per_parameter_than_attention(assoc, request, claim, control):
    """Experiment 5 (N = 70, d = 10): one head plus an MLP of width 2 d (H - 1) against H heads, about
    the same parameter count. The paper: the MLP-based model is more accurate per parameter (e.g.
    0.24 against 0.15 at H = 6). Claimed: the mean accuracy difference (MLP - attention) over the
    points with H > 1 is positive. About the MLP: its derived mutations (the MLP-based model's MLP output
    removed, or replaced by its mean over every context) take what the claim credits (mean difference
    -0.166 over H = 6, 11 on the references; the claim 0.118). Tried and left
    out (on the earlier references): every head's W_V/W_O randomised in both models, which breaks both
    alike (0.015 / 0.016) and leaves a difference of +0.001 that the claim's threshold 0 cannot tell from a
    real one."""
    xs = [x for x in _points(request, "exp5_attn") if x > 1]
    if not xs:
        pytest.skip("experiment 5 has no committed reference points (16,384 steps on N = 70 each); "
                    "run with --circuits-full-sweep")
    attn = _curve(assoc, request, None, "exp5_attn", xs)  # attention only: no MLP for a mutation to break
    mlp = _curve(assoc, request, control, "exp5_mlp", xs)
    diff = float(np.mean(np.subtract(mlp, attn)))
    claim.at_least("mean accuracy(MLP) - accuracy(attention)", diff, 0.0,
                   note=f"H {xs}: attention {[round(a, 4) for a in attn]}, MLP {[round(a, 4) for a in mlp]}")


@HEADS
@pytest.mark.controls("ablate_half_heads", "mean_ablate_half_heads", "randomise_ov")
def test_exp6_capacity_grows_at_least_as_fast_as_H_d_head(assoc, request, claim, control):
    """Experiment 6 (N = 10, d = d_h = 2): memorised associations (acc - 1/N) / (1 - 1/N) * N^2 against
    H d_h. Corollary 2's construction stores one association per unit of H d_h; the paper measured
    about 1.5. Claimed: the least-squares slope over the points before saturation (accuracy <= 0.95)
    is at least 1. Controls: half the heads removed or replaced by their mean, every head's W_V/W_O
    randomised (the storage per unit of H d_h is gone)."""
    xs = _points(request, "exp6")
    acc = _curve(assoc, request, control, "exp6", xs)
    N = 10
    hd = np.array([H * 2 for H in xs], float)
    mem = (np.array(acc) - 1 / N) / (1 - 1 / N) * N ** 2
    keep = np.array(acc) <= 0.95
    if keep.sum() < 2:
        pytest.skip("fewer than two points before saturation")
    slope = float(np.polyfit(hd[keep], mem[keep], 1)[0])
    paper = (np.array([A.PAPER_EXP6[x] for x in xs]) - 1 / N) / (1 - 1 / N) * N ** 2
    p_slope = float(np.polyfit(hd[keep], paper[keep], 1)[0])
    claim.at_least("memorised associations per unit of H d_h", slope, 1.0,
                   note=f"H {list(xs)}: memorised {[round(m, 1) for m in mem]}; paper's points give {p_slope:.2f}")


# --- freezing -------------------------------------------------------------------------------------


FREEZE_O_ONLY_REASON = ("refuted under the seed's recipe (Adam 1e-3, 5,000 batches of 1,024): with E, Q/K/V "
                        "and U frozen at their random initialisation, the hypothesis says training W_O alone "
                        "memorises (>= 0.95; H d_h + d = 105 >= 100 pairs), but it stays near chance (0.10): "
                        "the random attention is nearly uniform, so the heads' outputs are almost additive in "
                        "the two tokens and W_O cannot separate the pairs. Exact (no sampling): one reference "
                        "model, an exact sum over all 100 contexts")


_WEAK_BOUND = ("Corollary 2's bound is {bound} here (H d_h + d = {cap} of {n} pairs), below what the residual "
               "alone reaches from the last token's statistics (all heads removed: {none}): with the heads' "
               "W_V/W_O randomised the model still clears it, so at this point the bound cannot show the heads' "
               "storage (the reassigned table still fails it). randomise_ov draws from --circuits-draws-seed; the "
               "values here are at draws seed 0")
# the derived mutations of about("attn:L0") at the same points (measured 2026-12-07 on the references, `pytest
# hypotheses/test_assoc_memory.py`): every head removed, or replaced by its mean over every context (a fixed
# bias towards the frequent next tokens), still clears a bound that counts so few pairs
_WEAK_BOUND_NO_HEADS = ("Corollary 2's bound is {bound} here (H d_h + d = {cap} of {n} pairs), below what the model "
                        "scores with every head removed ({zero}) or replaced by its mean over every context ({mean}): "
                        "the residual (and a fixed bias) predicts from the last token's statistics alone, so at "
                        "this point the bound cannot show the heads' storage (the reassigned table still fails "
                        "it). Exact sums over every context, no sampling")
_NEAR_NO_HEADS = ("the paper's point (0.081 at d_h = 1) is within the tolerance of what a model without working "
                  "heads scores (all 20 heads removed: 0.062, replaced by their mean: 0.070; the residual predicts "
                  "from the last token alone), so a head control or mutation cannot take the accuracy outside "
                  "0.081 +- 0.05 at this point; the reassigned table does (0.02). Exact sums, no sampling")
_NEAR_NO_HEADS_FULL = ("the paper's point (0.110 at d_h = 2) is within the tolerance of what the model scores with "
                       "half its heads removed (0.061 zeroed, 0.064 mean-ablated: five-seed means), so those "
                       "controls cannot take the accuracy outside 0.110 +- 0.05 here; the randomised heads (0.051) "
                       "and the reassigned table do")
_EXP5_WEAK_BOUND = _WEAK_BOUND.format(bound=0.018, cap=20, n=4900,
                                      none="randomised head 0.0184-0.0295 on the runs listed, chance 0.0143")
_EXP5_NEAR_NO_HEADS = ("the paper's point at H = 1 (0.068 attention only, 0.070 one head + no MLP) is within the "
                       "tolerance of what the five seeds score with their one head zeroed (0.029 / 0.030), "
                       "mean-ablated (0.031 / 0.030) or randomised (0.022 / 0.022), so no head control or mutation "
                       "can take the mean outside +-0.05 of it; the reassigned table does")
_HEADS_GONE = ("zero_ablate_attn:L0", "mean_ablate_attn:L0")
KNOWN_FAILURES = {
    "test_training_W_O_alone_memorises": FREEZE_O_ONLY_REASON,
    "test_capacity_lower_bound[exp1-H1-seed0] control=randomise_ov":
        _WEAK_BOUND.format(bound=0.028, cap=20, n=2500, none=0.049),
    "test_capacity_lower_bound[exp2-1-seed0] control=randomise_ov":
        _WEAK_BOUND.format(bound=0.032, cap=30, n=2500, none=0.062),
    # one head + an MLP: the bound counts the one head only (H d_h + d = 20 of 4,900 pairs: 0.0183, chance
    # 0.014), and the MLP still reads the last token through the residual (randomised head: 0.0217 at H = 11,
    # 0.0185 at H = 6 on the references trained with rows="batch")
    **{f"test_capacity_lower_bound[exp5_mlp-{H}-seed0] control=randomise_ov":
       _WEAK_BOUND.format(bound=0.018, cap=20, n=4900, none="about chance, 0.014-0.022") for H in (6, 11)},
    **{f"test_capacity_lower_bound[{point}-seed0] mutation={m}": _WEAK_BOUND_NO_HEADS.format(**kw)
       for point, kw in (("exp1-H1", dict(bound=0.028, cap=20, n=2500, zero=0.0490, mean=0.0527)),
                         ("exp2-1", dict(bound=0.032, cap=30, n=2500, zero=0.0621, mean=0.0698)),
                         ("exp5_mlp-6", dict(bound=0.018, cap=20, n=4900, zero=0.0234, mean=0.0236)),
                         ("exp5_mlp-11", dict(bound=0.018, cap=20, n=4900, zero=0.0201, mean=0.0205)))
       for m in _HEADS_GONE},
    # experiment 6 at H = 1 (N = 10, d = d_h = 2): the head removed scores 0.133, below the bound, as required
    # randomised heads at the same point (draws seed 0, measured in CI 2026-12-07): 0.162 clears the bound; the
    # control's seed follows --circuits-draws-seed since this stop, and the earlier fixed seed happened to fail it
    "test_capacity_lower_bound[exp6-1-seed0] control=randomise_ov":
        _WEAK_BOUND.format(bound=0.136, cap=4, n=100, none="0.133 with the head zeroed, 0.183 mean-ablated; "
                                                           "randomised W_V/W_O 0.162"),
    "test_capacity_lower_bound[exp6-1-seed0] mutation=mean_ablate_attn:L0":
        _WEAK_BOUND_NO_HEADS.format(bound=0.136, cap=4, n=100, zero="0.133: fails it, as required", mean=0.183),
    **{f"test_sweep_accuracy_matches_the_paper[exp2-1] {run}": _NEAR_NO_HEADS
       for run in ("control=ablate_half_heads", "control=mean_ablate_half_heads", "control=randomise_ov",
                   *(f"mutation={m}" for m in _HEADS_GONE))},
    # --circuits-full-sweep (every grid point, seeds 0-4; lenient there, as under --circuits-seeds): the same two limits
    # at the narrowest heads, measured on 2026-12-01 (`pytest hypotheses/test_assoc_memory.py --circuits-full-sweep -k
    # "exp2 or exp3"`: 130 claims held, these 10 control runs held too). Listed as measured: seed 4 at d_h = 2 and
    # the randomised heads at d_h = 2 do fail as required.
    **{f"test_capacity_lower_bound[exp2-1-seed{s}] control=randomise_ov":
       _WEAK_BOUND.format(bound=0.032, cap=30, n=2500, none="randomised heads 0.049-0.069 on seeds 1-4")
       for s in (1, 2, 3, 4)},
    **{f"test_capacity_lower_bound[exp2-2-seed{s}] control=randomise_ov":
       _WEAK_BOUND.format(bound=0.040, cap=50, n=2500, none="randomised heads 0.046-0.071 on seeds 0-3")
       for s in (0, 1, 2, 3)},
    **{f"test_sweep_accuracy_matches_the_paper[exp2-2] control={c}": _NEAR_NO_HEADS_FULL
       for c in ("ablate_half_heads", "mean_ablate_half_heads")},
    # Experiment 5 under --circuits-full-sweep, measured on 2026-12-02 (`pytest hypotheses/test_assoc_memory.py
    # --circuits-full-sweep -k exp5`: 256 passed, these 25 control runs held too). With one head (every MLP point, and
    # H = 1) the bound counts H d_h + d = 20 of 4,900 pairs, 0.0183 against chance 0.0143, and the residual and the
    # MLP still read the last token with the head's W_V/W_O randomised: 0.0184-0.0295 on these 19 runs (and the two
    # reference runs above); the other 19 of the 40 one-head runs fall below the bound, as required. At H = 1 the
    # paper's point is within 0.05 of what a broken head scores; the reassigned table fails there. With one head,
    # "half the heads" is every head: the derived mutations there are the controls measured (zeroed, mean-ablated).
    **{f"test_capacity_lower_bound[{point}-seed{s}] control=randomise_ov": _EXP5_WEAK_BOUND
       for point, seeds in (("exp5_attn-1", (0, 1, 4)), ("exp5_mlp-1", (0, 1, 4)), ("exp5_mlp-6", (1, 3, 4)),
                            ("exp5_mlp-11", (1, 3)), ("exp5_mlp-21", (0, 1, 3)), ("exp5_mlp-26", (0, 3)),
                            ("exp5_mlp-31", (0, 2, 4)))
       for s in seeds},
    **{f"test_sweep_accuracy_matches_the_paper[{point}] {run}": _EXP5_NEAR_NO_HEADS
       for point in ("exp5_attn-1", "exp5_mlp-1")
       for run in ("control=ablate_half_heads", "control=mean_ablate_half_heads", "control=randomise_ov",
                   *(f"mutation={m}" for m in _HEADS_GONE))},
}


@HEADS
@pytest.mark.controls(*HEAD_CONTROLS)
def test_freezing_W_O_still_memorises(assoc, request, claim, control, figures, draws):
    """With W_O frozen the rest (W_V above all) stores the pairs: broken heads or another table miss."""
    exp = A.freezing_model("freeze_O")
    law = A.build_law(exp)
    model = control.apply_model(assoc.get(request, exp).model)
    claim.at_least("accuracy", scored_law(control, draws, law).accuracy(logits_of(model)), 0.99)
    if control.is_main:
        loaded = {f: assoc.get(request, A.freezing_model(f)) for f in A.FREEZERS}
        figures.add("freezing", lambda: F.freezing_figure(loaded, law),
                    caption="the seed's freezing cell: N = 10 bigrams, d = d_h = 5, 20 heads; which weights train")


@HEADS
@pytest.mark.controls("randomise_ov")
def test_training_W_O_alone_learns_above_chance(assoc, request, claim, control, draws):
    """What W_O learned: with it (and the random W_V it reads) replaced by random matrices of the same
    norms, or zeroed (the derived zero_ablate_attn), the model is at chance (0.09 / 0.05). Tried and left
    out: half the heads removed or mean-ablated (0.16 / 0.18: what W_O learned is spread over all 20
    heads and the claim's margin over chance is small), and the reassigned table, whose score varies with the derangement drawn
    (0.02-0.16 over ten draws) and crosses 0.15 on some: a control that flips with --circuits-draws-seed."""
    exp = A.freezing_model("train_O_only")
    law = A.build_law(exp)
    model = control.apply_model(assoc.get(request, exp).model)
    claim.at_least("accuracy", scored_law(control, draws, law).accuracy(logits_of(model)), 0.15,
                   note="chance is 1/N = 0.10")


@HEADS
@pytest.mark.controls("randomise_ov", "reassign_table")
def test_training_W_O_alone_memorises(assoc, request, claim, control):
    exp = A.freezing_model("train_O_only")
    law = A.build_law(exp)
    model = control.apply_model(assoc.get(request, exp).model)
    claim.at_least("accuracy", law.accuracy(logits_of(model)), 0.95,
                   note="H d_h + d = 105 >= N^2 = 100: the construction has enough W_O parameters")


# --- superposition ---------------------------------------------------------------------------------


def _cosines(tv: TargetVectors) -> torch.Tensor:
    v = tv.vectors / tv.vectors.norm(dim=-1, keepdim=True)
    u = tv.unembed / tv.unembed.norm(dim=-1, keepdim=True)
    return (v * u[tv.targets]).sum(-1)


def _low_rank_targets(assoc, request) -> tuple:
    law = A.make_law(A.SUPER_LAW)
    model, card = assoc.low_rank(request, A.SUPER_LAW, 5)
    supp = law.support()
    return law, model, TargetVectors(model.W_E.detach()[supp], model.W_U.detach(), law.targets()[supp])


def _transformer_targets(assoc, request, control) -> tuple:
    exp = A.superposition_model(5)
    loaded = assoc.get(request, exp)
    model = control.apply_model(loaded.model)
    law = A.build_law(exp)
    x = law.contexts()
    with torch.no_grad():
        _, cache = model.run_with_cache(x, names=["blocks.0.hook_resid_post"])
    resid = cache["blocks.0.hook_resid_post"][:, -1].double()  # the vector W_U reads: [N^S, d]
    W_U = model.unembed.W_U.detach().t().double()  # [N, d]
    return law, loaded, TargetVectors(resid, W_U, law.targets())


def _claim_vectors_point_at_targets(claim, control, figures, tv: TargetVectors, name: str, threshold: float,
                                    note: str, figure: tuple) -> None:
    """The superposition claim: the mean cosine between each context's vector and the unembedding
    of its target (bootstrap interval) is at least `threshold`; `figure` = (name, title, caption)."""
    cos = _cosines(control.apply_data(tv))
    claim.at_least(name, claim.sample(cos.numpy(), method="percentile", n_resamples=400), threshold, note=note)
    if control.is_main:
        fig_name, title, caption = figure
        figures.add(fig_name, lambda: F.geometry_figure(tv, cos, title), caption=caption)


@pytest.mark.about(none="the rank-5 optimum's context embeddings: a factorisation W_U W_E, no transformer part to "
                        "mutate; random_vectors destroys the embeddings the claim names")
@pytest.mark.controls("random_vectors", "shuffle_labels")
def test_low_rank_context_embeddings_point_at_their_target(assoc, request, claim, control, figures):
    """About the optimum's context embeddings: replaced by random directions of the same norms (the
    embeddings the claim names, destroyed), or paired with other contexts' targets, they do not point."""
    law, model, tv = _low_rank_targets(assoc, request)
    _claim_vectors_point_at_targets(
        claim, control, figures, tv, "mean cos(w_E(z), w_U(g(z)))", 0.85,
        note="measured 0.92 on the rank-5 optimum; a random direction scores ~0",
        figure=("low-rank geometry", "rank-5 optimum: W_E rows",
                "the seed's superposition cell on the rank-5 optimum of the last-position law: "
                "W_U W_U^T, the context embeddings' Gram (grouped by target) and cos(w_E(z), w_U(g(z)))"))


@HEADS
@pytest.mark.controls("randomise_ov", "ablate_half_heads", "mean_ablate_half_heads", "shuffle_labels")
def test_transformer_residual_points_at_its_target(assoc, request, claim, control, figures):
    """The final residual is e(t_S) + the heads' outputs; what turns it towards the target is the heads'
    part: with their W_V/W_O randomised or half of them removed (or replaced by their mean), it must
    not point at the target."""
    law, loaded, tv = _transformer_targets(assoc, request, control)
    _claim_vectors_point_at_targets(
        claim, control, figures, tv, "mean cos(resid(z), w_U(g(z)))", 0.55,
        note="measured 0.63 on the 5-head model (0.98 with 20 heads)",
        figure=("transformer geometry", "5-head AoT: final residual",
                "the same for the seed's 5-head transformer: its final residual at the last position "
                "(what W_U reads) in place of the context embedding"))


# --- the skip connection ----------------------------------------------------------------------------


@HEADS
@pytest.mark.controls("ablate_half_heads", "mean_ablate_half_heads", "randomise_ov")
def test_dropping_the_residual_connection_does_not_change_memorisation(assoc, request, claim, control, figures):
    """The seed's skip-connection cell. Corollary 2 counts the residual embedding's d dimensions in the
    capacity (H d_h + d), but here they are a small part of it (10 of 110): without the residual the
    heads memorise about as many pairs. Measured: no residual 0.738 / 0.618, residual 0.689 / 0.658
    (seeds 0 / 1): the seeds disagree on the sign, the mean difference is +0.004. Claimed: the mean
    difference is within +-0.05. The controls break the no-residual model's heads only (half removed or
    replaced by their mean, W_V/W_O randomised): its memorisation then differs, so the claim fails."""
    law = A.build_law(A.skip_model(True))
    with_res, without = [], []
    for s in A.SKIP_SEEDS:
        with_res.append(law.accuracy(logits_of(assoc.get(request, A.skip_model(True), s).model)))
        model = control.apply_model(assoc.get(request, A.skip_model(False), s).model)
        without.append(law.accuracy(logits_of(model)))
    diff = float(np.mean(without) - np.mean(with_res))
    claim.close_to("accuracy(no residual) - accuracy(residual)", diff, 0.0, atol=SKIP_TOLERANCE,
                   note=f"no residual {[round(a, 4) for a in without]}, residual {[round(a, 4) for a in with_res]} "
                        f"(seeds {list(A.SKIP_SEEDS)}; {len(law.support())} pairs, N = {law.N})")
    if control.is_main:
        histories = {(r, s): assoc.get(request, A.skip_model(r), s).card.get("history")
                     for r in (True, False) for s in A.SKIP_SEEDS}
        figures.add("skip connection", lambda: F.skip_connection_figure(histories, A.SKIP_SEEDS),
                    caption="accuracy during training, seeds 0 and 1")

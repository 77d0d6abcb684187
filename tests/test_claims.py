"""Unit tests of claims.py, stats.py and controls.py (no pytest plugin involved)."""

import dataclasses
import math
import sys
import types

import numpy as np
import pytest
import torch

from circuits.claims import controls as ctl
from circuits.claims.core import (ClaimDefinitionError, Claims, ClaimValueError, DuplicateClaimError, coerce_value,
                             format_numbers)
from circuits.errors import CircuitsError
from circuits.claims.stats import (Estimate, StatsInputError, auroc, auroc_ci, bootstrap_ci, cohens_d, cohens_d_ci,
                            pearson_ci, spearman, spearman_ci)


def recorder(**kw):
    sink = []
    return Claims(sink.append, **kw), sink


# --- messages and margins -------------------------------------------------------------------------------


def test_at_least_failure_records_then_raises_with_gap():
    c, sink = recorder()
    with pytest.raises(AssertionError) as exc:
        c.at_least("L2H0.open_prop_r", 0.62, 0.9)
    assert str(exc.value) == "L2H0.open_prop_r = 0.62, claim needs >= 0.90 (short by 0.28)"
    (rec,) = sink  # recorded before the assert
    assert rec.passed is False and rec.op == "at_least" and rec.threshold == 0.9
    assert rec.margin == pytest.approx(-0.28) and rec.value == 0.62


def test_close_to_message_states_offset_and_excess():
    c, _ = recorder()
    with pytest.raises(AssertionError, match=r"^x = 1\.3, claim needs 1\.0 ± 0\.1 \(off by 0\.3, 0\.2 beyond tolerance\)$"):
        c.close_to("x", 1.3, 1.0, atol=0.1)
    rec = c.close_to("y", 1.05, 1.0, atol=0.1)
    assert rec.passed and rec.margin == pytest.approx(0.05) and "within tolerance by 0.05" in rec.message
    rec = c.close_to("z", 101.0, 100.0, rtol=0.02)  # tol = 2
    assert rec.passed and rec.tolerance == pytest.approx(2.0) and rec.margin == pytest.approx(1.0)


def test_signed_margins_of_each_op():
    c, _ = recorder(raise_on_failure=False)
    assert c.at_least("a", 0.95, 0.9).margin == pytest.approx(0.05)
    assert c.at_least("a0", 0.9, 0.9).passed  # the boundary passes
    assert c.at_most("b", 0.8, 0.9).margin == pytest.approx(0.1)
    r = c.at_most("b2", 1.2, 0.9, units="nats")
    assert not r.passed and r.margin == pytest.approx(-0.3) and r.message == "b2 = 1.2 nats, claim needs <= 0.9 nats (over by 0.3)"
    r = c.between("c", 0.1, 0.2, 0.8)
    assert not r.passed and r.margin == pytest.approx(-0.1) and "below the low end by 0.1" in r.message
    r = c.between("c2", 0.7, 0.2, 0.8)
    assert r.passed and r.margin == pytest.approx(0.1) and r.requirement == "in [0.2, 0.8]"
    r = c.holds("d", True)
    assert r.passed and r.margin is None and r.requirement == "holds"


def test_holds_accepts_bools_and_rejects_others():
    c, sink = recorder(raise_on_failure=False)
    assert c.holds("t", np.bool_(True)).passed
    assert c.holds("t2", torch.tensor(True)).passed
    r = c.holds("f", False, detail="no head above 0.5")
    assert not r.passed and r.message == "f does not hold: no head above 0.5"
    with pytest.raises(ClaimValueError, match="holds needs a bool, got a float"):
        c.holds("bad", 0.7)
    assert sink[-1].passed is False and sink[-1].problem.startswith("wrong kind")


def test_message_decimals_grow_until_the_gap_shows():
    c, _ = recorder(raise_on_failure=False)
    r = c.at_least("z", 0.8999, 0.9)
    assert r.message == "z = 0.8999, claim needs >= 0.9000 (short by 0.0001)"
    assert format_numbers([1234.5], [1000.0]) == ["1234", "1000"]
    assert format_numbers([3e-7], [1e-6]) == ["3e-07", "1e-06"]


# --- values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.5, 1, np.float32(0.5), np.int64(1), np.float64(0.5), torch.tensor(0.5),
                                   torch.tensor([0.5]), np.array([0.5]), np.array(0.5)])
def test_accepted_scalar_kinds(value):
    v = coerce_value(value)
    assert v.problem is None and v.wrong_kind is None and isinstance(v.point, float)


@pytest.mark.parametrize("value, words", [
    ("0.9", "a str"), (None, "None"), (np.ones(3), "array of shape (3,)"), (torch.ones(2, 2), "tensor of shape (2, 2)"),
    ([0.5, 0.6], "list"), (True, "bool"), (1 + 2j, "complex"), (torch.tensor(True), "bool tensor"),
])
def test_wrong_kinds_are_recorded_failures_and_raise(value, words):
    for raise_on_failure in (True, False):  # also in control runs: a wrong kind is a bug, not a result
        c, sink = recorder(raise_on_failure=raise_on_failure)
        with pytest.raises(ClaimValueError) as exc:
            c.at_least("v", value, 0.5)
        assert words in str(exc.value) and isinstance(exc.value, CircuitsError)
        assert sink[0].passed is False and "wrong kind" in sink[0].problem


@pytest.mark.parametrize("value, problem", [
    (float("nan"), "value is NaN"), (float("inf"), "value is inf"), (-np.inf, "value is -inf"),
    (torch.tensor(float("nan")), "value is NaN"), (np.array([]), "empty array"), (torch.tensor([]), "empty tensor"),
    (Estimate(float("nan"), float("nan"), float("nan"), n=0, problem="empty sample"), "empty sample"),
])
def test_nan_inf_empty_fail_clearly(value, problem):
    c, sink = recorder()
    with pytest.raises(AssertionError, match="cannot pass"):
        c.at_least("v", value, 0.5)
    assert sink[0].passed is False and sink[0].problem == problem and sink[0].margin is None
    c2, _ = recorder(raise_on_failure=False)  # a control run: recorded as failed, no raise
    assert c2.at_most("v", value, 0.5).passed is False


def test_empty_sample_through_claim_sample_is_a_failure():
    c, sink = recorder(raise_on_failure=False)
    rec = c.at_least("empty", c.sample([]), 0.1)
    assert not rec.passed and rec.problem == "empty sample" and "empty sample" in rec.message
    rec = c.at_least("nan", c.sample([1.0, float("nan"), 2.0]), 0.1)
    assert not rec.passed and "NaN" in rec.problem


def test_duplicate_name_is_an_error_and_keeps_the_first_record():
    c, sink = recorder()
    c.at_least("acc", 0.95, 0.9)
    with pytest.raises(DuplicateClaimError, match="'acc' is used twice"):
        c.at_most("acc", 0.1, 0.9)
    assert len(sink) == 1


@pytest.mark.parametrize("call, words", [
    (lambda c: c.at_least("a", 1.0, float("nan")), "threshold must be a finite number, got nan"),
    (lambda c: c.at_least("a", 1.0, "0.9"), "threshold must be a finite number"),
    (lambda c: c.between("a", 1.0, 2.0, 1.0), "lo <= hi"),
    (lambda c: c.close_to("a", 1.0, 1.0), "needs a tolerance"),
    (lambda c: c.close_to("a", 1.0, 1.0, atol=-1), "must be >= 0"),
    (lambda c: c.at_least("", 1.0, 0.5), "non-empty string"),
])
def test_malformed_requirements(call, words):
    c, _ = recorder()
    with pytest.raises(ClaimDefinitionError, match=words.replace("(", r"\(")):
        call(c)


# --- claims over a sample: decided on the interval's bound -----------------------------------------------------


def test_ci_bound_decides_not_the_point_estimate():
    c, _ = recorder(raise_on_failure=False)
    est = Estimate(point=0.95, lo=0.85, hi=0.99, n=50, statistic="mean")
    r = c.at_least("lucky", est, 0.9)  # point passes, lower bound does not
    assert not r.passed and r.bound == 0.85 and r.margin == pytest.approx(-0.05)
    assert r.message == "lucky = 0.95 [95% CI 0.85, 0.99], claim needs >= 0.90 at the CI lower bound (short by 0.05)"
    assert r.ci["lo"] == 0.85 and r.ci["hi"] == 0.99 and r.value == 0.95
    r = c.at_most("upper", est, 0.97)
    assert not r.passed and r.bound == 0.99 and r.margin == pytest.approx(-0.02)
    assert c.at_most("upper_ok", est, 1.0).passed
    r = c.close_to("close", est, 0.92, atol=0.05)  # the far end 0.85 is 0.07 off
    assert not r.passed and r.margin == pytest.approx(-0.02)
    r = c.between("in", est, 0.8, 1.0)
    assert r.passed and r.margin == pytest.approx(0.01)


def test_claim_sample_bootstrap_is_reproducible_and_paired():
    c, _ = recorder(raise_on_failure=False)
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    y = x + rng.normal(size=200)
    e1, e2 = c.sample(x), c.sample(x)
    assert e1 == e2 and e1.lo < e1.point < e1.hi and e1.statistic == "mean"
    r = c.sample((x, y), statistic=spearman, paired=True)
    assert r == spearman_ci(x, y)
    rec = c.at_least("rho", r, 0.5)
    assert rec.passed and rec.bound == r.lo


# --- stats --------------------------------------------------------------------------------------------------


def test_bootstrap_ci_covers_the_mean_and_handles_degenerate_samples():
    rng = np.random.default_rng(1)
    e = bootstrap_ci(rng.normal(3.0, 1.0, size=400))
    # the mean of one sample gets the studentized interval whatever was asked (issue 30: calibrated)
    assert e.lo < 3.0 < e.hi and e.hi - e.lo < 0.4 and e.method == "studentized" and e.n == 400
    assert bootstrap_ci(rng.normal(size=100), method="percentile").method == "studentized"
    assert bootstrap_ci(rng.normal(size=100), np.median, method="percentile").method == "percentile"
    assert bootstrap_ci(rng.normal(size=100), np.median).method == "BCa"
    const = bootstrap_ci([2.0] * 10)
    assert const.ok and const.lo == const.hi == 2.0
    assert bootstrap_ci([]).problem == "empty sample"
    assert "size 1" in bootstrap_ci([1.0]).problem
    assert bootstrap_ci(torch.arange(10.0)).point == pytest.approx(4.5)


def test_bootstrap_ci_rejects_bad_arguments():
    with pytest.raises(StatsInputError, match="equal lengths"):
        bootstrap_ci(([1, 2, 3], [1, 2]), spearman, paired=True)
    with pytest.raises(StatsInputError, match="level"):
        bootstrap_ci([1, 2, 3], level=95)
    with pytest.raises(StatsInputError, match="sequence of numbers"):
        bootstrap_ci("abc")
    with pytest.raises(StatsInputError, match="1-D"):
        bootstrap_ci(np.ones((3, 3)))


def test_correlation_cis():
    rng = np.random.default_rng(2)
    x = rng.normal(size=300)
    y = x + 0.5 * rng.normal(size=300)
    from scipy.stats import pearsonr, spearmanr

    s, p = spearman_ci(x, y), pearson_ci(x, y)
    assert s.point == pytest.approx(spearmanr(x, y).statistic) and s.lo < s.point < s.hi
    assert p.point == pytest.approx(pearsonr(x, y).statistic) and p.lo < p.point < p.hi
    undefined = spearman_ci([1, 1, 1, 1], [1, 2, 3, 4])
    assert not undefined.ok and "undefined" in undefined.problem


def test_effect_sizes():
    a, b = np.array([2.0, 4.0, 6.0]), np.array([1.0, 2.0, 3.0])
    assert cohens_d(a, b) == pytest.approx(2.0 / math.sqrt(2.5))
    assert auroc([3, 4, 5], [0, 1, 2]) == 1.0 and auroc([1, 2], [1, 2]) == 0.5
    assert math.isnan(auroc([], [1.0]))
    rng = np.random.default_rng(3)
    pos, neg = rng.normal(1, 1, 150), rng.normal(0, 1, 120)
    e = auroc_ci(pos, neg)
    assert e.point == pytest.approx(auroc(pos, neg)) and e.lo < e.point < e.hi
    d = cohens_d_ci(pos, neg)
    assert d.point == pytest.approx(cohens_d(pos, neg)) and d.lo < d.point < d.hi


# --- controls ---------------------------------------------------------------------------------------------


def test_parse_specs_heads_and_layers():
    assert ctl.parse_spec("zero_ablate:L2H0, L1H3") == ("zero_ablate", ("L2H0", "L1H3"))
    assert ctl.parse_spec("untrained") == ("untrained", ())
    assert ctl.parse_head("L2H0") == (2, 0) and ctl.parse_layer("L12") == 12
    with pytest.raises(ctl.ControlError, match="'L2H'"):
        ctl.parse_head("L2H")
    with pytest.raises(ctl.UnknownControlError) as exc:
        ctl.parse_spec("nope:L1H1")
    assert "known controls:" in str(exc.value) and "untrained" in str(exc.value)
    with pytest.raises(ctl.ControlError, match="empty argument"):
        ctl.parse_spec("zero_ablate:L1H1,")


def test_register_control_rules():
    def double(x, seed=0):
        return [v * 2 for v in x]

    ctl.register_control("t_double", kind="data", fn=double)
    ctl.register_control("t_double", kind="data", fn=double)  # the same function again: fine (re-import)
    with pytest.raises(ctl.ControlError, match="already registered"):
        ctl.register_control("t_double", kind="data", fn=lambda x, seed=0: x)
    with pytest.raises(ctl.ControlError, match="kind must be"):
        ctl.register_control("t_bad", kind="weights", fn=double)
    with pytest.raises(ctl.ControlError, match="other than 'main'"):
        ctl.register_control("main", kind="data", fn=double)
    c = ctl.make_control("t_double", seed=3)
    data = [1, 2]
    assert c.apply_model("model") == "model" and c.applied == 0  # not its kind: identity
    assert c.apply_data(data) == [2, 4] and c.applied == 1 and data == [1, 2]
    main = ctl.main_control()
    assert main.is_main and main.apply_model(data) is data and main.apply_data(data) is data


def test_head_args_resolve_from_roles_and_a_control_must_return_a_new_object():
    seen = []

    def ablate(model, *heads, seed=0):
        seen.append((heads, seed))
        return dict(model)

    ctl.register_control("t_ablate", kind="model", fn=ablate, head_args=True, replace=True)
    c = ctl.make_control("t_ablate:L1H2,count_head", seed=7, roles=lambda: {"count_head": (2, 0)})
    c.apply_model({})
    assert seen == [(((1, 2), (2, 0)), 7)]
    bad = ctl.make_control("t_ablate:nohead", roles=lambda: {"count_head": (2, 0)})
    with pytest.raises(ctl.ControlError, match="neither a head like 'L2H0' nor a role.*count_head"):
        bad.apply_model({})
    with pytest.raises(ctl.ControlError, match="needs at least one head"):
        ctl.make_control("t_ablate")
    ctl.register_control("t_same", kind="model", fn=lambda m, seed=0: m, replace=True)
    with pytest.raises(ctl.ControlError, match="returned its input"):
        ctl.make_control("t_same").apply_model(object())


@dataclasses.dataclass
class Labelled:
    labels: list


def test_builtin_controls_call_interventions(monkeypatch):
    calls = []
    fake = types.ModuleType("circuits.analysis.interventions")
    fake.reinitialize = lambda m, seed: calls.append(("reinit", seed)) or "fresh"
    fake.zero_ablate_head = lambda m, layer, head: calls.append(("zero", layer, head)) or f"{m}+z{layer}{head}"
    fake.permute_heads = lambda m, layer, seed: calls.append(("perm", layer, seed)) or "permuted"
    fake.shuffle_labels = lambda d, seed: calls.append(("shuffle", seed)) or "shuffled"
    fake.LABEL_FIELDS = ("labels",)
    monkeypatch.setitem(sys.modules, "circuits.analysis.interventions", fake)
    import circuits.analysis

    monkeypatch.setattr(circuits.analysis, "interventions", fake, raising=False)

    class Ours:  # what 'untrained' re-initialises with the model's own scheme
        cfg = None

        def init_weights(self, seed):
            pass

    assert ctl.make_control("untrained", seed=4).apply_model(Ours()) == "fresh"
    assert ctl.make_control("zero_ablate:L2H0,L1H1").apply_model("m") == "m+z20+z11"
    assert ctl.make_control("permute_heads:L2", seed=1).apply_model("m") == "permuted"
    assert ctl.make_control("shuffle_labels", seed=2).apply_data(Labelled([1, 2])) == "shuffled"
    assert ctl.make_control("shuffle_labels", seed=2).apply_data("not a dataset") == "not a dataset"
    assert calls == [("reinit", 4), ("zero", 2, 0), ("zero", 1, 1), ("perm", 2, 1), ("shuffle", 2)]


def test_large_samples_use_the_percentile_interval_which_agrees_with_bca():
    from circuits.claims.stats import BCA_MAX_N, bootstrap_ci

    def mean_(x, axis=-1):  # a mean that is not np.mean: bootstrap_ci's studentized interval is np.mean's
        return np.mean(x, axis=axis)

    x = np.random.default_rng(0).exponential(size=BCA_MAX_N + 1)
    large = bootstrap_ci(x, mean_, n_resamples=500)
    bca = bootstrap_ci(x[:BCA_MAX_N], mean_, n_resamples=500)
    assert large.method == "percentile" and bca.method == "BCa"
    assert abs(large.lo - bca.lo) < 0.02 and abs(large.hi - bca.hi) < 0.02
    studentized = bootstrap_ci(x, np.mean, n_resamples=500)  # at this n all three agree
    assert studentized.method == "studentized"
    assert abs(large.lo - studentized.lo) < 0.02 and abs(large.hi - studentized.hi) < 0.02


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("n", [50, 3000])
def test_own_percentile_bootstrap_equals_scipys(paired, n):
    """bootstrap_ci draws percentile intervals itself (faster): the same resamples as
    scipy.stats.bootstrap, so its interval to float rounding, for one and two samples, paired or
    not, across batches."""
    import numpy as np
    from scipy import stats as st

    from circuits.claims.stats import _percentile_interval, pearson

    g = np.random.default_rng(3)
    x = g.normal(size=n)
    y = x + g.normal(size=n) if paired else g.normal(size=n + 7)
    def mean_gap(a, b, axis=-1):
        return np.mean(a, axis=axis) - np.mean(b, axis=axis)

    two = ((x, y[:n]), pearson) if paired else ((x, y), mean_gap)
    for data, stat in [((x,), np.mean), two]:
        ref = st.bootstrap(data, stat, paired=paired, method="percentile", n_resamples=300, batch=64,
                           rng=np.random.default_rng(5))
        lo, hi, dist = _percentile_interval(list(data), stat, paired, 0.95, 300, 5, 64)
        np.testing.assert_array_equal(dist, ref.bootstrap_distribution)  # the very same resamples
        np.testing.assert_allclose([lo, hi], [ref.confidence_interval.low, ref.confidence_interval.high],
                                   rtol=1e-12, atol=1e-15)  # scipy interpolates its percentiles itself


def test_apply_labels_routes_labels_through_data_controls_without_a_carrier():
    labels = torch.arange(10)
    assert ctl.main_control().apply_labels(labels) is labels
    shuffled = ctl.make_control("shuffle_labels", seed=3).apply_labels(labels)
    assert sorted(shuffled.tolist()) == list(range(10)) and not torch.equal(shuffled, labels)
    # the same permutation as a dataclass with a labels field would get
    assert torch.equal(shuffled, ctl.make_control("shuffle_labels", seed=3).apply_data(Labelled(labels)).labels)


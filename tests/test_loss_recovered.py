"""Loss recovered with no loss gap: the one rule (circuits.analysis.measures.loss_recovered_ci).

(baseline - patched) / (baseline - clean) is 0/0 when the baseline intervention changes nothing. The
library's rule: elementwise, NaN wherever the gap is below LOSS_GAP_ATOL in size (0 included); for a
claim, an Estimate that is ``undefined`` (no ``problem``), so the claim fails as measured, with the
baseline, clean and patched losses in its message, on a main run and on a control run alike. Never a
number that could pass, never a NaN "nothing was measured" error.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from circuits.analysis import measures as A
from circuits.claims.core import ClaimFailure, Claims
from circuits.claims.draws import Draws
from circuits.claims.controls import main_control
from circuits.claims.stats import bootstrap_ci
from circuits.model.transformer import HookedTransformer, TransformerConfig
from circuits.plugin.session import control_error_kind, judge_control
from circuits.tasks.brackets import data as B

BOOT = dict(paired=True, method="percentile", n_resamples=300, seed=3)


def _losses(n=40, seed=0):
    g = np.random.default_rng(seed)
    clean = 0.1 + 0.05 * g.random(n)
    baseline = clean + 0.5 + 0.2 * g.random(n)
    patched = clean + 0.3 * (baseline - clean)
    return patched, clean, baseline


@pytest.mark.parametrize("gap, defined", [(0.0, False), (5e-13, False), (-5e-13, False), (-0.0, False),
                                          (np.inf, False), (np.nan, False), (2e-12, True), (-2e-12, True),
                                          (0.3, True)])
def test_loss_recovered_elementwise_is_nan_exactly_where_the_gap_is_not_defined(gap, defined):
    clean = 0.25
    baseline = clean + gap
    assert A.loss_gap_defined(clean, baseline) is defined
    value = A.loss_recovered(clean, clean, baseline)  # patched = clean: 1 wherever it is defined
    assert (value == 1.0) if defined else np.isnan(value)
    assert (A.undefined_loss_gap(clean, baseline) is None) == defined


def test_loss_gap_defined_and_loss_recovered_agree_elementwise_on_arrays():
    clean = np.zeros(6)
    baseline = np.array([0.0, 1e-13, -1e-13, 1e-12, -1e-12, 0.5])
    ok = A.loss_gap_defined(clean, baseline)
    np.testing.assert_array_equal(ok, [False, False, False, True, True, True])
    out = A.loss_recovered(np.zeros(6), clean, baseline)
    np.testing.assert_array_equal(np.isnan(out), ~ok)


@pytest.mark.parametrize("offset", [0.0, 4e-13, -4e-13])
def test_loss_recovered_ci_of_a_zero_or_sub_tolerance_gap_is_undefined_and_names_the_losses(offset):
    patched, clean, _ = _losses()
    baseline = clean + offset  # the baseline intervention changes nothing (to below 1e-12 on the mean)
    est = A.loss_recovered_ci((patched, clean, baseline), **BOOT)
    assert est.undefined and est.problem is None and not est.ok
    assert np.isnan(est.point) and np.isnan(est.lo) and np.isnan(est.hi)
    assert est.n == len(clean) and est.statistic == "loss_recovered"
    text = est.undefined
    assert f"baseline {baseline.mean():.6g}" in text and f"clean {clean.mean():.6g}" in text
    assert f"patched {patched.mean():.6g}" in text
    assert ("equals the clean loss" in text) if offset == 0 else ("below 1e-12" in text)


def test_loss_recovered_ci_names_labelled_patched_losses_and_any_statistic():
    patched, clean, _ = _losses()
    other = patched + 0.01

    def contrast(a, b, c, base, axis=-1):
        return A.loss_recovered(a, c, base, axis=axis) - A.loss_recovered(b, c, base, axis=axis)

    est = A.loss_recovered_ci((patched, other, clean, clean), contrast, clean=clean, baseline=clean,
                              patched={"count": patched, "horizon": other}, name="count - horizon", **BOOT)
    assert est.undefined and est.statistic == "count - horizon"
    assert f"count {patched.mean():.6g}" in est.undefined and f"horizon {other.mean():.6g}" in est.undefined
    with pytest.raises(Exception, match="clean= and baseline="):
        A.loss_recovered_ci((patched, other, clean, clean), contrast, **BOOT)


def test_loss_recovered_ci_with_a_gap_is_the_bootstrap_interval_unchanged():
    patched, clean, baseline = _losses()
    est = A.loss_recovered_ci((patched, clean, baseline), **BOOT)
    ref = bootstrap_ci((patched, clean, baseline), A.loss_recovered, **BOOT)
    assert est == ref and est.ok and est.undefined is None
    assert est.point == pytest.approx(0.7)


def test_a_gap_on_too_few_examples_for_every_resample_is_undefined_too():
    """The sample's gap is defined but most resamples leave out the one example that has one: the
    fraction has no bounded interval, which the same rule reports (not a NaN interval error)."""
    clean = np.full(30, 0.2)
    baseline = clean.copy()
    baseline[0] += 1.0
    est = A.loss_recovered_ci((clean, clean, baseline), **BOOT)
    assert np.isfinite(est.point) and est.undefined and est.problem is None
    assert "some bootstrap resamples (1 of 30 examples have a gap)" in est.undefined


@pytest.mark.parametrize("op, args", [("at_least", (0.8,)), ("at_most", (-0.5,)), ("close_to", (1.0,)),
                                      ("between", (-1.0, 2.0))])
def test_a_claim_on_an_undefined_loss_recovered_fails_as_measured_with_the_losses(op, args):
    patched, clean, _ = _losses()
    est = A.loss_recovered_ci((patched, clean, clean), **BOOT)
    kwargs = {"atol": 10.0} if op == "close_to" else {}
    main = Claims()
    with pytest.raises(ClaimFailure, match="is undefined .*baseline .*clean .*patched"):
        getattr(main, op)("kept", est, *args, **kwargs)
    rec = main.records[0]
    assert not rec.passed and rec.problem is None and rec.value is None and rec.value_text == "undefined"
    assert rec.extra["undefined"] == est.undefined and "meets no requirement" in rec.message


def test_a_control_whose_loss_recovered_is_undefined_is_ok_and_a_nan_one_still_an_error():
    """swap_roles rebinding the count head to a head whose resampled input changes nothing: its claims
    fail as measured, so the control did its job ("ok"); a bare NaN is still "nothing measured"."""
    patched, clean, _ = _losses()
    ctl = SimpleNamespace(spec="swap_roles", applied=True, kind="data")
    claims = Claims(raise_on_failure=False, control="swap_roles")
    claims.at_least("contrast", A.loss_recovered_ci((patched, clean, clean), **BOOT), 0.05)
    claims.at_most("horizon only", A.loss_recovered_ci((patched, clean, clean), **BOOT), -0.5)
    outcome, message = judge_control(claims.records, ctl)
    assert outcome == "ok" and control_error_kind(claims.records, ctl) is None
    assert "undefined" in message
    nan = Claims(raise_on_failure=False, control="swap_roles")
    nan.at_least("contrast", float(A.loss_recovered(0.2, 0.2, 0.2)), 0.05)
    assert judge_control(nan.records, ctl)[0] == "error"


CFG = TransformerConfig(n_layers=2, d_model=24, n_ctx=B.N_CTX, n_heads=2, d_mlp=32, d_vocab=B.VOCAB,
                        d_vocab_out=2, pad_token=B.PAD, positional="learned", readout="first", seed=0)


@pytest.fixture(scope="module")
def bracket_subject():
    from circuits.tasks.brackets.subjects import BracketSubject

    torch.manual_seed(0)
    model = HookedTransformer(CFG).eval()
    data = B.generate(1500, 5)
    return lambda head: BracketSubject("t", model, {"count_head": head, "negative_head": (1, 1)}, data, "", {})


def test_resampling_a_layer0_heads_position1_input_leaves_no_gap_and_every_fraction_undefined(bracket_subject):
    """The CI case (brackets seed 1: negative head L0H1, so swap_roles resamples a layer-0 head): at
    layer 0, position 1 of every string starting with "(" holds the same token, so the resampled key
    and value equal the clean ones and the random baseline's loss IS the clean loss. Every fraction
    is undefined, naming the losses; a layer-1 head's input does vary, so its gap is defined."""
    from circuits.tasks.brackets.subjects import resample_count_head

    out = resample_count_head(bracket_subject((0, 1)), main_control(), Draws(13), 2)
    for kind in ("count", "horizon", "horizon only", "count - horizon"):
        assert out[kind].undefined and out[kind].problem is None, kind
        assert "equals the clean loss" in out[kind].undefined
    assert "count " in out["count - horizon"].undefined and "horizon " in out["count - horizon"].undefined
    defined = resample_count_head(bracket_subject((1, 0)), main_control(), Draws(13), 2)
    assert all(defined[k].undefined is None and np.isfinite(defined[k].point) for k in ("count", "horizon"))


def test_scrubbing_fractions_follow_the_same_rule_when_there_is_no_loss_gap():
    """scrub_result's recovered (1 - scrubbed / baseline: gap = the baseline loss) and normalised
    (gap = baseline - clean) use loss_recovered_ci: a model whose random-input baseline loses nothing
    more than it does gets undefined fractions, and the scrubbing claims fail as measured."""
    from circuits.analysis.scrub import scrub_beats_variants_claim, scrub_claim, scrub_holds_claim, scrub_result

    flat = np.full((3, 12), 0.4)
    r = scrub_result("h", 0.4, flat, flat)  # baseline loss = clean loss: normalised undefined
    # the means differ by rounding only (5.6e-17): below the tolerance, the same outcome as an exact 0
    assert r.normalised.undefined and "baseline 0.4, clean 0.4, scrubbed 0.4" in r.normalised.undefined
    assert r.recovered.ok  # 1 - 0.4 / 0.4 = 0 is defined: the gap from a perfect model is 0.4
    zero = scrub_result("z", 0.0, np.zeros((3, 12)), np.zeros((3, 12)))  # a baseline loss of 0
    assert zero.recovered.undefined and zero.normalised.undefined
    claims = Claims(raise_on_failure=False, control="some_control")
    scrub_claim(claims, "z", zero, 0.85)
    scrub_holds_claim(claims, "zh", zero, 0.85, lambda: pytest.fail("no variant is scrubbed without a gap"), 0.05)
    scrub_beats_variants_claim(claims, "zb", zero, [scrub_result("v", 0.0, np.zeros((3, 12)), np.zeros((3, 12)))],
                               0.05)
    assert len(claims.records) == 3
    assert all(not c.passed and c.problem is None and c.value_text == "undefined" for c in claims.records)
    ctl = SimpleNamespace(spec="some_control", applied=True, kind="data")
    assert judge_control(claims.records, ctl)[0] == "ok"

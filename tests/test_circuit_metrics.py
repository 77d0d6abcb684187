"""Every circuit metric against its formula, on the hand-weighted model whose only path is known
(`circuits.tasks.known_circuit`: tok -> L0H0.v -> L1H0.v -> logits, every other edge has zero effect)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from circuits.claims import circuit as CC
from circuits.analysis import discovery as D
from circuits.tasks import known_circuit as K
from circuits.analysis.circuit import Ablation, Circuit, CircuitError, Graph
from circuits.claims.core import ClaimFailure, Claims

ABLATIONS = {"zero": lambda ref: Ablation.zero(), "mean": Ablation.mean, "resample": Ablation.resample}


@pytest.fixture(scope="module", params=sorted(ABLATIONS))
def setup(request):
    model = K.build(torch.float64)
    x, ref = K.make_inputs(300, 0), K.make_inputs(300, 1)
    ev = CC.Evaluator(model, x, K.labels(x), ABLATIONS[request.param](ref))
    return model, x, ev, Circuit.from_names(model, K.TRUE_EDGES, "true path")


def test_faithfulness_formula(setup):
    model, x, ev, true = setup
    n, e = ev.full(), ev.empty()
    half = true.without("L1H0 -> logits")
    for c, want in ((true, 1.0), (half, 0.0), (true.complement(), 0.0), (Circuit.full(model), 1.0)):
        est = CC.faithfulness(ev, c)
        assert est.point == pytest.approx((ev.values(c).mean() - e.mean()) / (n.mean() - e.mean()), abs=1e-12)
        assert est.point == pytest.approx(want, abs=1e-9) and est.lo <= est.point <= est.hi


def test_faithfulness_is_the_ratio_on_a_known_mix(setup):
    """Against the reference model: a model whose path is scaled by 0.5 (W_U halved; no biases, so
    the empty circuit's logits are 0 in both) recovers exactly half under zero ablation."""
    model, x, ev, true = setup
    if ev.ablation.kind != "zero":
        pytest.skip("the halved model's empty circuit differs from the reference's only under zero ablation")
    halved = K.build(torch.float64)
    with torch.no_grad():
        halved.unembed.W_U.mul_(0.5)
    ev_half = CC.Evaluator(halved, x, ev.labels, ev.ablation)
    est = CC.faithfulness(ev_half, true, reference=ev)
    want = (ev_half.values(true).mean() - ev.empty().mean()) / (ev.full().mean() - ev.empty().mean())
    assert est.point == pytest.approx(want, abs=1e-12)
    assert est.point == pytest.approx(0.5, abs=1e-12)


def test_mib_curve_cpr_cmd_by_hand(setup):
    """True edges ranked first: C_k holds the whole path from 3 edges on, so f(C_k) = 0 for
    k = 0.1..5% (0, 0, 0, 0, 1, 2 edges of 42) and 1 from 10% (4 edges). Trapezoids over the
    fractions: CPR = (0.1 - 0.05) / 2 + (1 - 0.1) = 0.925, CMD = (0.05 - 0.001) + 0.025 = 0.074.
    Ranked last: f = 1 only at 100%, CPR = (1 - 0.5) / 2 = 0.25, CMD = 0.999 - 0.25 = 0.749."""
    model, x, ev, true = setup
    graph = ev.graph
    inside = torch.tensor([float(e in true.edges) for e in graph.edges], dtype=torch.float64)
    first = CC.mib_curve(ev, inside + 1e-3 * torch.arange(len(graph.edges)).flip(0) / len(graph.edges), n_resamples=200)
    assert first.sizes == [0, 0, 0, 0, 1, 2, 4, 8, 21, 42]
    assert np.allclose(first.f, [0, 0, 0, 0, 0, 0, 1, 1, 1, 1], atol=1e-9)
    assert first.cpr.point == pytest.approx(0.925, abs=1e-9) and first.cmd.point == pytest.approx(0.074, abs=1e-9)
    last = CC.mib_curve(ev, 1 - inside, n_resamples=200)
    assert last.cpr.point == pytest.approx(0.25, abs=1e-9) and last.cmd.point == pytest.approx(0.749, abs=1e-9)
    fr = np.array(CC.MIB_PERCENTS) / 100
    assert CC.cpr_stat(first.f, fr) == pytest.approx(0.925) and CC.cmd_stat(last.f, fr) == pytest.approx(0.749)
    assert CC.cpr_stat(np.ones(10), fr) == pytest.approx(0.999)  # the area's span: 0.001 .. 1


def test_completeness_equivalence_and_claims(setup):
    model, x, ev, true = setup
    claim = Claims(draws_seed=0)
    CC.claim_faithfulness(claim, ev, true, at_least=0.95)
    CC.claim_completeness(claim, ev, true, at_most=0.05)
    CC.claim_equivalence(claim, ev, true, eps=0.05)
    assert all(r.passed for r in claim.records) and "true path" in claim.records[0].note
    with pytest.raises(ClaimFailure, match="faithfulness of broken = -?0"):
        CC.claim_faithfulness(claim, ev, Circuit(ev.graph, true.without("L0H0 -> L1H0.v").edges, "broken"), 0.95)
    with pytest.raises(ClaimFailure, match="complement"):  # the complement of a circuit missing the path has it
        CC.claim_completeness(claim, ev, Circuit.from_names(model, ["L0H1 -> logits"], "decoy"), at_most=0.05)


def test_holm_by_hand():
    # sorted p: 0.01 (x4 = 0.04), 0.02 (x3 = 0.06), 0.03 (x2 = 0.06), 0.5 (x1) -> monotone
    assert np.allclose(CC.holm([0.03, 0.01, 0.5, 0.02]), [0.06, 0.04, 0.5, 0.06])
    assert np.allclose(CC.holm([0.9, 0.8]), [1.0, 1.0])


def test_minimality_finds_the_unnecessary_edge(setup):
    model, x, ev, true = setup
    res = CC.minimality(ev, true, n_random=20)
    assert res.tau == pytest.approx(0.0, abs=1e-9)  # random edges do nothing
    assert np.all(res.p_holm < 1e-6) and not res.not_necessary
    padded = true.union(Circuit.from_names(model, ["tok -> L1H1.v"], "decoy"), "true path + decoy")
    res = CC.minimality(ev, padded, n_random=20)
    assert res.not_necessary == ["tok -> L1H1.v"]
    claim = Claims(draws_seed=0)
    CC.claim_minimality(claim, ev, true)
    with pytest.raises(ClaimFailure, match="minimality with a decoy = 1"):
        CC.claim_minimality(claim, ev, padded, name="minimality with a decoy")


def test_sufficiency_against_random_circuits(setup):
    model, x, ev, true = setup
    res = CC.sufficiency(ev, true, n_random=60)
    assert res.f_circuit == pytest.approx(1.0) and np.all(res.f_random < 0.5)
    assert res.share_beaten.point == 1.0 and res.share_beaten.lo == pytest.approx(0.025 ** (1 / 60))  # two-sided CP lower bound at k = n
    decoy = Circuit.from_names(model, ["L0H1 -> logits", "tok -> logits", "pos -> logits"], "decoy")
    claim = Claims(draws_seed=0)
    with pytest.raises(ClaimFailure, match="share of random 3-edge circuits decoy beats"):
        CC.claim_sufficiency(claim, ev, decoy, at_least=0.9, n_random=60)


def test_attribution_is_exact_on_a_linear_model(setup):
    """Linear in every edge: EAP's score of an edge is its exact single-edge patching effect, and
    EAP-IG's equals EAP's."""
    model, x, ev, true = setup
    full = ev.full().mean()
    exact = torch.tensor([abs(full - ev.values(Circuit.full(model).without(e)).mean()) for e in ev.graph.edges])
    eap, ig = D.eap(ev, k=3), D.eap_ig(ev, steps=3, k=3)
    assert torch.allclose(eap.scores, exact, atol=1e-9) and torch.allclose(ig.scores, exact, atol=1e-9)
    assert eap.circuit.edges == true.edges == ig.circuit.edges
    acdc = D.acdc(ev, tau=0.01)
    assert acdc.circuit.edges == true.edges
    for found in (eap, ig, acdc):
        assert D.edge_auroc(found.scores, true) == 1.0


def test_edge_auroc_by_hand():
    graph = Graph.of(K.build())
    true = Circuit.from_names(graph, K.TRUE_EDGES)
    scores = torch.zeros(len(graph.edges))
    idx = [graph.edge_index[e] for e in true.sorted_edges()]
    scores[idx[0]] = 2.0  # one true edge on top, two tied with the 39 others: (39 + 2 * 39 / 2) / (3 * 39)
    assert D.edge_auroc(scores, true) == pytest.approx((39 + 2 * 19.5) / (3 * 39))
    with pytest.raises(CircuitError, match="some but not all"):
        D.edge_auroc(scores, Circuit.full(graph))


def test_metric_without_signal_is_an_error():
    model = K.build(torch.float64)
    x = K.make_inputs(50, 0)
    ev = CC.Evaluator(model, x, K.labels(x), Ablation.mean(x), lambda logits, labels: torch.zeros(logits.shape[0], dtype=logits.dtype))
    with pytest.raises(CircuitError, match="faithfulness is undefined"):
        CC.faithfulness(ev, Circuit.full(model))


def test_about_targets_from_names():
    assert CC.about(["0.0 -> L1H0.v", "MLP0 -> logits", "L2.mlp -> logits", "tok -> 2.1.q"]) == [
        "head:L0H0", "head:L1H0", "mlp:L0", "mlp:L2", "head:L2H1"]


def test_curve_figure(setup):
    model, x, ev, true = setup
    inside = torch.tensor([float(e in true.edges) for e in ev.graph.edges])
    fig = CC.curve_figure([CC.mib_curve(ev, inside, method="truth", n_resamples=50)], "known path")
    assert fig.axes[0].get_xscale() == "log" and "truth: CPR" in fig.axes[0].get_legend().get_texts()[0].get_text()

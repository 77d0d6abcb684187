"""Hypothesis: Redwood's bracket circuit, stated as an edge-level circuit of the published ARENA
checkpoint, is faithful in MIB's sense, and the field's discovery methods rank its edges.

Redwood's account ("Causal Scrubbing: Results on a Paren Balance Checker"; ARENA's bracket
classifier): head 0.0 computes the proportion of open brackets at each position from the tokens;
MLP0 and MLP1 turn it into the elevation tests; heads 1.0 and 2.0 carry the count test from
position 1 to the read-out at position 0 and 2.1 carries the horizon test ("never below zero");
the three write the logits. As a circuit: every edge among {tok, 0.0, MLP0, MLP1, 1.0, 2.0, 2.1}
and the logits (55 of the model's 122 edges; positions are sinusoidal and the same in every
string, so under mean ablation a ``pos`` edge carries what its ablated value does and is left out).

Metric: the logit margin (right class minus wrong) at position 0; every edge outside the circuit is
mean-ablated over a fixed reference set (the published strings 4,000-4,499); claims are scored on
strings 0-299 (the circuit was written down, not searched); discovery runs on strings 1,000-1,299.

* Faithfulness f(C) = (m(C) - m(∅)) / (m(N) - m(∅)) >= 0.95 on the bootstrap lower bound. The bar
  sits between the hypothesis and its best wrong variant (scripts/circuit_tables.py, strings 0-299):
  the circuit 0.986 [0.974, 0.995]; 1.0 replaced by 1.1 0.935 [0.912, 0.956]; without 1.0 0.908
  [0.886, 0.928]; 0.0 replaced by 0.1 0.653; without 2.1 0.349. m(N) and m(∅) are the unmutated
  model's, so a mutation of a part the circuit names lowers f. 2.0 and 2.1 are both in the circuit,
  so swapping them keeps its function: they are ``ov:`` targets (zero / mean ablation), 0.0 and 1.0 ``head:``
  targets (their siblings are outside). The ``circuit_without:X`` controls point the claim at the
  circuit without a part.
* Completeness: the complement (the 67 other edges) keeps f <= 0.25; pointed at the circuit without
  2.1, the complement keeps the horizon path and f rises (0.318 [0.222, 0.405]).
* Sufficiency: the circuit beats >= 80% of random 55-edge circuits (Clopper-Pearson lower bound
  over 20 draws: 0.83 when it beats all of them).
* MIB: EAP and EAP-IG rankings found on the discovery split give CPR above and CMD below the best
  uninformed ranking's (intervals separated), scored on the claim split; their curves are a figure.
  Uninformed: a random ranking, and EAP / EAP-IG run on the untrained model (near-constant scores
  tie, and ties fall back to edge order, which already beats a random order). The control: the
  method's ranking found on the untrained model, scored on the checkpoint, must not pass.
"""

from __future__ import annotations

import pytest
import torch

from circuits.claims import circuit as CC
from circuits.analysis import discovery as D
from circuits.analysis.circuit import Ablation, Circuit

KNOWN_FAILURES = {
    "test_discovered_ranking_beats_uninformed_rankings[EAP]":
        "the hypothesis: EAP's edge ranking of the ARENA checkpoint beats uninformed rankings in CPR; plain EAP "
        "(one gradient at the clean run) reaches CPR 0.689 [0.642, 0.730], level with EAP-IG on the untrained "
        "model (0.70: ties in edge order) - its first-order estimate misranks the edges of the saturated heads; "
        "EAP-IG passes (0.808)",
    # the derived alternatives of a head in layer 2 swap 2.0 with 2.1, and Redwood's circuit holds both with
    # the same edges: the swap maps the circuit onto itself (the same function), so it cannot tell them apart
    # (one key per swap: its MLP alternatives, MLP0 or MLP1 moved to another layer, fail as required: 0.87-0.90)
    "test_redwood_circuit_is_faithful alternative=swap_with:L2H0,L2H1":
        "swap_with:L2H0,L2H1 exchanges two heads that are both in the circuit: faithfulness 0.986 there too "
        "(needs >= 0.95), as it must for the same circuit",
    "test_redwood_circuit_is_faithful alternative=swap_with:L2H1,L2H0":
        "swap_with:L2H1,L2H0 exchanges two heads that are both in the circuit: faithfulness 0.986 there too "
        "(needs >= 0.95), as it must for the same circuit",
    "test_redwood_circuit_beats_random_circuits unspecific":
        "swap_with:L2H1,L2H0 exchanges two heads that are both in the circuit: it beats 1.000 of random "
        "55-edge circuits there too (needs >= 0.80)",
}
REDWOOD_NODES = ("tok", "L0H0", "MLP0", "MLP1", "L1H0", "L2H0", "L2H1")
REDWOOD_ABOUT = ["head:L0H0", "head:L1H0", "ov:L2H0", "ov:L2H1", "mlp:L0", "mlp:L1"]
CLAIM_ROWS, DISCOVERY_ROWS, REFERENCE_ROWS = slice(0, 300), slice(1000, 1300), slice(4000, 4500)


def _evaluator(model, bracket_data, rows):
    return CC.Evaluator(model, bracket_data.toks[rows], bracket_data.isbal[rows].long(),
                        Ablation.mean(bracket_data.toks[REFERENCE_ROWS]))


@pytest.fixture(scope="module")
def reference_eval(arena_model, bracket_data):
    """The unmutated checkpoint on the claim split: m(N) and m(∅) of every faithfulness claim."""
    return _evaluator(arena_model, bracket_data, CLAIM_ROWS)


@pytest.fixture
def claim_eval(arena_model, bracket_data, control, reference_eval):
    model = control.apply_model(arena_model)
    return reference_eval if model is arena_model else _evaluator(model, bracket_data, CLAIM_ROWS)


@pytest.fixture
def redwood(arena_model, control) -> Circuit:
    # an MLP alternative (other_mlp:L0,Lk, read through control.mlp) puts MLPk in MLP0's place
    nodes = tuple(f"MLP{control.mlp(int(n[3:]))}" if n.startswith("MLP") else n for n in REDWOOD_NODES)
    return control.apply_data(Circuit.induced(arena_model, nodes, "Redwood's circuit"))


@pytest.mark.about(*REDWOOD_ABOUT)
@pytest.mark.controls("circuit_without:L2H1", "circuit_without:L0H0")
def test_redwood_circuit_is_faithful(redwood, claim_eval, reference_eval, claim):
    CC.claim_faithfulness(claim, claim_eval, redwood, at_least=0.95, reference=reference_eval)


@pytest.mark.about(none="completeness: a broken part only lowers what the complement carries, so no mutation can "
                        "break it; circuit_without points it at a smaller circuit")
@pytest.mark.controls("circuit_without:L2H1")
def test_redwood_circuit_is_complete(redwood, reference_eval, claim):
    CC.claim_completeness(claim, reference_eval, redwood, at_most=0.25)


@pytest.mark.about("ov:L2H1")
def test_redwood_circuit_beats_random_circuits(redwood, claim_eval, reference_eval, claim):
    CC.claim_sufficiency(claim, claim_eval, redwood, at_least=0.8, n_random=20, reference=reference_eval)


@pytest.fixture(scope="module")
def rankings(arena_model, bracket_data):
    """Edge scores found on the discovery split: by EAP and EAP-IG on the checkpoint, and the
    uninformed alternatives (a random ranking; EAP-IG on the untrained model)."""
    from circuits.analysis.interventions import reinitialize

    found = _evaluator(arena_model, bracket_data, DISCOVERY_ROWS)
    untrained = _evaluator(reinitialize(arena_model), bracket_data, DISCOVERY_ROWS)
    g = torch.Generator().manual_seed(0)
    return {"EAP": D.eap(found).scores, "EAP-IG": D.eap_ig(found, steps=5).scores,
            "random ranking": torch.rand(len(found.graph.edges), generator=g, dtype=torch.float64),
            "EAP on the untrained model": D.eap(untrained).scores,
            "EAP-IG on the untrained model": D.eap_ig(untrained, steps=5).scores}


@pytest.fixture(scope="module")
def uninformed_curves(rankings, reference_eval):
    return [CC.mib_curve(reference_eval, rankings[name], method=name)
            for name in ("random ranking", "EAP on the untrained model", "EAP-IG on the untrained model")]


@pytest.mark.about("model")  # the trained model's edges; its untrained twin is the derived mutation
@pytest.mark.parametrize("method", ["EAP", "EAP-IG"])
@pytest.mark.controls("untrained")
def test_discovered_ranking_beats_uninformed_rankings(method, arena_model, bracket_data, rankings, uninformed_curves,
                                                      reference_eval, control, claim, figures):
    """CPR / CMD of the ranking found on the discovery split, scored on the claim split, against
    the best uninformed ranking's (intervals separated). Under the untrained control the ranking is
    the method's on an untrained model (one of the uninformed ones), scored on the checkpoint."""
    model = control.apply_model(arena_model)
    scores = rankings[method]
    if model is not arena_model:  # the untrained control: the same model and split as the uninformed ranking's
        scores = rankings[f"{method} on the untrained model"]
    curve = CC.mib_curve(reference_eval, scores, method=method, seed=claim.draws_seed)
    best_cpr = max(c.cpr.hi for c in uninformed_curves)
    best_cmd = min(c.cmd.lo for c in uninformed_curves)
    CC.claim_cpr_cmd(claim, curve, cpr_at_least=best_cpr, cmd_at_most=best_cmd)
    figures.add(f"MIB faithfulness curves ({method})",
                lambda: CC.curve_figure([curve, *uninformed_curves], "ARENA checkpoint, mean ablation"),
                caption="f(C_k) of the top k% edges, 95% bootstrap bands over the claim split's strings")

"""Hypothesis: on the skip-trigram and palindrome models, a circuit discovered by EAP-IG on one split
carries the task on another: faithful, and better than random circuits of its size.

Procedure (the binding is chosen on one split and tested on another): EAP-IG (5 steps) ranks the
edges on a DISCOVERY split; the circuit is the smallest top-k of that ranking whose faithfulness on
the discovery split reaches 0.95. On a disjoint HELD-OUT split it must keep f >= 0.85 (bootstrap lower
bound; some shrinkage from the search is allowed, none to the level of a circuit that misses a
component) and beat >= 80% of random circuits of its size. Metric: the logit margin of the label;
edges outside the circuit mean-ablated over a third REFERENCE split. f's m(N) and m(∅) are the
unmutated model's.

* skip_trigrams (1 layer, 3 heads of width 1, one-hot embed / unembed; 13 edges), signal sequences
  only (noise sequences have no label to explain): the module test_skip_trigrams.py says every head
  serves several pair classes, so the circuit must hold the three heads' outputs; its
  ``circuit_without:L0H0`` control drops head 0.0 from the found circuit, ``about("ov:L0H0")``
  breaks it in the model.
* palindromes (3 layers x 2 heads, MLPs, no LayerNorm; 122 edges): test_palindromes.py says the
  decision is carried by L2.mlp; ``circuit_without:MLP2`` and ``about("mlp:L2")``.

The untrained model (``about("model")``) must fail both claims.
"""

from __future__ import annotations

import pytest
import torch

from circuits.analysis import discovery as D
from circuits.analysis.circuit import Ablation, Circuit
from circuits.claims import circuit as CC
from circuits.claims.draws import Draws
from circuits.tasks import palindromes as P
from circuits.tasks import skip_trigrams as S

N_SPLIT = 400
TARGET_ON_DISCOVERY = 0.95


@pytest.fixture
def module_draws(circuits_options) -> Draws:
    """The module's strings: one draw shared by its tests (the circuit found once serves them all;
    --circuits-draws-seed changes them)."""
    return circuits_options.shared_draws("hypotheses/test_circuit_discovered.py")


def _splits(task: str, draws):
    if task == "skip_trigrams":
        make = lambda n, label: S.generate(n, draws.child(label).int(), p_signal=1.0)
    else:
        make = lambda n, label: P.generate(n, draws.child(label).int())
    return {name: make(N_SPLIT, name) for name in ("discovery", "held-out", "reference")}


def _evaluator(model, data, reference):
    return CC.Evaluator(model, data.toks, data.labels, Ablation.mean(reference.toks))


def _smallest_faithful(ev: CC.Evaluator, scores: torch.Tensor, target: float) -> Circuit:
    """The smallest top-k of the ranking with f >= target on this split (bisection over k: f of
    a top-k grows with k on these rankings up to noise; the found k is checked, not assumed)."""
    n = len(ev.graph.edges)
    full, empty = ev.full().mean(), ev.empty().mean()

    def f(k):
        return (ev.values(Circuit.top_k(ev.graph, scores, k)).mean() - empty) / (full - empty)

    lo, hi = 1, n
    while lo < hi:
        mid = (lo + hi) // 2
        if f(mid) >= target:
            hi = mid
        else:
            lo = mid + 1
    return Circuit.top_k(ev.graph, scores, lo, name=f"EAP-IG top {lo}")


_FOUND: dict = {}


def draws_key(splits) -> int:
    return hash(splits["discovery"].toks.numpy().tobytes())


def _found(task: str, model, splits) -> Circuit:
    """The circuit found on the discovery split of the UNMUTATED model (cached per task and draw)."""
    key = (task, id(model), draws_key(splits))
    if key not in _FOUND:
        ev = _evaluator(model, splits["discovery"], splits["reference"])
        scores = D.eap_ig(ev, steps=5).scores
        _FOUND[key] = _smallest_faithful(ev, scores, TARGET_ON_DISCOVERY)
    return _FOUND[key]


def _setup(task: str, zoo_models, zoo_seed, request, control, draws):
    """(the found circuit, possibly edited by a control; the evaluator of the model under test on the
    held-out split; the unmutated model's, whose m(N) and m(∅) every f is scaled by)"""
    base = zoo_models.get(request, task, zoo_seed).model
    splits = _splits(task, draws)
    circuit = control.apply_data(_found(task, base, splits))
    ref = _evaluator(base, splits["held-out"], splits["reference"])
    model = control.apply_model(base)
    ev = ref if model is base else _evaluator(model, splits["held-out"], splits["reference"])
    return circuit, ev, ref


@pytest.mark.about("model", "ov:L0H0")
@pytest.mark.controls("circuit_without:L0H0")
def test_skip_trigram_circuit_found_by_eap_ig_holds_out(zoo_models, zoo_seed, request, control, claim, module_draws):
    circuit, ev, ref = _setup("skip_trigrams", zoo_models, zoo_seed, request, control, module_draws)
    CC.claim_faithfulness(claim, ev, circuit, at_least=0.85, reference=ref, name="faithfulness of the found circuit")


@pytest.mark.about("model", "mlp:L2")
@pytest.mark.controls("circuit_without:MLP2")
def test_palindrome_circuit_found_by_eap_ig_holds_out(zoo_models, zoo_seed, request, control, claim, module_draws):
    circuit, ev, ref = _setup("palindromes", zoo_models, zoo_seed, request, control, module_draws)
    CC.claim_faithfulness(claim, ev, circuit, at_least=0.85, reference=ref, name="faithfulness of the found circuit")


@pytest.mark.about("model")
@pytest.mark.parametrize("task", ["skip_trigrams", "palindromes"])
def test_found_circuit_beats_random_circuits_of_its_size(task, zoo_models, zoo_seed, request, control, claim, module_draws):
    """Sufficiency: a mutation of one component lowers every circuit alike, so only the untrained
    model (where no circuit carries the task) is its targeted failure."""
    circuit, ev, ref = _setup(task, zoo_models, zoo_seed, request, control, module_draws)
    CC.claim_sufficiency(claim, ev, circuit, at_least=0.8, n_random=20, reference=ref,
                         name="share of random circuits of its size the found circuit beats")


KNOWN_FAILURES = {
    # measured in CI on 2026-12-07 (`pytest hypotheses/`, --circuits-draws-seed 0): since controls draw from the
    # draws seed, the untrained palindrome model is a different random initialisation, and on it the
    # circuit EAP-IG finds beats 20 of 20 random circuits of its size (share 1.000 >= 0.8). The claim compares a
    # ranked circuit with random ones on the same model, and a ranking picks the edges that move the metric on any
    # model, trained or not: against "untrained" it has power only by chance (the earlier control seed failed it).
    # Faithfulness (the other claim) is the one that separates the trained model from the untrained.
    "test_found_circuit_beats_random_circuits_of_its_size[palindromes] mutation=untrained":
        "no power against an untrained model: the found circuit beats 20/20 random circuits of its size on a random "
        "initialisation too (share 1.000, needs >= 0.8; draws seed 0); ranking picks the edges that move the "
        "metric on any model, so beating random circuits does not show a trained mechanism",
}

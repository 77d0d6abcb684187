"""Circuit discovery's cost on the ARENA checkpoint (3 layers x 2 heads + MLPs, 122 edges), 300
published bracket strings, mean ablation over 500 others: one circuit evaluation (the unit every
claim and ACDC spends), EAP (one forward + backward), EAP-IG (5 steps), ACDC (one evaluation per
tested edge), and the model's own forward for scale. One thread.

    pytest benchmarks/bench_discovery.py --benchmark-only --benchmark-min-rounds=3 \
        --benchmark-columns=min,median,rounds --benchmark-sort=name
"""

from __future__ import annotations

import pytest
import torch

from circuits.claims import circuit as CC
from circuits.analysis import discovery as D
from circuits.tasks.brackets import reference
from circuits.analysis.circuit import Ablation, Circuit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup():
    with torch.inference_mode(False):  # EAP needs autograd: nothing here may be an inference tensor
        model = reference.arena_model()
        data = reference.arena_data(reference.N_EVAL)
        x, labels, ref = data.toks[:300], data.isbal[:300].long(), data.toks[4000:4500]
        return model, x, labels, ref


def _evaluator(setup):
    model, x, labels, ref = setup
    return CC.Evaluator(model, x, labels, Ablation.mean(ref))


def _run(fn):
    with torch.inference_mode(False), torch.enable_grad():
        return fn()


def test_model_forward(benchmark, setup):
    model, x, _, _ = setup
    benchmark.extra_info["variant"] = "the model's forward (scale)"
    benchmark(lambda: model(x))


def test_one_circuit_evaluation(benchmark, setup):
    ev = _evaluator(setup)
    circuit = Circuit.full(ev.graph).without("L2H1 -> logits")

    def once():
        ev._memo.clear()
        return ev.values(circuit)

    benchmark.extra_info["variant"] = "one circuit's metric on 300 strings (edge-patched forward)"
    benchmark(once)


def test_eap(benchmark, setup):
    benchmark.extra_info["variant"] = "EAP: scores of all 122 edges"
    benchmark.pedantic(lambda: _run(lambda: D.eap(_evaluator(setup))), rounds=3, iterations=1)


def test_eap_ig(benchmark, setup):
    benchmark.extra_info["variant"] = "EAP-IG, 5 steps"
    benchmark.pedantic(lambda: _run(lambda: D.eap_ig(_evaluator(setup), steps=5)), rounds=3, iterations=1)


def test_acdc(benchmark, setup):
    benchmark.extra_info["variant"] = "ACDC, tau 0.01"
    result = {}

    def once():
        result["found"] = D.acdc(_evaluator(setup), tau=0.01)

    benchmark.pedantic(once, rounds=1, iterations=1)
    benchmark.extra_info["forwards"] = result["found"].forwards

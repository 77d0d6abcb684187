"""Causal scrubbing: the write-up's hypotheses (1a-3b, six) on 5,000 bracket strings, one draw each,
against the one-off cost of the model run they all gather from (`ScrubData`).

The bracket model's architecture (random weights: speed does not depend on them).

    pytest benchmarks/bench_scrub.py --benchmark-only --benchmark-min-rounds=3
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from circuits.analysis import scrub as S
from circuits.model.transformer import HookedTransformer, TransformerConfig
from circuits.tasks.brackets import data as B

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "hypotheses"))
from test_brackets_scrubbing import HYPOTHESES, build  # noqa: E402  (the claims' own hypotheses)

N = 5000


@pytest.fixture(scope="module")
def setup():
    cfg = TransformerConfig(n_layers=3, d_model=56, n_ctx=B.N_CTX, n_heads=2, d_mlp=56, d_vocab=B.VOCAB,
                            d_vocab_out=2, pad_token=B.PAD, positional="sinusoidal", readout="first", seed=0)
    model = HookedTransformer(cfg).eval()
    data = B.generate_originators_style(N, 5)
    hyps = build(model, data, ["L1H0", "L2H0"], "L2H1")
    return model, data, [hyps[h] for h in HYPOTHESES]


def test_scrub_data(benchmark, setup):
    model, data, _ = setup
    benchmark.extra_info["variant"] = "ScrubData (one model run, kept)"
    benchmark(S.ScrubData, model, data.toks, data.isbal.long())


def test_six_hypotheses_one_draw(benchmark, setup):
    model, data, hyps = setup
    sd = S.ScrubData(model, data.toks, data.isbal.long())
    benchmark.extra_info["variant"] = "6 hypotheses x 1 draw"
    benchmark(S.scrub, model, sd, None, hyps, n_draws=1)

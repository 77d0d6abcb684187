"""The ARENA bracket checkpoint with its 2,470 subnormal weights as published (`raw`) against the same
weights with them set to zero (`ours`: what `reference.arena_model()` serves, `convert.flush_subnormals_`;
tests/test_convert.py shows the logits are bitwise equal). x86 CPUs take a slow path for subnormal
operands, which the last block's MLP meets at every position it computes.

Per batch size, interleaved round-robin (1 thread): the plain forward (read-out path: the last block
at position 0 only) and a cache of `blocks.2.hook_resid_post` (the whole last block, every position).

    pytest benchmarks/bench_subnormals.py --benchmark-only [--interleaved-reps 15]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import interleaved  # noqa: E402

from circuits.tasks.brackets import reference  # noqa: E402

BATCHES = (64, 1000)


@pytest.fixture(scope="module")
def variants():
    ours = reference.arena_model()
    raw = reference.arena_model(flush_subnormals=False)
    names = ["blocks.2.hook_resid_post"]
    return {"ours": ours, "raw": raw,
            "ours_cache": lambda x: ours.run_with_cache(x, names=names),
            "raw_cache": lambda x: raw.run_with_cache(x, names=names)}


@pytest.mark.parametrize("batch", BATCHES)
def test_subnormal_weights_interleaved(benchmark, variants, batch, request):
    x = reference.arena_data(batch).toks
    best: dict[str, float] = {}
    reps = request.config.getoption("--interleaved-reps", default=15)
    benchmark.group = f"arena batch={batch}"
    benchmark.extra_info.update(interleaved=best, batch=batch)
    with torch.inference_mode():
        benchmark.pedantic(lambda: best.update(interleaved(variants, x, reps)), rounds=1, iterations=1)

"""What the bracket claims pay per model on the 5,000 evaluation strings (ARENA checkpoint, hook-free),
interleaved round-robin on one thread, each variant's values checked against the others' first.

* group `analysis`: `subjects.Analysis` (the logits and the decomposition's activations at position
  0) in length buckets of `BUCKET_ROWS` rows (`ours`: what the claims run for a model without hooks)
  against one batch at the full 42 positions (`one_batch`: what a hooked model still runs, and what
  every model ran before issue 33's fourth round). The strings average 18 positions.
* group `capture`: the clean residual entering the last block, as the count head's resampling and the
  sibling ablations capture it: `interventions.capture_by_length` (`ours`) against
  `capture_activations` in one batch (`one_batch`).

The process's allocator is left as it is (the main job keeps freed memory: `circuits.heap`).

    pytest benchmarks/bench_brackets_analysis.py --benchmark-only [--interleaved-reps 5]
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_forward import interleaved  # noqa: E402

from circuits.analysis import interventions as I  # noqa: E402
from circuits.tasks.brackets import reference  # noqa: E402
from circuits.tasks.brackets import subjects as S  # noqa: E402


class _OneBatch(S.Analysis):
    """The analysis as a hooked model runs it: every string in one batch."""

    @property
    def batch_size(self) -> int:
        return len(self.data)


def _analyse(cls):
    def run(data):
        an = cls(MODEL, data)
        return an.logits, an.cache
    return run


MODEL = reference.arena_model()
RESID = "blocks.2.hook_resid_pre"


def _check_same(variants: dict, x) -> None:
    (logits_a, cache_a), (logits_b, cache_b) = (variants[n](x) for n in ("ours", "one_batch"))
    torch.testing.assert_close(logits_a, logits_b, atol=1e-4, rtol=1e-4)
    for k in cache_a.keys():
        torch.testing.assert_close(cache_a[k], cache_b[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("group", ["analysis", "capture"])
def test_brackets_analysis_interleaved(benchmark, group, request):
    data = S.reference_data()
    if group == "analysis":
        variants, x = {"ours": _analyse(S.Analysis), "one_batch": _analyse(_OneBatch)}, data
        _check_same(variants, x)
    else:
        x = data.toks[data.starts_open]
        variants = {"ours": lambda t: I.capture_by_length(MODEL, t, [RESID]),
                    "one_batch": lambda t: I.capture_activations(MODEL, t, [RESID])}
        real = ~MODEL.key_padding_mask(x)
        torch.testing.assert_close(variants["ours"](x)[RESID][real], variants["one_batch"](x)[RESID][real],
                                   atol=1e-4, rtol=1e-4)
    best: dict[str, float] = {}
    reps = request.config.getoption("--interleaved-reps", default=15)
    benchmark.group = f"brackets {group}"
    benchmark.extra_info.update(interleaved=best)
    with torch.inference_mode():
        benchmark.pedantic(lambda: best.update(interleaved(variants, x, reps, target_s=0.0)), rounds=1, iterations=1)
    assert set(best) == set(variants)

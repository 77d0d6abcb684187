"""Benchmark of the bracket-data generator: generate(100_000, 0) must stay well under 1 s.

Run: pytest benchmarks/bench_brackets_data.py --benchmark-only
"""

import torch

torch.set_num_threads(1)  # the budget is stated for one thread; also keeps runs comparable

from circuits.tasks.brackets.data import generate  # noqa: E402


def test_generate_100k(benchmark):
    data = benchmark(generate, 100_000, 0)
    assert len(data) == 100_000

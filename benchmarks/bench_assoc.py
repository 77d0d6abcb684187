"""One training step of experiment 1's models (N = 50, d = d_h = 10, all 2,500 bigram contexts):
the hooked forward on 2,500 sequences vs `table_logits` (the same logits from per-token tables).

pytest:  pytest benchmarks/bench_assoc.py --benchmark-only --benchmark-min-rounds=10
script:  python benchmarks/bench_assoc.py [--heads 1 11 31] [--reps 20]   (variants interleaved)
"""

from __future__ import annotations

import argparse
import time

import pytest
import torch
import torch.nn.functional as F

from circuits.tasks.assoc.model import AssocConfig, all_contexts, build_model, table_logits

torch.set_num_threads(1)
CONTEXTS = all_contexts(50, 2)
TARGETS = torch.randint(0, 50, (2500,), generator=torch.Generator().manual_seed(0))


def make_step(H: int, path: str):
    model = build_model(AssocConfig(d_vocab=50, n_ctx=2, d_model=10, n_heads=H, d_head=10, seed=0))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    logits = (lambda: model(CONTEXTS)) if path == "forward" else (lambda: table_logits(model))

    def step():
        loss = F.cross_entropy(logits(), TARGETS)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


@pytest.mark.parametrize("H", [1, 11, 31])
@pytest.mark.parametrize("path", ["forward", "table"])
def test_train_step(benchmark, H, path):
    benchmark.group = f"assoc train step H={H}"
    benchmark.extra_info["variant"] = "ours" if path == "forward" else path
    with torch.inference_mode(False), torch.enable_grad():  # the conftest runs benchmarks under inference_mode
        step = make_step(H, path)
        step()
        benchmark(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, nargs="+", default=[1, 11, 31])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    for H in args.heads:
        steps = {p: make_step(H, p) for p in ("forward", "table")}
        best = {p: float("inf") for p in steps}
        for p in steps:
            steps[p]()
        for _ in range(args.reps):
            for p, step in steps.items():
                t0 = time.perf_counter()
                step()
                best[p] = min(best[p], time.perf_counter() - t0)
        print(f"H={H:2d}: forward {best['forward'] * 1e3:7.2f} ms, table {best['table'] * 1e3:6.2f} ms, "
              f"speed-up x{best['forward'] / best['table']:.1f}")


if __name__ == "__main__":
    main()

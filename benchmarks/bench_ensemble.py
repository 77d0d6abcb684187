"""Models trained per CPU-second (issue 34): K = 32 seeds as one stacked model (circuits.zoo.ensemble)
against 32 single trainings, a fixed number of optimiser steps each, one thread, interleaved.

Both sides run the real code paths on each seed's own data and batch order: the single trainer's
step (train.compute_loss, per-model clipping, AdamW as the recipe says) and the stacked trainer's
(ensemble.stack_step: width groups, batched matmuls, per-seed clipping, one AdamW call). Data
generation and evaluation are outside the timing (the same work per seed on either side). The
measurement alternates the two sides `--interleaved-reps` times and keeps each side's minimum CPU
time (time.process_time: what another process on a shared machine does not move much).

    pytest benchmarks/bench_ensemble.py --benchmark-only -s --interleaved-reps 3

prints, per system: CPU seconds for K models x STEPS steps on each side and the ratio (models per
CPU-second, ensemble / single).
"""

from __future__ import annotations

import time

import pytest
import torch

from circuits.zoo import ensemble
from circuits.zoo import registry as zoo
from circuits.zoo.train import batches, compute_loss

torch.set_num_threads(1)

K = 32
STEPS = 20
N_TRAIN = 4_000  # per seed: enough for STEPS batches of every recipe here


@pytest.fixture
def _grad_enabled():  # benchmarks/conftest.py runs everything under inference_mode; training needs grad
    with torch.inference_mode(False), torch.enable_grad():
        yield


def _seed_batches(entry, seeds):
    """Each seed's first STEPS training batches, drawn as its training draws them."""
    r = entry.recipe
    out = []
    for s in seeds:
        split = (entry.make_train_split or entry.make_split)(N_TRAIN, 1_000 + s)
        gen = torch.Generator().manual_seed(s)
        epoch, got = iter(()), []
        while len(got) < STEPS:
            idx = next(epoch, None)
            if idx is None:
                epoch = batches(split, r.batch_size, gen, r.bucket_by_length)
                continue
            got.append(split.batch(idx))
        out.append(got)
    return out  # [seed][step] -> Split


def _singles(entry, seeds, data) -> float:
    r = entry.recipe
    t0 = time.process_time()
    for k, s in enumerate(seeds):
        model = entry.new_model(s).train()
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": r.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=r.lr, betas=tuple(r.betas),
                                **({"fused": True} if r.fused_adamw else {"foreach": True}))
        for b in data[k]:
            loss, _ = compute_loss(model, b, r.loss, r.readout_only or None, r.aux_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if r.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, r.grad_clip, foreach=True)
            opt.step()
            loss.item()
    return time.process_time() - t0


def _stacked(entry, seeds, data) -> float:
    r = entry.recipe
    extras = None
    options = getattr(entry.train_fn, "ensemble_extras", None)
    t0 = time.process_time()
    stack = ensemble.StackedTransformer([entry.new_model(s) for s in seeds])
    if options is not None:
        opts = dict(options(entry))
        offset = int(opts.pop("seed_offset", 0))
        extras = ensemble.Extras(**opts, gens=[torch.Generator().manual_seed(s + offset) for s in seeds])
    opt = ensemble._make_optimizer(stack, r)
    for step in range(STEPS):
        ensemble.stack_step(stack, opt, [data[k][step] for k in range(len(seeds))], r, extras, "cpu", r.lr)
    return time.process_time() - t0


@pytest.mark.usefixtures("_grad_enabled")
@pytest.mark.parametrize("name", ["brackets", "brackets@arena_like", "palindromes", "palindromes@seed"])
def test_models_per_cpu_second(benchmark, name, request):
    entry = zoo.get_entry(name)
    seeds = list(range(K))
    data = _seed_batches(entry, seeds)
    reps = max(1, request.config.getoption("--interleaved-reps"))
    times = {"single": [], "ensemble": []}

    def interleaved():
        for _ in range(reps):
            times["single"].append(_singles(entry, seeds, data))
            times["ensemble"].append(_stacked(entry, seeds, data))

    benchmark.pedantic(interleaved, rounds=1, iterations=1)
    single, stacked = min(times["single"]), min(times["ensemble"])
    ratio = single / stacked
    benchmark.group = f"models per CPU-second, K={K}, {STEPS} steps"
    benchmark.extra_info.update(system=name, K=K, steps=STEPS, single_cpu_s=single, ensemble_cpu_s=stacked,
                                ratio=ratio, single_runs=times["single"], ensemble_runs=times["ensemble"])
    print(f"\n{name}: {K} models x {STEPS} steps, CPU s (min of {reps} interleaved): single {single:.2f} "
          f"({K / single:.2f} models/CPU-s at this step count), ensemble {stacked:.2f} ({K / stacked:.2f}); "
          f"ratio {ratio:.2f}x")

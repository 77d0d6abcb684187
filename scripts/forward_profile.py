"""Where a pytest run's forward time goes: a pytest plugin timing every outermost
`HookedTransformer.forward` (thread CPU time), by test and input shape, and counting repeated
identical forwards (same model function by `weights_digest`, same input bytes, same keyword
arguments), which a memo could have served. For finding work to cut; it slows the run (a digest
and a hash per forward), so time the run without it.

    PYTHONPATH=scripts CIRCUITS_THREADS=1 python -m pytest -p forward_profile hypotheses/ -q \\
        -p no:cacheprovider [--forward-profile OUT.json]

Prints the totals and the costliest (test, shape) rows and repeats; OUT.json (default
forward_profile.json) keeps them all. Issue 33's fourth round used it (README "Speed").
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict

import pytest
import torch

from circuits.analysis.measures import weights_digest
from circuits.model.transformer import HookedTransformer

_STATE = {"test": "<outside tests>", "depth": 0}
_BY_SHAPE: dict = defaultdict(lambda: [0, 0.0])  # (test, shape, start_at_layer) -> [calls, cpu s]
_BY_KEY: dict = defaultdict(list)  # (model digest, input hash, shape, kwargs) -> [(test, cpu s)]
_forward = HookedTransformer.forward


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _timed_forward(self, x, *args, **kwargs):
    if _STATE["depth"]:  # a forward inside a forward (a hook running the model): counted in the outer
        return _forward(self, x, *args, **kwargs)
    extra = {k: (_digest(v) if isinstance(v, torch.Tensor) else repr(v)) for k, v in kwargs.items()}
    key = (weights_digest(self)[:16], _digest(x), tuple(x.shape), repr(sorted(extra.items())), len(args))
    _STATE["depth"] += 1
    start = time.thread_time()
    try:
        return _forward(self, x, *args, **kwargs)
    finally:
        _STATE["depth"] -= 1
        spent = time.thread_time() - start
        row = _BY_SHAPE[(_STATE["test"], tuple(x.shape), kwargs.get("start_at_layer", 0))]
        row[0] += 1
        row[1] += spent
        _BY_KEY[key].append((_STATE["test"], spent))


def pytest_addoption(parser):
    parser.addoption("--forward-profile", default="forward_profile.json", help="where the full table goes")


def pytest_configure(config):
    HookedTransformer.forward = _timed_forward


def pytest_unconfigure(config):
    HookedTransformer.forward = _forward


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _STATE["test"] = item.nodeid.split("[")[0]  # variants of a test together
    yield
    _STATE["test"] = "<outside tests>"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    rows = sorted(((cpu, n, test, list(shape), layer) for (test, shape, layer), (n, cpu) in _BY_SHAPE.items()),
                  reverse=True)
    repeats = sorted(((sum(c for _, c in runs[1:]), len(runs), sorted({t for t, _ in runs}))
                      for runs in _BY_KEY.values() if len(runs) > 1), reverse=True)
    total = sum(r[0] for r in rows)
    wasted = sum(r[0] for r in repeats)
    tr = terminalreporter
    tr.write_sep("-", f"forward profile: {total:.1f} CPU s in forwards; repeated identical forwards {wasted:.1f} s")
    for cpu, n, test, shape, layer in rows[:15]:
        tr.write_line(f"{cpu:8.2f} s {n:6d} calls  {str(shape):<16} from layer {layer}  {test}")
    for cpu, n, tests in repeats[:5]:
        tr.write_line(f"{cpu:8.2f} s repeated, {n} runs: {', '.join(tests)[:120]}")
    with open(config.getoption("--forward-profile"), "w") as f:
        json.dump({"forward_cpu_s": total, "repeated_cpu_s": wasted,
                   "by_test_and_shape": [dict(cpu_s=c, calls=n, test=t, shape=s, start_at_layer=l)
                                         for c, n, t, s, l in rows],
                   "repeats": [dict(cpu_s=c, runs=n, tests=t) for c, n, t in repeats]}, f, indent=1)

"""Shared set-up for the benchmarks (pytest-benchmark).

* One intra-op thread, set before any benchmark module builds a model: these models are tiny, extra
  threads only add synchronisation, and on a shared 2-core machine OpenMP spin-waits would make the
  numbers meaningless. (Each benchmark module also sets it at import, for script mode.)
* `benchmarks/` on sys.path, so `plain_model` imports the same way under pytest and as a script.
* Every benchmark runs under `torch.inference_mode()`.
* At the end, a summary of each group's min times with ratios to our plain forward, to it with the
  whole last block and to the plain PyTorch baseline, measured in the same run (pytest-benchmark's own
  table shows ratios to the fastest entry only); the interleaved benchmarks' summary first.

Recommended invocation (more rounds make the minimum stable on a loaded machine):

    pytest benchmarks/bench_forward.py --benchmark-only --benchmark-min-rounds=20 \
        --benchmark-columns=min,median,rounds,iterations --benchmark-sort=name
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def pytest_addoption(parser):
    parser.addoption("--interleaved-reps", type=int, default=15,
                     help="round-robin repetitions of the interleaved benchmarks (min over them is reported)")


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Ratios within each group to the 'ours', 'ours_full' and 'plain' variants: from the interleaved
    benchmarks (extra_info["interleaved"]: every variant's min from one round-robin run) and from the
    one-variant-per-benchmark ones (extra_info["variant"])."""
    bs = getattr(config, "_benchmarksession", None)  # pytest-benchmark's session (not a public API)
    all_benches = [b for b in getattr(bs, "benchmarks", []) or [] if b]
    groups: dict[str, dict[str, float]] = {}
    for b in all_benches:
        info = getattr(b, "extra_info", {})
        if "variant" in info:
            groups.setdefault(b.group or "", {})[info["variant"]] = b.stats.min
    interleaved = {b.group or "": b.extra_info["interleaved"] for b in all_benches
                   if "interleaved" in getattr(b, "extra_info", {})}
    tr = terminalreporter
    if interleaved:
        _write_ratios(tr, interleaved, "interleaved (all variants round-robin in one run): min time per call; "
                                       "ratios to our forward, to ours_full (the whole last block) and to plain")
    if groups:
        _write_ratios(tr, groups, "one variant after another: min time per call; ratios to our forward, to "
                                  "ours_full (the whole last block) and to the plain PyTorch model")


def _write_ratios(tr, groups: dict[str, dict[str, float]], title: str) -> None:
    tr.write_sep("-", title)
    tr.write_line(f"{'group':<24}{'variant':<18}{'min ms':>10}{'/ ours':>9}{'/ full':>9}{'/ plain':>9}")
    for group in sorted(groups, key=_batch_of):
        times = groups[group]
        for variant, t in sorted(times.items(), key=lambda kv: kv[1]):
            ratios = [f"{t / times[base]:.2f}" if base in times else "-" for base in ("ours", "ours_full", "plain")]
            tr.write_line(f"{group:<24}{variant:<18}{t * 1e3:>10.3f}" + "".join(f"{r:>9}" for r in ratios))


def _batch_of(group: str):
    digits = "".join(c for c in group.rsplit("=", 1)[-1] if c.isdigit())
    return (int(digits) if digits else 0, group)

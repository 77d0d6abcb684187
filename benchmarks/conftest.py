"""Shared set-up for the benchmarks (pytest-benchmark).

* One intra-op thread, set before any benchmark module builds a model: these models are tiny, extra
  threads only add synchronisation, and on a shared 2-core machine OpenMP spin-waits would make the
  numbers meaningless. (Each benchmark module also sets it at import, for script mode.)
* `benchmarks/` on sys.path, so `plain_model` imports the same way under pytest and as a script.
* Every benchmark runs under `torch.inference_mode()`.
* At the end, a summary of each group's min times with ratios to our plain forward and to the plain
  PyTorch baseline, measured in the same run (pytest-benchmark's own table shows ratios to the fastest
  entry only).

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


@pytest.fixture(autouse=True)
def _inference_mode():
    with torch.inference_mode():
        yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Ratios within each group to the 'ours' and 'plain' variants (set in benchmark.extra_info)."""
    bs = getattr(config, "_benchmarksession", None)  # pytest-benchmark's session (not a public API)
    benches = [b for b in getattr(bs, "benchmarks", []) or [] if b and "variant" in getattr(b, "extra_info", {})]
    if not benches:
        return
    groups: dict[str, dict[str, float]] = {}
    for b in benches:
        groups.setdefault(b.group or "", {})[b.extra_info["variant"]] = b.stats.min
    tr = terminalreporter
    tr.write_sep("-", "min time per call; ratios to our forward, to our forward with the whole last block "
                      "(ours_full) and to the plain PyTorch model (same run)")
    tr.write_line(f"{'group':<24}{'variant':<18}{'min ms':>10}{'/ ours':>9}{'/ full':>9}{'/ plain':>9}")
    for group in sorted(groups, key=_batch_of):
        times = groups[group]
        for variant, t in sorted(times.items(), key=lambda kv: kv[1]):
            ratios = [f"{t / times[base]:.2f}" if base in times else "-" for base in ("ours", "ours_full", "plain")]
            tr.write_line(f"{group:<24}{variant:<18}{t * 1e3:>10.3f}" + "".join(f"{r:>9}" for r in ratios))


def _batch_of(group: str):
    digits = "".join(c for c in group.rsplit("=", 1)[-1] if c.isdigit())
    return (int(digits) if digits else 0, group)

"""What the hypothesis modules share beyond the plugin's fixtures: the torch threads of the claims. (The
ARENA checkpoint and its strings, `arena_model` and `bracket_data`, are fixtures of the plugin itself;
the bracket subjects and their role-swap control are `circuits.tasks.brackets.subjects`.)"""

from __future__ import annotations

import os

import pytest
import torch

from circuits.claims.mutations import register_model_shape
from circuits.errors import SettingError
from circuits.heap import keep_freed_memory
from circuits.tasks.brackets.reference import ARENA_CONFIG

# claims on the ARENA checkpoint get their specificity alternatives (every other head) at collection
register_model_shape("arena_model", ARENA_CONFIG["n_layers"], ARENA_CONFIG["n_heads"])


def pytest_configure(config):
    """Freed tensors stay in the heap for the next claim (circuits.heap: the main job's system time was
    a fifth of its CPU, page faults on fresh 50-100 MiB activations); $CIRCUITS_HEAP=system opts out."""
    try:
        keep_freed_memory()
    except SettingError as exc:
        raise pytest.UsageError(str(exc)) from None


def analysis_threads() -> int:
    """Torch threads for the claims: CIRCUITS_THREADS if set; one per xdist worker (the workers
    already fill the cores); else the cores, up to 4. The big batched evaluations (100k bracket
    strings, 20k ICL sequences) run ~1.4x faster on 2 threads than on 1 here; more threads than
    cores would stall."""
    env = os.environ.get("CIRCUITS_THREADS")
    if env:
        if not env.isdigit() or int(env) < 1:
            raise pytest.UsageError(f"CIRCUITS_THREADS must be a positive integer, got {env!r}")
        return int(env)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return 1
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _analysis_threads():
    """Torch's threads and, as many, the BLAS / OpenMP threads numpy, scipy and sklearn use (OpenBLAS
    otherwise starts one per core in every xdist worker: on a busy 2-core machine the final-LN fit,
    a 5,000 x 56 least squares, took 1.3 s with 2 OpenBLAS threads and 0.1 s with one, the same fit to
    1e-14)."""
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    n = analysis_threads()
    torch.set_num_threads(n)
    with threadpool_limits(n):
        yield
    torch.set_num_threads(old)


# `arena_model` and `bracket_data` are the plugin's own fixtures (circuits.plugin.pytest_plugin): a project
# with only the wheel has them too, as the README's examples need.

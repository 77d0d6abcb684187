"""Fixtures shared by the hypothesis modules: the ARENA checkpoint and bracket subjects."""

from __future__ import annotations

import pytest
import torch

from brackets_subjects import ARENA_DIR, ARENA_WEIGHTS, reference_data
from circuits.controls import register_control
from circuits.convert import load_tl_checkpoint
from circuits.zoo import get_entry


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Analysis tensors are small: one torch thread avoids 2-core stalls when another process is busy."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def arena_model():
    """The published ARENA bracket classifier (a TransformerLens state dict), loaded into our model."""
    if not ARENA_DIR.is_dir():
        pytest.skip(f"the ARENA reference folder {ARENA_DIR} is absent (it lives in ../shared beside the repo)")
    return load_tl_checkpoint(ARENA_WEIGHTS, get_entry("brackets").config).eval()


@pytest.fixture(scope="session")
def bracket_data():
    if not ARENA_DIR.is_dir():
        pytest.skip(f"the ARENA reference folder {ARENA_DIR} is absent")
    return reference_data()


def _swap_roles(roles: dict, *args, seed: int = 0) -> dict:
    """Rebind the count head to the negative head and vice versa: the 'permuted head' control for
    claims phrased about a role rather than an index."""
    if not isinstance(roles, dict) or {"count_head", "negative_head"} - set(roles):
        raise TypeError("swap_roles applies to a role binding dict with count_head and negative_head")
    return {**roles, "count_head": roles["negative_head"], "negative_head": roles["count_head"]}


register_control("swap_roles", kind="data", fn=_swap_roles, replace=True,
                 accepts=lambda obj: isinstance(obj, dict) and {"count_head", "negative_head"} <= set(obj),
                 description="exchange the heads bound to the count and negative roles")

import pytest
import torch

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation, and on a loaded 2-core machine
    OpenMP spin-waits make each small op ~100x slower. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

import pytest
import torch

# In-process pytester runs restore sys.modules afterwards, dropping what they imported first; numpy's
# C extensions (numpy.fft, reached through scipy / scikit-learn) cannot be loaded twice in a process,
# so a later import of them failed ("cannot load module more than once per process") when such a run
# had imported them first. Importing them here puts them in every snapshot.
import scipy.sparse  # noqa: E402,F401  (scipy's array_api_compat clones numpy.fft)
import sklearn  # noqa: E402,F401

pytest_plugins = ["pytester"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: intra-op threads only add synchronisation, and on a loaded 2-core machine
    OpenMP spin-waits make each small op ~100x slower. Restored after the module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

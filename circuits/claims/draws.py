"""Random draws of one test, all from one seed that ``--circuits-draws-seed`` changes.

The ``draws`` fixture gives a test a :class:`Draws`: every random choice a claim makes (which
strings to resample from, bootstrap resamples, fresh evaluation data) should come from it, so that
``pytest hypotheses/ --circuits-draws-seed N`` re-draws all of them at once and a verdict that flips between
draws shows up as unstable instead of passing on a lucky draw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

__all__ = ["Draws"]


@dataclass(frozen=True)
class Draws:
    seed: int  # a 63-bit seed derived from --circuits-draws-seed and the test's id

    def child(self, label: str) -> "Draws":
        """An independent stream for one purpose (``draws.child("resample")``), stable by label."""
        digest = hashlib.sha256(f"{self.seed}\x00{label}".encode()).digest()
        return Draws(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def torch(self, device: Any = "cpu") -> Any:
        """A fresh ``torch.Generator`` seeded with this stream's seed (on ``device``)."""
        import torch

        return torch.Generator(device=device).manual_seed(self.seed)

    def numpy(self) -> Any:
        """A fresh ``numpy.random.Generator`` seeded with this stream's seed."""
        import numpy as np

        return np.random.default_rng(self.seed)

    def int(self, bound: int = 2**31) -> int:
        """A seed in [0, bound) for library functions that take an integer seed."""
        return self.seed % bound

"""Random scores: the baseline every criterion should beat."""
from __future__ import annotations

import numpy as np

from .base import Criterion


class Random(Criterion):
    """Uniform random scores, reproducible.

    A group's scores depend only on ``seed``, the group's id and its size, so repeated calls
    (budget searches) agree. It reads no tensor, so it prunes a model on the meta device.

    Parameters
    ----------
    seed : int, default 0
        A non-negative integer.

    Raises
    ------
    ValueError
        ``seed`` is not a non-negative integer (whatever its type).
    """

    name = "random"
    reads_values = False

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)

    def scores(self, group) -> np.ndarray:
        return np.random.default_rng([self.seed, int(group.id), int(group.size)]).random(group.size)

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"

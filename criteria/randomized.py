"""Random scores: the baseline every criterion should beat."""
from __future__ import annotations

import numpy as np

from graphprune.validation import check_int

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
        ``seed`` is negative.
    TypeError
        ``seed`` is not an integer.
    """

    name = "random"
    reads_values = False

    def __init__(self, seed: int = 0):
        self.seed = check_int(seed, "seed", 0)

    def scores(self, group) -> np.ndarray:
        return np.random.default_rng([self.seed, int(group.id), int(group.size)]).random(group.size)

    def __repr__(self) -> str:
        return f"Random(seed={self.seed})"

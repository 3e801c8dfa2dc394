"""FPGM: filter pruning via the geometric median (He et al., CVPR 2019)."""
from __future__ import annotations

import numpy as np

from .base import Criterion, channel_matrix, combine, producer_members


def geometric_median(points: np.ndarray, iterations: int = 200, tol: float = 1e-10) -> np.ndarray:
    """The point minimising the sum of Euclidean distances to ``points`` (rows), by
    Weiszfeld's algorithm started from the mean."""
    median = points.mean(axis=0)
    for _ in range(iterations):
        distances = np.linalg.norm(points - median, axis=1)
        if (distances < 1e-12).any():  # sitting on a data point: Weiszfeld's fixed point
            weights = np.where(distances < 1e-12, 0.0, 1.0 / np.maximum(distances, 1e-12))
            if weights.sum() == 0:
                return median
        else:
            weights = 1.0 / distances
        update = (weights[:, None] * points).sum(axis=0) / weights.sum()
        if np.linalg.norm(update - median) <= tol * max(1.0, np.linalg.norm(median)):
            return update
        median = update
    return median


class FPGM(Criterion):
    """Euclidean distance of each producer filter to the geometric median of the layer's filters.

    Filters near the geometric median are the most replaceable by the others, so they
    score lowest and go first. Each producer member (a layer writing the group's channels,
    see :func:`~graphprune.criteria.base.producer_members`) gets its own median over the channels it
    covers; members are combined with :func:`~graphprune.criteria.base.combine`. Consumers are ignored.
    """

    name = "fpgm"

    def scores(self, group) -> np.ndarray:
        per_member, covered_masks = [], []
        for member in producer_members(group):
            matrix, covered = channel_matrix(member, group.size)
            points = matrix[covered]
            distances = np.zeros(group.size)
            if points.shape[0] > 1:
                distances[covered] = np.linalg.norm(points - geometric_median(points), axis=1)
            per_member.append(distances)
            covered_masks.append(covered)
        return combine(per_member, group.size, covered_masks)

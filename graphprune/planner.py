"""Planning: how many and which channels each group loses."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from criteria import Criterion

from .groups import Group


def lowest_channels(group: Group, scores: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` lowest-scoring channels, sparing the best channel of every member.

    A group may span several layers (e.g. the inputs of a concat); sparing one channel per
    member keeps every layer at least one channel wide.
    """
    spared = {int(m.index_map[np.argmax(scores[m.index_map])]) for m in group.members}
    order = [int(i) for i in np.argsort(scores, kind="stable") if int(i) not in spared]
    return np.sort(np.array(order[:count], dtype=np.int64))


def plan_removal(groups: Iterable[Group], ratio: float, criterion: Criterion) -> dict[Group, np.ndarray]:
    """For every prunable group of ``n`` channels, the ``floor(ratio * n)`` lowest-scoring ones."""
    plan = {}
    for group in groups:
        if not group.prunable:
            continue
        count = int(math.floor(ratio * group.size))
        if count > 0:
            scores = np.asarray(criterion.scores(group), dtype=np.float64)
            if scores.shape != (group.size,):
                raise ValueError(f"{criterion!r} returned {scores.shape} scores for a group of {group.size} channels")
            plan[group] = lowest_channels(group, scores, count)
    return plan

"""Planning: how many and which channels each group loses.

:func:`plan_removal` turns a ratio (one float, or a mapping from module names / globs to
floats) and a criterion's scores into ``{group: channel indices}``. Two modes:

* per group (default): a group of ``n`` channels whose ratio is ``r`` loses the
  ``floor(r * n)`` lowest-scoring channels;
* ``global_ranking=True``: each group's scores are divided by their mean absolute value,
  all prunable groups' channels are ranked together and the globally lowest
  ``floor(ratio * total)`` go, no group losing more than ``floor(max_ratio * n)``.

In both modes every member keeps its best channel (so no layer is emptied), and with
``round_to=N`` each pruned group keeps a multiple of ``N`` channels (the nearest one to
the plan that respects ``max_ratio``; groups with fewer than ``N`` channels are left alone).
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping, Optional, Union

import numpy as np

from graphprune.analysis.groups import Group
from graphprune.criteria import Criterion

RatioSpec = Union[float, Mapping[str, float]]
DEFAULT_MAX_RATIO = 0.9


def _spared(group: Group, scores: np.ndarray) -> np.ndarray:
    """The best channel of every member (the same channel may be spared by several)."""
    return np.array([m.index_map[np.argmax(scores[m.index_map])] for m in group.members_by_index_map()], dtype=np.int64)


def removal_order(group: Group, scores: np.ndarray) -> np.ndarray:
    """Channels in the order they are removed (lowest score first), without the spared best
    channel of every member."""
    order = np.argsort(scores, kind="stable")
    return order[~np.isin(order, _spared(group, scores))].astype(np.int64)


def lowest_channels(group: Group, scores: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` lowest-scoring channels, sparing the best channel of every member.

    A group may span several layers (e.g. the inputs of a concat); sparing one channel per
    member keeps every layer at least one channel wide.
    """
    return np.sort(removal_order(group, scores)[: max(int(count), 0)])


def score_groups(groups: Iterable[Group], criterion: Criterion) -> dict:
    """``{group: scores}`` for every prunable group, checked for shape and finiteness."""
    scores = {}
    for group in groups:
        if not group.prunable:
            continue
        values = np.asarray(criterion.scores(group), dtype=np.float64)
        if values.shape != (group.size,):
            raise ValueError(f"{criterion!r} returned {values.shape} scores for a group of {group.size} channels")
        if not np.isfinite(values).all():
            raise ValueError(f"{criterion!r} returned non-finite scores for group {group.id} ({group.root})")
        scores[group] = values
    return scores


def group_ratio(group: Group, ratio: RatioSpec) -> float:
    """The ratio that applies to ``group``: ``ratio`` itself, or the value of the first key of
    the mapping that names one of its producer layers (exact names before globs, see
    :meth:`Group.lookup`); 0 when no key matches."""
    if isinstance(ratio, Mapping):
        return float(group.lookup(ratio, 0.0))
    return float(ratio)


def round_count(size: int, count: int, round_to: Optional[int], cap: int) -> int:
    """Adjust ``count`` so that ``size - count`` is the multiple of ``round_to`` nearest to it,
    removing at most ``cap`` channels (0 when no multiple fits)."""
    if not round_to or round_to == 1:
        return min(count, cap)
    if size < round_to:
        return 0
    kept = int(math.floor((size - count) / round_to + 0.5)) * round_to
    kept = max(kept, round_to, int(math.ceil((size - cap) / round_to)) * round_to)
    if kept > size:
        kept = (size // round_to) * round_to
        if size - kept > cap:
            return 0
    return size - kept


def _cap(group: Group, scores: np.ndarray, max_ratio: Optional[float]) -> int:
    cap = group.size - np.unique(_spared(group, scores)).size
    if max_ratio is not None:
        cap = min(cap, floor_count(max_ratio, group.size))
    return max(cap, 0)


def removal_counts(
    scores: Mapping,
    ratio: RatioSpec,
    *,
    global_ranking: bool = False,
    max_ratio: Optional[float] = None,
    round_to: Optional[int] = None,
) -> dict:
    """``{group: number of channels to remove}`` for the groups in ``scores`` (see module doc)."""
    counts = {}
    if not global_ranking:
        for group, values in scores.items():
            r = group_ratio(group, ratio)
            if r <= 0:
                continue
            cap = _cap(group, values, max_ratio)
            counts[group] = round_count(group.size, min(floor_count(r, group.size), cap), round_to, cap)
        return {g: c for g, c in counts.items() if c > 0}
    if isinstance(ratio, Mapping):
        raise ValueError("global_ranking needs a single float ratio, not a per-layer mapping")
    max_ratio = DEFAULT_MAX_RATIO if max_ratio is None else max_ratio
    groups = list(scores)
    total = sum(g.size for g in groups)
    target = floor_count(float(ratio), total)
    if target <= 0:
        return {}
    caps, pooled, owners = {}, [], []
    for index, group in enumerate(groups):
        values = scores[group]
        caps[group] = _cap(group, values, max_ratio)
        scale = float(np.mean(np.abs(values)))
        normalised = values / scale if scale > 0 else np.zeros_like(values)
        candidates = removal_order(group, values)[: caps[group]]
        pooled.append(normalised[candidates])
        owners.append(np.full(candidates.size, index))
    if not pooled:
        return {}
    pooled_scores, pooled_owner = np.concatenate(pooled), np.concatenate(owners)
    taken = pooled_owner[np.argsort(pooled_scores, kind="stable")[:target]]
    taken_counts = np.bincount(taken, minlength=len(groups))
    for index, group in enumerate(groups):
        if taken_counts[index] > 0:
            counts[group] = round_count(group.size, int(taken_counts[index]), round_to, caps[group])
    return {g: c for g, c in counts.items() if c > 0}


def plan_removal(
    groups: Iterable[Group],
    ratio: RatioSpec,
    criterion: Optional[Criterion] = None,
    *,
    scores: Optional[Mapping] = None,
    global_ranking: bool = False,
    max_ratio: Optional[float] = None,
    round_to: Optional[int] = None,
) -> dict:
    """``{group: sorted channel indices to remove}`` for the prunable ``groups``.

    ``ratio`` is a float in [0, 1) or a mapping from module names / ``fnmatch`` globs to
    floats (groups that no key names are left alone). Scores come from ``scores`` (as made
    by :func:`score_groups`, reused across calls) or from ``criterion``. ``global_ranking``,
    ``max_ratio`` and ``round_to`` are described in the module docstring; ``max_ratio``
    defaults to 0.9 with global ranking and to no limit otherwise.
    """
    groups = [g for g in groups if g.prunable]
    if scores is None:
        if criterion is None:
            raise TypeError("plan_removal needs a criterion or precomputed scores")
        if not global_ranking:  # score only the groups that lose channels
            groups = [g for g in groups if group_ratio(g, ratio) > 0]
        scores = score_groups(groups, criterion)
    else:
        scores = {g: scores[g] for g in groups if g in scores}
    counts = removal_counts(scores, ratio, global_ranking=global_ranking, max_ratio=max_ratio, round_to=round_to)
    return {group: lowest_channels(group, scores[group], count) for group, count in counts.items()}


def floor_count(ratio: float, n: int) -> int:
    """``floor(ratio * n)``, robust to float error (0.29 * 100 gives 29, not 28)."""
    return int(math.floor(ratio * n + 1e-9))

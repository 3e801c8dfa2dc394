"""Planning: how many and which channels each group loses.

:func:`plan_removal` turns a ratio (one float, or a mapping from module names / globs to
floats) and a criterion's scores into ``{group: channel indices}``. Two modes:

* per group (default): a group of ``n`` channels whose ratio is ``r`` loses the
  ``floor(r * n)`` lowest-scoring channels;
* ``global_ranking=True``: each group's scores are divided by their mean absolute value,
  all prunable groups' channels are ranked together and the globally lowest
  ``floor(ratio * total)`` go, no group losing more than ``floor(max_ratio * n)``.

With ``uniform=True`` a group repeated layer after layer (the MLP of every transformer block)
loses as many channels in every layer, as a model config with one size per kind of layer
needs: per group, each loses the fewest that any of them would; with global ranking, the
layers' normalised scores are averaged position by position and ranked as one. A group
blocked in one layer is left whole in all.

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


def repeated_groups(groups: Iterable[Group]) -> list:
    """The groups in classes of one group repeated layer after layer: equal in size, with members
    whose names differ only in their numbers (``layers.3.mlp.up_proj`` and ``layers.5.mlp.up_proj``)."""
    classes: dict = {}
    for group in groups:
        pattern = tuple(sorted((".".join("#" if p.isdigit() else p for p in m.name.split(".")), m.dim, m.role)
                               for m in group.members))
        classes.setdefault((group.size, pattern), []).append(group)
    return list(classes.values())


def _uniform(counts: dict, classes: list) -> dict:
    """``counts`` with every group of a class cut to the class's smallest count (0 for a
    class with a group that loses nothing, or that is blocked)."""
    for repeated in classes:
        least = min(counts.get(g, 0) for g in repeated)
        counts.update({g: least for g in repeated if g in counts})
    return {g: c for g, c in counts.items() if c > 0}


def _ranked_counts(scores: Mapping, classes: list, target: int, max_ratio: float) -> dict:
    """Global ranking over ``classes`` of groups pruned alike: each class ranks by the mean of
    its groups' normalised removal curves, each position counting once per group."""
    pooled, owners, weights = [], [], []
    for index, repeated in enumerate(classes):
        cap = min(_cap(g, scores[g], max_ratio) for g in repeated)
        curves = []
        for group in repeated:
            values = scores[group]
            scale = float(np.mean(np.abs(values)))
            normalised = values / scale if scale > 0 else np.zeros_like(values)
            curves.append(normalised[removal_order(group, values)[:cap]])
        pooled.append(np.mean(curves, axis=0) if cap else np.zeros(0))
        owners.append(np.full(cap, index))
        weights.append(np.full(cap, len(repeated)))
    order = np.argsort(np.concatenate(pooled), kind="stable")
    taken = order[np.cumsum(np.concatenate(weights)[order]) <= target]
    taken_counts = np.bincount(np.concatenate(owners)[taken], minlength=len(classes))
    return {g: int(taken_counts[i]) for i, repeated in enumerate(classes) for g in repeated}


def removal_counts(
    scores: Mapping,
    ratio: RatioSpec,
    *,
    global_ranking: bool = False,
    max_ratio: Optional[float] = None,
    round_to: Optional[int] = None,
    uniform: Optional[list] = None,
) -> dict:
    """``{group: number of channels to remove}`` for the groups in ``scores`` (see module doc).

    With ``uniform`` (classes of groups, as :func:`repeated_groups` makes) every group of a
    class loses as many channels as the others, and none where one of them is not in ``scores``."""
    if not global_ranking:
        counts = {}
        for group, values in scores.items():
            r = group_ratio(group, ratio)
            if r > 0:
                cap = _cap(group, values, max_ratio)
                counts[group] = round_count(group.size, min(floor_count(r, group.size), cap), round_to, cap)
        return _uniform(counts, uniform) if uniform else {g: c for g, c in counts.items() if c > 0}
    if isinstance(ratio, Mapping):
        raise ValueError("global_ranking needs a single float ratio, not a per-layer mapping")
    max_ratio = DEFAULT_MAX_RATIO if max_ratio is None else max_ratio
    target = floor_count(float(ratio), sum(g.size for g in scores))
    classes = [c for c in uniform if all(g in scores for g in c)] if uniform else [[g] for g in scores]
    if target <= 0 or not classes:
        return {}
    counts = {g: round_count(g.size, c, round_to, _cap(g, scores[g], max_ratio))
              for g, c in _ranked_counts(scores, classes, target, max_ratio).items() if c > 0}
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
    uniform: bool = False,
) -> dict:
    """``{group: sorted channel indices to remove}`` for the prunable ``groups``.

    ``ratio`` is a float in [0, 1) or a mapping from module names / ``fnmatch`` globs to
    floats (groups that no key names are left alone). Scores come from ``scores`` (as made
    by :func:`score_groups`, reused across calls) or from ``criterion``. ``global_ranking``,
    ``max_ratio`` and ``round_to`` are described in the module docstring; ``max_ratio``
    defaults to 0.9 with global ranking and to no limit otherwise. With ``uniform`` a group
    repeated layer after layer (:func:`repeated_groups`) loses as many channels in every layer,
    and none where it is blocked in one.
    """
    groups = list(groups)
    classes = repeated_groups(groups) if uniform else None
    groups = [g for g in groups if g.prunable]
    if scores is None:
        if criterion is None:
            raise TypeError("plan_removal needs a criterion or precomputed scores")
        if not global_ranking:  # score only the groups that lose channels
            groups = [g for g in groups if group_ratio(g, ratio) > 0]
        scores = score_groups(groups, criterion)
    else:
        scores = {g: scores[g] for g in groups if g in scores}
    counts = removal_counts(scores, ratio, global_ranking=global_ranking, max_ratio=max_ratio, round_to=round_to,
                            uniform=classes)
    return {group: lowest_channels(group, scores[group], count) for group, count in counts.items()}


def floor_count(ratio: float, n: int) -> int:
    """``floor(ratio * n)``, robust to float error (0.29 * 100 gives 29, not 28)."""
    return int(math.floor(ratio * n + 1e-9))

"""The K-means family: cluster a group's filters, then prune within clusters.

Every group's producer filters (see :func:`~graphprune.criteria.base.producer_members`; several
producers are concatenated, each scaled to unit Frobenius norm) are reduced with PCA
keeping 80% of their variance and clustered with ``KMeans(k)`` (scikit-learn, seeded).
Channels are then *ordered* for removal and the scores are ranks (``1..n``, higher = pruned
later), so removing the lowest ``m`` scores takes a prefix of that order for every ``m``:

* the members of each cluster except its best one (its *representative*) go first, taken
  from the clusters in proportion to their sizes (the ``j``-th removal of a cluster of ``s``
  filters comes at ``(j - 1/2) / s``; ties go to the less important filter);
* then the representatives of the clusters of two or more filters, least important first;
* singleton clusters (filters unlike any other) last, least important first.

Within a cluster, importance is L1 (:class:`KL1`), Taylor (:class:`KTaylor`) or the
distance to the cluster centroid in PCA space (:class:`KDistance`, closest first). Every
ratio below 1 is valid, including those that need more than ``n - k`` removals.

``k`` is an ``int`` for every group, ``None`` for automatic, or a mapping from group ids,
module names or ``fnmatch`` globs (matched as in :meth:`graphprune.Group.lookup`) to
an ``int`` or ``None``; unmatched groups are automatic. Automatic ``k`` is the value in
``k_range`` (inclusive, default 2..10, capped at ``n - 1``) with the highest silhouette
score; it is 1 when the group has fewer than 3 channels or all its filters coincide. The
``k`` used for each group id is kept in ``chosen_k``.

PCA and KMeans run with ``threads`` BLAS/OpenMP threads (default 1: the problems are
small, and extra threads mostly add contention).
"""
from __future__ import annotations

import numbers
import warnings
from typing import Mapping, Optional, Union

import numpy as np

from graphprune.validation import check_int, check_real

from .base import Criterion, channel_matrix, producer_members
from .magnitude import L1
from .taylor import Taylor

KSpec = Union[int, None, Mapping]


def filter_features(group) -> np.ndarray:
    """One row per group channel: the concatenated filters of the group's producers, each
    producer's block scaled to unit Frobenius norm."""
    blocks = []
    for member in producer_members(group):
        matrix, _ = channel_matrix(member, group.size)
        norm = np.linalg.norm(matrix)
        blocks.append(matrix / norm if norm > 0 else matrix)
    return np.hstack(blocks) if blocks else np.zeros((group.size, 1))


def reduce_features(features: np.ndarray, variance: float) -> np.ndarray:
    """PCA keeping ``variance`` of the variance; a zero column when every row is the same."""
    from sklearn.decomposition import PCA

    centred = features - features.mean(axis=0)
    if features.shape[0] < 2 or not np.any(np.abs(centred) > 1e-12 * max(1.0, np.abs(features).max())):
        return np.zeros((features.shape[0], 1))
    return PCA(n_components=variance, svd_solver="full").fit_transform(features)


def removal_ranks(labels: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Rank scores (``1..n``) of the proportional within-cluster removal order above."""
    keys = []
    for cluster in np.unique(labels):
        members = np.flatnonzero(labels == cluster)
        ordered = members[np.lexsort((members, importance[members]))]
        size = ordered.size
        if size == 1:
            keys.append((2, 0.0, importance[ordered[0]], int(ordered[0])))
            continue
        keys.append((1, 0.0, importance[ordered[-1]], int(ordered[-1])))
        for j, channel in enumerate(ordered[:-1], start=1):
            keys.append((0, (j - 0.5) / size, importance[channel], int(channel)))
    keys.sort()
    ranks = np.empty(labels.size)
    for position, key in enumerate(keys):
        ranks[key[3]] = position + 1
    return ranks


def _check_k(value, where: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{where} must be a positive integer or None, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{where} must be at least 1, got {value}")


class KMeansCriterion(Criterion):
    """Base of the K-means family; subclasses define the within-cluster :meth:`importance`.

    Parameters
    ----------
    k : int, None or mapping, default None
        Clusters per group: an int, None (automatic) or ``{group id, name or glob: int or
        None}`` (see the module docstring).
    seed : int, default 0
        KMeans' random state.
    variance : float, default 0.8
        The share of variance PCA keeps, in (0, 1]; 1 skips PCA.
    k_range : (int, int), default (2, 10)
        The automatic ``k`` searched, ``2 <= low <= high``.
    n_init : int, default 10
        KMeans' restarts.
    threads : int or None, default 1
        BLAS/OpenMP threads for PCA and KMeans (None: no limit).

    Raises
    ------
    TypeError
        ``k`` (or one of its keys or values), ``seed``, ``variance``, ``n_init`` or ``threads``
        has the wrong type.
    ValueError
        ``k`` or ``n_init`` is below 1, ``seed`` below 0, ``variance`` outside (0, 1], or
        ``k_range`` invalid.
    """

    def __init__(self, k: KSpec = None, *, seed: int = 0, variance: float = 0.8,
                 k_range: tuple = (2, 10), n_init: int = 10, threads: Optional[int] = 1):
        if isinstance(k, Mapping):
            for key, value in k.items():
                if isinstance(key, bool) or not isinstance(key, (str, numbers.Integral)):
                    raise TypeError(f"k keys must be group ids or layer names/globs, got {key!r}")
                _check_k(value, f"k[{key!r}]")
        else:
            _check_k(k, "k")
        variance = check_real(variance, "variance", low=0.0, high=1.0, low_open=True)
        if (not isinstance(k_range, (tuple, list)) or len(k_range) != 2
                or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in k_range)
                or not 2 <= k_range[0] <= k_range[1]):
            raise ValueError(f"k_range must be (low, high) integers with 2 <= low <= high, got {k_range!r}")
        self.k = dict(k) if isinstance(k, Mapping) else k
        self.seed = check_int(seed, "seed", 0)
        self.variance = variance if variance < 1 else None
        self.k_range = (int(k_range[0]), int(k_range[1]))
        self.n_init = check_int(n_init, "n_init", 1)
        self.threads = None if threads is None else check_int(threads, "threads", 1)
        self.chosen_k: dict = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k!r}, seed={self.seed})"

    def prepare(self, model, report) -> None:
        self.chosen_k = {}

    # ----- clustering
    def _kmeans(self, points: np.ndarray, k: int):
        from sklearn.cluster import KMeans

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # duplicate points: fewer distinct clusters than k
            model = KMeans(n_clusters=k, n_init=self.n_init, random_state=self.seed).fit(points)
        return model.labels_, model.cluster_centers_

    def _auto_k(self, points: np.ndarray) -> int:
        from sklearn.metrics import silhouette_score

        n = points.shape[0]
        low, high = self.k_range[0], min(self.k_range[1], n - 1)
        best_k, best = 1, -np.inf
        if not np.ptp(points, axis=0).any():
            return 1
        for k in range(low, high + 1):
            labels, _ = self._kmeans(points, k)
            if not 2 <= np.unique(labels).size <= n - 1:
                continue
            score = silhouette_score(points, labels)
            if score > best + 1e-12:
                best_k, best = k, score
        return best_k

    def cluster(self, group) -> tuple:
        """``(labels, centroids, points)`` of the group's filters in PCA space."""
        features = filter_features(group)
        points = reduce_features(features, self.variance) if self.variance is not None else features
        n = points.shape[0]
        k = group.lookup(self.k) if isinstance(self.k, dict) else self.k
        if k is None:
            k = self._auto_k(points) if n >= 3 else 1
        k = max(1, min(int(k), n))
        self.chosen_k[group.id] = k
        if k == 1:
            return np.zeros(n, dtype=np.int64), points.mean(axis=0, keepdims=True), points
        if k == n:
            return np.arange(n), points.copy(), points
        labels, centroids = self._kmeans(points, k)
        return labels, centroids, points

    def importance(self, group, labels, centroids, points) -> np.ndarray:
        """Within-cluster importance of each channel (higher = removed later)."""
        raise NotImplementedError

    def scores(self, group) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=self.threads):
            labels, centroids, points = self.cluster(group)
        importance = np.asarray(self.importance(group, labels, centroids, points), dtype=np.float64)
        return removal_ranks(labels, importance)


class KL1(KMeansCriterion):
    """K-means clusters, L1 order within each cluster (see the module docstring).

    Parameters
    ----------
    k, seed, variance, k_range, n_init, threads
        As in :class:`KMeansCriterion`.
    """

    name = "k_l1"

    def importance(self, group, labels, centroids, points):
        return L1().scores(group)


class KDistance(KMeansCriterion):
    """K-means clusters; the filters closest to their cluster's centroid go first.

    Parameters
    ----------
    k, seed, variance, k_range, n_init, threads
        As in :class:`KMeansCriterion`.
    """

    name = "k_distance"

    def importance(self, group, labels, centroids, points):
        return np.linalg.norm(points - centroids[labels], axis=1)


class KTaylor(KMeansCriterion):
    """K-means clusters, first-order Taylor order within each cluster; needs data.

    Parameters
    ----------
    data_loader, loss_fn, max_batches, device, progress
        As in :class:`~graphprune.criteria.Taylor`.
    k, seed, variance, k_range, n_init, threads
        As in :class:`KMeansCriterion`.
    """

    name = "k_taylor"
    requires_data = True

    def __init__(self, data_loader, loss_fn=None, max_batches: Optional[int] = None, device=None, *,
                 k: KSpec = None, seed: int = 0, variance: float = 0.8, k_range: tuple = (2, 10),
                 n_init: int = 10, threads: Optional[int] = 1, progress: bool = True):
        super().__init__(k, seed=seed, variance=variance, k_range=k_range, n_init=n_init, threads=threads)
        self.taylor = Taylor(data_loader, loss_fn, max_batches, device, progress=progress)
        self.taylor.owner = type(self).__name__  # its data errors name KTaylor, not the Taylor inside

    def prepare(self, model, report) -> None:
        super().prepare(model, report)
        self.taylor.prepare(model, report)

    def importance(self, group, labels, centroids, points):
        return self.taylor.scores(group)
